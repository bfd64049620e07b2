"""``lejepa-kernels pretrain``: LeJEPA pretraining with the fused SIGReg, then a linear probe.

With no arguments it pretrains a tiny ViT on scikit-learn's handwritten digits (they ship inside
scikit-learn: nothing to download) and reports a linear probe on held-out digits for the
pretrained encoder and for the same architecture at its random initialisation. ``--data PATH``
takes an ImageFolder directory instead. Under ``torchrun`` it trains with DistributedDataParallel;
the SIGReg module all-reduces its sums itself, so the loss is that of the global batch.

Example::

    lejepa-kernels pretrain --out run.json
    torchrun --nproc_per_node 8 -m lejepa_kernels pretrain --data /imagenet/train --model vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision.transforms import v2
from tqdm import tqdm

from .lejepa import LeJEPA

__all__ = ["build_parser", "main", "pretrain", "linear_probe"]

# Per-data defaults of the options left unset. The digits run is sized to finish in a few minutes
# on 2 CPU cores; the ImageFolder one follows the LeJEPA paper's ViT setup (224/96 px crops).
DIGITS_DEFAULTS = dict(model="test_vit", epochs=20, batch_size=64, lr=1e-3, image_size=64, workers=0)
FOLDER_DEFAULTS = dict(
    model="vit_small_patch16_224", epochs=100, batch_size=128, lr=5e-4, image_size=224,
    workers=min(8, os.cpu_count() or 1),
)
# Local view size / global view size: 96/224 in the paper; half on the digits, where a ViT with
# 16 px patches then sees 2x2 patches per local view.
LOCAL_RATIO = {"digits": 1 / 2, "folder": 96 / 224}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HELD_OUT_FRACTION = 0.2
# The split does not depend on --seed, so probe accuracies of runs with different seeds are
# measured on the same held-out images.
SPLIT_SEED = 0


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, without a traceback."""


def _int_at_least(minimum: int) -> Callable[[str], int]:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            bound = f"> {low}" if low_open else f">= {low}"
            bound += f" and <= {high}" if math.isfinite(high) else ""
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


def _per_data(key: str) -> str:
    return f"default: {DIGITS_DEFAULTS[key]} on the digits, {FOLDER_DEFAULTS[key]} with --data"


