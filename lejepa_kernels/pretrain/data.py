"""Data of ``lejepa-kernels pretrain``: the digits or an ImageFolder, the fixed train/held-out
split, multi-crop views and the order they are seen in.

The training views are reproducible by construction: each sample's views are drawn from a
generator seeded by (seed, epoch, sample index), and the order of an epoch depends only on
(seed, epoch). The numbers therefore do not depend on the number of DataLoader workers, and a run
resumed in the middle of an epoch draws the views the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, TensorDataset
from torchvision.transforms import v2

from .options import UsageError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MultiCrop", "Normalize", "SeededViews", "Split", "EpochSampler",
    "check_data_path", "digits_dataset", "image_folder", "sample_seed", "split_indices", "view_transforms",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HELD_OUT_FRACTION = 0.2
# The split does not depend on --seed, so probe accuracies of runs with different seeds are
# measured on the same held-out images.
SPLIT_SEED = 0


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


class Split(Dataset):
    """The items ``indices`` of ``base`` ((image, label) pairs) with ``transform`` on the image."""

    def __init__(self, base: Dataset, indices: torch.Tensor, transform: Callable) -> None:
        self.base, self.indices, self.transform = base, indices.tolist(), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample ``index``'s views in ``epoch`` of a run seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextmanager
def _torch_cpu_rng_seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's default CPU generator seeded with ``seed``, then put its state
    back: torchvision's random transforms draw from that generator, and the training process's
    own stream (drop-path on the CPU) must not depend on the views."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA too
    try:
        yield
    finally:
        torch.set_rng_state(state)


class SeededViews(Dataset):
    """Training items of a :class:`Split`, keyed by ``(epoch, i)`` (what :class:`EpochSampler`
    yields): the views of item ``i`` drawn from a generator seeded by ``(seed, epoch, i)``."""

    def __init__(self, split: Split, seed: int) -> None:
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, i = key
        with _torch_cpu_rng_seeded(sample_seed(self.seed, epoch, i)):
            return self.split[i]


class EpochSampler(Sampler):
    """This process's share of a shuffle of ``range(n)`` per epoch, as ``(epoch, index)`` pairs,
    from position ``start`` of the epoch on (to resume inside an epoch without drawing the views
    of the samples already seen).

    The order is that of ``DistributedSampler(shuffle=True, drop_last=True)``: a permutation seeded
    by ``seed + epoch``, cut to a multiple of ``world_size``, every ``world_size``-th item from
    ``rank`` on.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_epoch = n // world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        """Yield ``epoch``'s samples from its ``start``-th (0-based) on."""
        if not 0 <= start <= self.per_epoch:
            raise ValueError(f"start must be in [0, {self.per_epoch}], got {start}")
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.per_epoch * self.world_size][self.rank :: self.world_size][self.start :]
        return iter([(self.epoch, i) for i in mine.tolist()])

    def __len__(self) -> int:
        return self.per_epoch - self.start


def digits_dataset(size: int) -> tuple[Dataset, tuple[float, ...], tuple[float, ...]]:
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16) as uint8 [3, size, size] images, with
    their per-channel mean and std in [0, 1] units."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    # Upsampled once here so the crops work at the model's resolution; grey replicated to RGB
    # because timm models are built with 3 input channels.
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    mean, std = pixels.mean().item(), pixels.std().item()
    return TensorDataset(images, torch.as_tensor(data.target)), (mean,) * 3, (std,) * 3


def check_data_path(path: str) -> None:
    """Fail at once, in one line, when ``--data`` is not a directory."""
    if not Path(path).exists():
        raise UsageError(f"--data {path}: no such directory")
    if not Path(path).is_dir():
        raise UsageError(f"--data {path}: not a directory (expected an ImageFolder: one sub-folder per class)")


def image_folder(path: str) -> Dataset:
    """torchvision's ImageFolder of ``path``: (PIL RGB image, class index) pairs."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path)  # its loader opens every image as RGB
    except FileNotFoundError as err:
        raise UsageError(f"--data {path}: not an ImageFolder of images, one sub-folder per class ({err})") from None


def split_indices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and held-out images among n: a fixed 80/20 random split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_held_out = max(1, round(HELD_OUT_FRACTION * n))
    return order[n_held_out:], order[:n_held_out]


def view_transforms(digits: bool, image_size: int, local_size: int) -> tuple[Callable, Callable, Callable]:
    """(global, local, eval) transforms: image -> uint8 [3, H, W]. Normalisation is left to
    :class:`Normalize`, on the whole batch and on the device (uint8 is 4x less to copy than fp32).
    The random ones draw from torch's default CPU generator (see :class:`SeededViews`)."""
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
