"""The run of ``lejepa-kernels pretrain``: :func:`pretrain` trains, checkpoints, then probes."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..lejepa import LeJEPA
from .checkpoint import check_resumable, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochSampler,
    MultiCrop,
    Normalize,
    SeededViews,
    Split,
    check_data_path,
    digits_dataset,
    image_folder,
    split_indices,
    view_transforms,
)
from .device import autocast, resolve_device
from .files import atomic_write, check_output_path
from .options import UsageError, resolve, run_settings
from .probe import embed, linear_probe

__all__ = ["pretrain"]


def build_model(args: argparse.Namespace) -> LeJEPA:
    """The LeJEPA model of resolved ``args``, initialised from ``args.seed`` (so the
    random-initialisation baseline is exactly the pretraining's start)."""
    torch.manual_seed(args.seed)
    try:
        return LeJEPA(args.model, n_slices=args.num_slices, lamb=args.lamb, drop_path_rate=args.drop_path,
                      sigreg=args.sigreg, sigreg_views=args.sigreg_views, loss_weighting=args.loss_weighting,
                      directions=args.directions, orthogonal=args.orthogonal, unbiased=args.unbiased)
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


def _optimizer(model: LeJEPA, args: argparse.Namespace, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on biases and normalisation parameters, the usual ViT practice) and
    its per-step schedule: linear warmup, then cosine decay to zero at ``total_steps``."""
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


class SigintFlag:
    """While active, the first SIGINT (Ctrl-C) sets :attr:`raised` instead of raising
    ``KeyboardInterrupt``, so the training loop can finish its step and write a checkpoint; a
    second one raises at once. Inactive off the main thread and where SIGINT is ignored."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> "SigintFlag":
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and previous not in (None, signal.SIG_IGN):
            self._previous = previous
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, self._previous if callable(self._previous) else signal.default_int_handler)
        print("\nlejepa-kernels pretrain: interrupted: finishing this step to write the checkpoint "
              "(Ctrl-C again to stop at once, without it)", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process, which stops them after its checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _means(sums: torch.Tensor) -> dict[str, float]:
    """Mean loss terms from their sums and step count (:attr:`_Progress.epoch_sums`)."""
    loss, inv_loss, sigreg_loss = (sums[:3] / sums[3]).tolist()
    return dict(loss=loss, inv_loss=inv_loss, sigreg_loss=sigreg_loss)


def _zero_sums() -> torch.Tensor:
    return torch.zeros(4, dtype=torch.float64)  # loss, inv, sigreg, steps


@dataclass
class _Progress:
    """Where a run stands, besides its model, optimizer and scheduler: saved in its checkpoints."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    step_losses: list[float] = field(default_factory=list)
    epoch_sums: torch.Tensor = field(default_factory=_zero_sums)  # of the epoch in progress, this process's
    epoch_seconds: float = 0.0  # spent on the epoch in progress before the run was resumed


@dataclass
class _Data:
    """The data of a run: the training loader and its sampler, and what the probe reads."""

    name: str
    base: Dataset
    train_idx: torch.Tensor
    test_idx: torch.Tensor
    eval_tf: Callable
    normalize: Normalize
    sampler: EpochSampler
    loader: DataLoader
    loader_kw: dict[str, Any]
    steps_per_epoch: int


def _load_data(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> _Data:
    """The data of resolved ``args`` for process ``rank`` of ``world_size``."""
    digits = args.data is None
    if digits:
        (base, mean, std), name = digits_dataset(args.image_size), "sklearn digits"
    else:
        (base, mean, std), name = (image_folder(args.data), IMAGENET_MEAN, IMAGENET_STD), args.data
    global_tf, local_tf, eval_tf = view_transforms(digits, args.image_size, args.local_size)
    train_idx, test_idx = split_indices(len(base))
    train_set = SeededViews(Split(base, train_idx, MultiCrop(global_tf, local_tf, 2, args.local_views)), args.seed)
    sampler = EpochSampler(len(train_set), args.seed, rank, world_size)
    steps_per_epoch = sampler.per_epoch // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {sampler.per_epoch} training images "
                         f"per process ({len(train_idx)} in all); lower it")
    loader_kw: dict[str, Any] = dict(
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        worker_init_fn=_ignore_sigint if args.workers > 0 else None,
    )
    # Its own generator (the workers' seeds come from it), so that starting an epoch draws nothing
    # from the global one, which drop-path uses.
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator(), **loader_kw)
    return _Data(name, base, train_idx, test_idx, eval_tf, Normalize(mean, std, device), sampler, loader, loader_kw,
                 steps_per_epoch)


class _Run:
    """One invocation of the command: a run set up from resolved ``args``, started afresh or
    resumed from the checkpoint ``saved``."""

    def __init__(self, args: argparse.Namespace, saved: Optional[dict[str, Any]]) -> None:
        self.args = args
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.main_process, self.distributed = self.rank == 0, self.world_size > 1
        if self.main_process:  # the only process that writes; checked before anything is computed
            check_output_path(args.checkpoint, "--checkpoint")
            if args.out is not None:
                check_output_path(args.out, "--out")
        self.device = resolve_device(args.device, local_rank)
        if args.data is not None:
            check_data_path(args.data)  # before the model is built: a typo should fail at once
        self.model = build_model(args)
        random.seed(args.seed)
        _check_model_input(self.model, args.model, (args.image_size, args.local_size))
        self.data = _load_data(args, self.device, self.rank, self.world_size)
        if saved is not None:
            check_resumable(saved, args.resume, self.world_size, self.data.steps_per_epoch)

        self.model.to(self.device)
        self.total_steps = args.epochs * self.data.steps_per_epoch
        self.optimizer, self.scheduler = _optimizer(self.model, args, self.total_steps)
        self.progress = _Progress()
        self.last_saved_epoch_sums = _zero_sums()  # over all processes, at the last checkpoint
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            # The saved sums are over all processes: kept by one, so the epoch's all-reduce counts them once.
            self.progress = _Progress(
                saved["step"], saved["history"], saved["step_losses"],
                saved["epoch_sums"] if self.main_process else _zero_sums(), saved["epoch_seconds"],
            )
            set_rng_state(saved["rng"], self.device)  # last: building the run above drew from them

    def _all_ranks_sum(self, values: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return values
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def _on_any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (all stop at the same step, or DDP would hang)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def position(self) -> str:
        epoch, batch = divmod(self.progress.step, self.data.steps_per_epoch)
        return (f"step {self.progress.step} of {self.total_steps} "
                f"(epoch {epoch + 1}, after batch {batch} of {self.data.steps_per_epoch})")

    def _save(self, epoch_seconds: float) -> None:
        progress = self.progress
        epoch_sums = self._all_ranks_sum(progress.epoch_sums.clone())
        self.last_saved_epoch_sums = epoch_sums
        if self.main_process:
            save_checkpoint(self.args.checkpoint, dict(
                settings=run_settings(self.args), world_size=self.world_size,
                steps_per_epoch=self.data.steps_per_epoch, step=progress.step,
                epoch=progress.step // self.data.steps_per_epoch, model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                rng=rng_state(self.device), history=progress.history, step_losses=progress.step_losses,
                epoch_sums=epoch_sums, epoch_seconds=epoch_seconds,
            ))

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        progress = self.progress
        progress.history.append(dict(
            epoch=epoch + 1, step=progress.step, **_means(self._all_ranks_sum(progress.epoch_sums)),
            lr=self.scheduler.get_last_lr()[0], seconds=seconds,
        ))
        progress.epoch_sums = _zero_sums()
        if self.main_process:
            h = progress.history[-1]
            print(f"epoch {epoch + 1}/{self.args.epochs}  step {progress.step}  loss {h['loss']:.4f}  "
                  f"inv {h['inv_loss']:.4f}  sigreg {h['sigreg_loss']:.4f}  lr {h['lr']:.2e}  {seconds:.1f}s",
                  flush=True)

    def train(self) -> bool:
        """Train up to the end of the schedule or ``--max-steps``, writing checkpoints at each
        epoch end (or every ``--checkpoint-every`` steps) and where it stops. Returns whether
        Ctrl-C stopped it."""
        args, data, progress = self.args, self.data, self.progress
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            model = self.model
        stop_step = min(self.total_steps, args.max_steps or self.total_steps)
        checkpoint_every = args.checkpoint_every or data.steps_per_epoch
        # The epoch in progress is timed from when it would have started had it run without a break;
        # checkpoint writes are left out.
        epoch_start = time.perf_counter() - progress.epoch_seconds
        saved_step, interrupted = None, False
        try:
            with SigintFlag() as sigint:
                while progress.step < stop_step and not interrupted:
                    epoch, batch = divmod(progress.step, data.steps_per_epoch)
                    data.sampler.set_position(epoch, batch * args.batch_size)
                    model.train()
                    bar = tqdm(data.loader, desc=f"epoch {epoch + 1}/{args.epochs}", initial=batch,
                               total=data.steps_per_epoch, disable=None if self.main_process else True,
                               leave=False, dynamic_ncols=True)
                    for (global_views, local_views), _ in bar:
                        terms = self._step(model, global_views, local_views)
                        bar.set_postfix(loss=f"{terms[0]:.4f}", inv=f"{terms[1]:.4f}", sigreg=f"{terms[2]:.4f}")
                        if progress.step % data.steps_per_epoch == 0:
                            bar.clear()
                            self._end_epoch(epoch, time.perf_counter() - epoch_start)
                            epoch_start = time.perf_counter()
                        interrupted = self._on_any_rank(sigint.raised)
                        stopping = progress.step >= stop_step or interrupted
                        if stopping or progress.step % checkpoint_every == 0:
                            save_start = time.perf_counter()
                            self._save(save_start - epoch_start)
                            epoch_start += time.perf_counter() - save_start
                            saved_step = progress.step
                        if stopping:
                            break
                    bar.close()
            if saved_step != progress.step:  # a resumed run already at --max-steps: its checkpoint, where asked
                self._save(time.perf_counter() - epoch_start)
        finally:
            if self.distributed:
                dist.destroy_process_group()
        return interrupted

    def _step(self, model: torch.nn.Module, global_views: list[torch.Tensor],
              local_views: list[torch.Tensor]) -> torch.Tensor:
        """One optimizer step; returns the (loss, inv_loss, sigreg_loss) of it, fp64 on the CPU."""
        normalize = self.data.normalize
        with autocast(self.device):
            out = model(global_views=[normalize(v) for v in global_views],
                        local_views=[normalize(v) for v in local_views])
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        terms = torch.stack([out.loss, out.inv_loss, out.sigreg_loss]).detach().double().cpu()
        progress = self.progress
        progress.step += 1
        progress.epoch_sums += torch.cat([terms, torch.ones(1, dtype=torch.float64)])
        progress.step_losses.append(terms[0].item())
        return terms

    def probe(self) -> tuple[float, float]:
        """Linear-probe accuracies of the trained encoder and of its random initialisation: fitted
        on the training split's features, scored on the held-out split."""
        data = self.data
        eval_kw = dict(batch_size=max(self.args.batch_size, 256), **data.loader_kw)
        probe_train = DataLoader(Split(data.base, data.train_idx, data.eval_tf), **eval_kw)
        probe_test = DataLoader(Split(data.base, data.test_idx, data.eval_tf), **eval_kw)

        def accuracy(encoder: LeJEPA) -> float:
            train_features = embed(encoder, probe_train, data.normalize)
            return linear_probe(*train_features, *embed(encoder, probe_test, data.normalize))

        return accuracy(self.model), accuracy(build_model(self.args).to(self.device))


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``lejepa-kernels pretrain`` with parsed ``args``; returns the summary (also written to
    ``args.out``; empty on ranks other than 0).

    :raises UsageError: for mistakes in the options or the inputs, before training starts.
    :raises KeyboardInterrupt: after Ctrl-C, once the checkpoint of the last finished step is written.
    """
    start_time = time.perf_counter()
    saved = load_checkpoint(args.resume) if args.resume is not None else None
    run = _Run(resolve(args, saved["settings"] if saved is not None else None), saved)
    del saved  # the model, optimizer and generators hold it now
    args, data, progress = run.args, run.data, run.progress
    if run.main_process:
        n_params = sum(p.numel() for p in run.model.backbone.parameters()) / 1e6
        print(f"LeJEPA pretraining: {args.model} ({n_params:.2f}M backbone parameters) on {data.name} "
              f"({len(data.train_idx)} train / {len(data.test_idx)} held-out images), 2x{args.image_size}px + "
              f"{args.local_views}x{args.local_size}px views, {args.num_slices} slices ({args.directions} "
              f"directions{', orthogonal' if args.orthogonal else ''}), {'unbiased ' if args.unbiased else ''}"
              f"{args.sigreg} SIGReg ({args.sigreg_views.replace('_', '-')}, {args.loss_weighting} weighting), "
              f"{run.device}" + (f" x {run.world_size} processes" if run.distributed else ""), flush=True)
        if args.resume is not None:
            print(f"resuming {args.resume} at {run.position()}", flush=True)

    train_start = time.perf_counter()
    interrupted = run.train()
    train_seconds = time.perf_counter() - train_start
    if interrupted:
        if run.main_process:
            print(f"lejepa-kernels pretrain: stopped at {run.position()}; checkpoint {args.checkpoint}: "
                  f"continue with --resume {args.checkpoint}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    if not run.main_process:
        return {}
    if progress.step < run.total_steps:
        print(f"stopped at --max-steps {args.max_steps}: {run.position()}; checkpoint {args.checkpoint}: "
              f"continue with --resume {args.checkpoint}", flush=True)

    probe_accuracy, random_init_probe_accuracy = run.probe()
    # Means over the last epoch: over the one in progress when the run stopped inside it.
    sums = run.last_saved_epoch_sums
    last = _means(sums) if sums[3] > 0 else progress.history[-1] if progress.history else {}
    summary = dict(
        probe_accuracy=probe_accuracy,
        random_init_probe_accuracy=random_init_probe_accuracy,
        num_slices=args.num_slices,
        directions=args.directions,
        orthogonal=args.orthogonal,
        unbiased=args.unbiased,
        seconds=time.perf_counter() - start_time,
        train_seconds=train_seconds,
        loss=last.get("loss"), inv_loss=last.get("inv_loss"), sigreg_loss=last.get("sigreg_loss"),
        model=args.model, data=data.name, epochs=args.epochs, steps=progress.step, batch_size=args.batch_size,
        world_size=run.world_size, lamb=args.lamb, sigreg=args.sigreg, sigreg_views=args.sigreg_views,
        loss_weighting=args.loss_weighting, lr=args.lr, image_size=args.image_size,
        local_size=args.local_size, views=dict(n_global=2, n_local=args.local_views), seed=args.seed,
        device=str(run.device), train_images=len(data.train_idx), held_out_images=len(data.test_idx),
        checkpoint=str(args.checkpoint), history=progress.history, step_losses=progress.step_losses,
    )
    print(f"linear probe on {len(data.test_idx)} held-out images: pretrained {probe_accuracy:.3f}, "
          f"random init {random_init_probe_accuracy:.3f}  ({summary['seconds']:.0f}s in all; "
          f"checkpoint {args.checkpoint})", flush=True)
    if args.out is not None:
        atomic_write(args.out, lambda file: file.write((json.dumps(summary, indent=2) + "\n").encode()))
    return summary