def build_parser() -> argparse.ArgumentParser:
    """The ``lejepa-kernels`` command line (one command: ``pretrain``)."""
    parser = argparse.ArgumentParser(
        prog="lejepa-kernels", description="LeJEPA with the fused SIGReg (sliced Epps-Pulley) loss."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = commands.add_parser(
        "pretrain",
        help="pretrain a LeJEPA encoder, then linear-probe it against random initialisation",
        description="Pretrain a LeJEPA encoder (2 global + local multi-crop views, AdamW with warmup "
        "and cosine decay, bf16 autocast on CUDA, DDP under torchrun), then fit a linear probe on "
        "frozen features of a held-out split for the pretrained and the randomly initialised "
        "encoder. Without --data: scikit-learn's handwritten digits, a few minutes on a CPU.",
    )
    p.add_argument("--data", metavar="PATH",
                   help="ImageFolder directory, one sub-folder per class (default: scikit-learn's digits)")
    p.add_argument("--model", metavar="NAME", help=f"timm model name ({_per_data('model')})")
    p.add_argument("--epochs", metavar="N", type=_int_at_least(1), help=f"epochs ({_per_data('epochs')})")
    p.add_argument("--batch-size", metavar="N", type=_int_at_least(1),
                   help=f"images per step and process, each in every view ({_per_data('batch_size')})")
    p.add_argument("--num-slices", metavar="N", type=_int_at_least(1), default=1024,
                   help="SIGReg random directions (default: %(default)s)")
    p.add_argument("--lamb", metavar="X", type=_float_in(0.0, math.inf), default=0.02,
                   help="SIGReg weight: loss = invariance + lamb * SIGReg (default: %(default)s)")
    p.add_argument("--sigreg", choices=("fused", "reference"), default="fused",
                   help="fused (memory-bounded) or the seed's module, which materialises "
                   "rows x slices x 17 tensors (default: %(default)s)")
    p.add_argument("--lr", metavar="X", type=_float_in(0.0, math.inf, low_open=True),
                   help=f"peak AdamW learning rate ({_per_data('lr')})")
    p.add_argument("--weight-decay", metavar="X", type=_float_in(0.0, math.inf), default=0.05,
                   help="AdamW weight decay, not on biases and norms (default: %(default)s)")
    p.add_argument("--warmup", metavar="F", type=_float_in(0.0, 1.0), default=0.1,
                   help="fraction of the steps in linear warmup, cosine decay after (default: %(default)s)")
    p.add_argument("--local-views", metavar="N", type=_int_at_least(1), default=6,
                   help="local views, besides the 2 global ones (default: %(default)s)")
    p.add_argument("--image-size", metavar="PX", type=_int_at_least(1),
                   help=f"global view size ({_per_data('image_size')})")
    p.add_argument("--local-size", metavar="PX", type=_int_at_least(1),
                   help="local view size (default: 1/2 of --image-size on the digits, 96/224 of it with --data)")
    p.add_argument("--drop-path", metavar="X", type=_float_in(0.0, 1.0), default=0.1,
                   help="stochastic depth rate of the backbone (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--workers", metavar="N", type=_int_at_least(0),
                   help="data-loading processes per training process (default: 0 on the digits, "
                   "min(8, cores) with --data)")
    p.add_argument("--seed", metavar="N", type=int, default=0,
                   help="seed of initialisation, data order and augmentation (default: %(default)s)")
    p.add_argument("--max-steps", metavar="N", type=_int_at_least(1),
                   help="stop after N optimizer steps in all; the schedule is fitted to it (smoke tests)")
    p.add_argument("--checkpoint", metavar="PATH", default="lejepa-checkpoint.pt",
                   help="checkpoint written after every epoch (default: %(default)s)")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint")
    p.add_argument("--out", metavar="PATH", help="write a JSON summary of the run here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lejepa-kernels`` / ``python -m lejepa_kernels``. Returns the exit code;
    user errors raise ``SystemExit(2)`` after printing one line to stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        pretrain(args)
    except UsageError as err:
        print(f"lejepa-kernels pretrain: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


# ----------------------------------------------------------------------------------------- data


class MultiCrop:
    """Image -> (list of ``n_global`` [C, G, G] views, list of ``n_local`` [C, L, L] views)."""

    def __init__(self, global_tf: Callable, local_tf: Callable, n_global: int, n_local: int) -> None:
        self.global_tf, self.local_tf = global_tf, local_tf
        self.n_global, self.n_local = n_global, n_local

    def __call__(self, image: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return (
            [self.global_tf(image) for _ in range(self.n_global)],
            [self.local_tf(image) for _ in range(self.n_local)],
        )


class _Split(Dataset):
    """The items ``indices`` of ``base`` ((image, label) pairs) with ``transform`` on the image."""

    def __init__(self, base: Dataset, indices: torch.Tensor, transform: Callable) -> None:
        self.base, self.indices, self.transform = base, indices.tolist(), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


def _digits(size: int) -> tuple[Dataset, tuple[float, ...], tuple[float, ...]]:
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16) as uint8 [3, size, size] images, with
    their per-channel mean and std in [0, 1] units."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    # Upsampled once here so the crops work at the model's resolution; grey replicated to RGB
    # because timm models are built with 3 input channels.
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    mean, std = pixels.mean().item(), pixels.std().item()
    return TensorDataset(images, torch.as_tensor(digits.target)), (mean,) * 3, (std,) * 3


def _check_data_path(path: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"--data {path}: no such directory")
    if not Path(path).is_dir():
        raise UsageError(f"--data {path}: not a directory (expected an ImageFolder: one sub-folder per class)")


def _image_folder(path: str) -> Dataset:
    """torchvision's ImageFolder of ``path``: (PIL RGB image, class index) pairs."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path)  # its loader opens every image as RGB
    except FileNotFoundError as err:
        raise UsageError(f"--data {path}: not an ImageFolder of images, one sub-folder per class ({err})") from None


def _view_transforms(digits: bool, image_size: int, local_size: int) -> tuple[Callable, Callable, Callable]:
    """(global, local, eval) transforms: image -> uint8 [3, H, W]. Normalisation is left to
    :class:`Normalize`, on the whole batch and on the device (uint8 is 4x less to copy than fp32)."""
    if digits:
        # Crops (position, scale and aspect jitter) only. No flips: a mirrored 2, 3 or 7 is not
        # that digit; no colour jitter on grey strokes. Small rotations and shears gave no better
        # probe in 20-epoch runs (0.928 vs 0.925 at lr 2e-3) and triple the CPU time of a view.
        def crops(size: int, scale: tuple[float, float]) -> Callable:
            return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.ToPureTensor()])

        return crops(image_size, (0.3, 1.0)), crops(local_size, (0.1, 0.4)), v2.ToPureTensor()

    # DINO-style photometric augmentations, as in the LeJEPA paper's ImageNet recipe.
    def views(size: int, scale: tuple[float, float]) -> Callable:
        return v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5),
            v2.ToPureTensor(),
        ])

    eval_tf = v2.Compose([v2.ToImage(), v2.Resize(round(image_size * 256 / 224), antialias=True),
                          v2.CenterCrop(image_size), v2.ToPureTensor()])
    return views(image_size, (0.3, 1.0)), views(local_size, (0.05, 0.3)), eval_tf


class Normalize:
    """uint8 images [B, 3, H, W] (any device) -> float32 on ``device``, standardised per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.device, non_blocking=True).float() - self.mean) / self.std


# ---------------------------------------------------------------------------------------- probe


def embed(model: LeJEPA, loader: DataLoader, normalize: Normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen backbone features of every (uint8 image [B, 3, H, W], label [B]) batch of ``loader``.

    :return: features [N, embed_dim] fp32 and labels [N] int64, on the CPU.
    """
    model.eval()
    features, labels = [], []
    with torch.no_grad(), _autocast(normalize.device):
        for images, target in loader:
            features.append(model(images=normalize(images)).embedding.float().cpu())
            labels.append(target)
    return torch.cat(features), torch.cat(labels)


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on x [N, D]: mean cross-entropy plus
    ``weight_decay / 2 * ||W||^2``, by full-batch L-BFGS (deterministic, no learning rate to tune),
    started from ``init`` or zero. Returns (W [D, C], b [C])."""
    weight, bias = init if init is not None else (torch.zeros(x.size(1), num_classes), torch.zeros(num_classes))
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(params: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x @ params[0] + params[1]).argmax(1) == y).float().mean().item()


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    weight_decays: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5), max_iter: int = 500,
) -> float:
    """Test accuracy of a linear classifier (logistic regression) on standardised frozen features.

    :param train_x: [N, D] features, ``train_y`` [N] class indices; ``test_x``/``test_y`` likewise.
    :param weight_decays: L2 strengths tried; the one with the best accuracy on a held-out fifth of
        the training features is kept (so each encoder gets its own, and none is chosen on the
        test set), then the probe is refitted on all training features.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    weight_decay, params = weight_decays[0], None
    if len(weight_decays) > 1:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val, fit = order[: len(train_x) // 5], order[len(train_x) // 5 :]
        best = -1.0
        # Strongest penalty first, each fit started from the last: a regularisation path, which
        # L-BFGS walks in a fraction of the iterations that cold starts take.
        for wd in sorted(weight_decays, reverse=True):
            params = _fit_logistic(train_x[fit], train_y[fit], num_classes, wd, max_iter, params)
            accuracy = _accuracy(params, train_x[val], train_y[val])
            if accuracy > best:
                best, weight_decay, best_params = accuracy, wd, params
        params = best_params
    params = _fit_logistic(train_x, train_y, num_classes, weight_decay, max_iter, params)
    return _accuracy(params, test_x, test_y)


# ------------------------------------------------------------------------------------- training


def _autocast(device: torch.device) -> ContextManager:
    # bf16 only on CUDA: CPU autocast would run the small matmuls here slower, not faster.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def _build_model(args: argparse.Namespace) -> LeJEPA:
    # Seeded so that the random-initialisation baseline is exactly the pretraining's start.
    torch.manual_seed(args.seed)
    try:
        return LeJEPA(args.model, n_slices=args.num_slices, lamb=args.lamb,
                      drop_path_rate=args.drop_path, sigreg=args.sigreg)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None


def _check_model_input(model: LeJEPA, name: str, sizes: Sequence[int]) -> None:
    """Fail early, with the option to change, when the backbone cannot take a view size."""
    model.eval()
    for size in sizes:
        try:
            with torch.no_grad():
                model.backbone(torch.zeros(1, 3, size, size))
        except Exception as err:  # timm raises assorted errors (assert, RuntimeError) on bad sizes
            raise UsageError(
                f"--model {name} cannot take {size}x{size} px views ({err}); "
                "change --image-size / --local-size or --model"
            ) from None
    model.train()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Written aside then renamed, so an interrupted save never leaves a truncated checkpoint.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and held-out images among n: a fixed 80/20 random split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_held_out = max(1, round(HELD_OUT_FRACTION * n))
    return order[n_held_out:], order[:n_held_out]


def _optimizer(model: LeJEPA, args: argparse.Namespace, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on biases and normalisation parameters, the usual ViT practice) and
    its per-step schedule: linear warmup, then cosine decay to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=args.lr,
    )
    warmup_steps = round(args.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _load_checkpoint(path: str, model_name: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UsageError(f"--resume {path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved_model = ckpt["args"]["model"]
    except Exception as err:  # torch.load raises several types for files that are not checkpoints
        raise UsageError(f"--resume {path}: not a checkpoint of lejepa-kernels pretrain ({err})") from None
    if saved_model != model_name:
        raise UsageError(f"--resume {path} holds a {saved_model} model, not {model_name}: pass --model {saved_model}")
    return ckpt


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``lejepa-kernels pretrain`` with parsed ``args``; returns the summary (also written to
    ``args.out``; empty on ranks other than 0). Raises :class:`UsageError` for mistakes in the
    options or the inputs."""
    start_time = time.perf_counter()
    digits = args.data is None
    for key, value in (DIGITS_DEFAULTS if digits else FOLDER_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.local_size is None:
        args.local_size = max(1, round(args.image_size * LOCAL_RATIO["digits" if digits else "folder"]))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(args.device, local_rank)
    if not digits:
        _check_data_path(args.data)  # before the model is built: a typo should fail at once
    model = _build_model(args)
    _check_model_input(model, args.model, (args.image_size, args.local_size))

    if digits:
        (base, mean, std), data_name = _digits(args.image_size), "sklearn digits"
    else:
        (base, mean, std), data_name = (_image_folder(args.data), IMAGENET_MEAN, IMAGENET_STD), args.data
    global_tf, local_tf, eval_tf = _view_transforms(digits, args.image_size, args.local_size)
    normalize = Normalize(mean, std, device)
    train_idx, test_idx = _split(len(base))
    train_set = _Split(base, train_idx, MultiCrop(global_tf, local_tf, 2, args.local_views))
    # DistributedSampler also on one process: its order depends only on (seed, epoch), so a
    # resumed run sees the same batches as an uninterrupted one.
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(sampler)} training images "
                         f"per process ({len(train_idx)} in all); lower it")
    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, **loader_kw)

    model.to(device)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    optimizer, scheduler = _optimizer(model, args, total_steps)
    step, start_epoch, history, step_losses = 0, 0, [], []
    if args.resume is not None:
        ckpt = _load_checkpoint(args.resume, args.model)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, start_epoch, history, step_losses = ckpt["step"], ckpt["epoch"], ckpt["history"], ckpt["step_losses"]

    distributed = world_size > 1
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = model
    main_process = rank == 0
    if main_process:
        n_params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
        print(f"LeJEPA pretraining: {args.model} ({n_params:.2f}M backbone parameters) on {data_name} "
              f"({len(train_idx)} train / {len(test_idx)} held-out images), 2x{args.image_size}px + "
              f"{args.local_views}x{args.local_size}px views, {args.num_slices} slices, {args.sigreg} "
              f"SIGReg, {device}" + (f" x {world_size} processes" if distributed else ""), flush=True)

    train_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)
        train_model.train()
        epoch_start, sums = time.perf_counter(), torch.zeros(4, dtype=torch.float64)  # loss, inv, sigreg, steps
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=None if main_process else True,
                   leave=False, dynamic_ncols=True)
        for (global_views, local_views), _ in bar:
            with _autocast(device):
                out = train_model(global_views=[normalize(v) for v in global_views],
                                  local_views=[normalize(v) for v in local_views])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            terms = torch.stack([out.loss, out.inv_loss, out.sigreg_loss]).detach().double().cpu()
            sums += torch.cat([terms, torch.ones(1, dtype=torch.float64)])
            step_losses.append(terms[0].item())
            bar.set_postfix(loss=f"{terms[0]:.4f}", inv=f"{terms[1]:.4f}", sigreg=f"{terms[2]:.4f}")
            if step >= total_steps:
                break
        bar.close()
        if distributed:
            sums = sums.to(device)
            dist.all_reduce(sums)
        loss, inv_loss, sigreg_loss = (sums[:3] / sums[3]).tolist()
        history.append(dict(epoch=epoch + 1, step=step, loss=loss, inv_loss=inv_loss, sigreg_loss=sigreg_loss,
                            lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - epoch_start))
        if main_process:
            print(f"epoch {epoch + 1}/{args.epochs}  step {step}  loss {loss:.4f}  inv {inv_loss:.4f}  "
                  f"sigreg {sigreg_loss:.4f}  lr {history[-1]['lr']:.2e}  {history[-1]['seconds']:.1f}s", flush=True)
            _save_checkpoint(Path(args.checkpoint), dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                epoch=epoch + 1, step=step, args=vars(args), history=history, step_losses=step_losses,
            ))
    train_seconds = time.perf_counter() - train_start
    if distributed:
        dist.destroy_process_group()
    if not main_process:
        return {}

    # Probe: fitted on the training split's features, scored on the held-out split.
    eval_kw = dict(batch_size=max(args.batch_size, 256), **loader_kw)
    probe_train = DataLoader(_Split(base, train_idx, eval_tf), **eval_kw)
    probe_test = DataLoader(_Split(base, test_idx, eval_tf), **eval_kw)

    def probe(encoder: LeJEPA) -> float:
        return linear_probe(*embed(encoder, probe_train, normalize), *embed(encoder, probe_test, normalize))

    probe_accuracy = probe(model)
    random_init_probe_accuracy = probe(_build_model(args).to(device))
    last = history[-1] if history else {}
    summary = dict(
        probe_accuracy=probe_accuracy,
        random_init_probe_accuracy=random_init_probe_accuracy,
        num_slices=args.num_slices,
        seconds=time.perf_counter() - start_time,
        train_seconds=train_seconds,
        loss=last.get("loss"), inv_loss=last.get("inv_loss"), sigreg_loss=last.get("sigreg_loss"),
        model=args.model, data=data_name, epochs=args.epochs, steps=step, batch_size=args.batch_size,
        world_size=world_size, lamb=args.lamb, sigreg=args.sigreg, lr=args.lr, image_size=args.image_size,
        local_size=args.local_size, views=dict(n_global=2, n_local=args.local_views), seed=args.seed,
        device=str(device), train_images=len(train_idx), held_out_images=len(test_idx),
        checkpoint=str(args.checkpoint), history=history, step_losses=step_losses,
    )
    print(f"linear probe on {len(test_idx)} held-out images: pretrained {probe_accuracy:.3f}, "
          f"random init {random_init_probe_accuracy:.3f}  ({summary['seconds']:.0f}s in all; "
          f"checkpoint {args.checkpoint})", flush=True)
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
