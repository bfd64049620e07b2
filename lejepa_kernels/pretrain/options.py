"""Options of ``lejepa-kernels pretrain``: their parsing, defaults, and which may change on resume.

Every option that defines the run (its data, model, loss, optimisation, schedule, seed) is parsed
with a default of ``None`` and filled in by :func:`resolve`: from the checkpoint when resuming, else
from the defaults below. An option given on the command line of a resumed run must equal its saved
value, so a resumed run is always the run that was saved. The others (:data:`FREE_ON_RESUME`)
change where and how the run executes, not its numbers.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Mapping, Optional

__all__ = [
    "DIGITS_DEFAULTS", "FOLDER_DEFAULTS", "COMMON_DEFAULTS", "RUN_SETTINGS", "FREE_ON_RESUME",
    "UsageError", "add_arguments", "resolve", "run_settings",
]


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, without a traceback."""


# Per-data defaults. The digits run is sized to finish in a few minutes on 2 CPU cores; the
# ImageFolder one follows the LeJEPA paper's ViT setup (224/96 px crops).
DIGITS_DEFAULTS: dict[str, Any] = dict(model="test_vit", epochs=20, batch_size=64, lr=1e-3, image_size=64, workers=0)
FOLDER_DEFAULTS: dict[str, Any] = dict(
    model="vit_small_patch16_224", epochs=100, batch_size=128, lr=5e-4, image_size=224,
    workers=min(8, os.cpu_count() or 1),
)
COMMON_DEFAULTS: dict[str, Any] = dict(
    num_slices=1024, directions="seed", orthogonal=False, unbiased=False, lamb=0.02, sigreg="fused",
    sigreg_views="concat", loss_weighting="seed",
    weight_decay=0.05, warmup=0.1, local_views=6, drop_path=0.1, seed=0,
)
# Local view size / global view size: 96/224 in the paper; half on the digits, where a ViT with
# 16 px patches then sees 2x2 patches per local view.
LOCAL_RATIO = {"digits": 1 / 2, "folder": 96 / 224}

RUN_SETTINGS = (
    "data", "model", "epochs", "batch_size", "num_slices", "directions", "orthogonal", "unbiased", "lamb", "sigreg",
    "sigreg_views", "loss_weighting", "lr", "weight_decay", "warmup", "local_views", "image_size", "local_size",
    "drop_path", "seed",
)
"""The options that define a run: saved in its checkpoints, refused on resume when they differ."""
SETTINGS_ADDED_LATER = dict(
    sigreg_views="concat", loss_weighting="seed", directions="seed", orthogonal=False, unbiased=False
)
"""Run settings that checkpoints written before them lack, with the value those runs used."""

FREE_ON_RESUME = ("device", "workers", "max_steps", "checkpoint", "checkpoint_every", "resume", "out")
"""The options that may differ on resume: they do not change the run's numbers."""


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


def _common(key: str) -> str:
    return f"default: {COMMON_DEFAULTS[key]}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``lejepa-kernels pretrain`` to ``p``."""
    p.add_argument("--data", metavar="PATH",
                   help="ImageFolder directory, one sub-folder per class (default: scikit-learn's digits)")
    p.add_argument("--model", metavar="NAME", help=f"timm model name ({_per_data('model')})")
    p.add_argument("--epochs", metavar="N", type=_int_at_least(1), help=f"epochs ({_per_data('epochs')})")
    p.add_argument("--batch-size", metavar="N", type=_int_at_least(1),
                   help=f"images per step and process, each in every view ({_per_data('batch_size')})")
    p.add_argument("--num-slices", metavar="N", type=_int_at_least(1),
                   help=f"SIGReg random directions ({_common('num_slices')})")
    p.add_argument("--directions", choices=("seed", "blockwise"),
                   help="SIGReg directions: the seed's [D, S] matrix per step, or drawn block by block "
                   f"(memory independent of --num-slices; fused only) ({_common('directions')})")
    p.add_argument("--orthogonal", action=argparse.BooleanOptionalAction,
                   help="orthonormalise the SIGReg directions in groups of at most the embedding width "
                   f"(fused only) ({_common('orthogonal')})")
    p.add_argument("--unbiased", action=argparse.BooleanOptionalAction,
                   help="the unbiased Epps-Pulley statistic, 0 in expectation for Gaussian embeddings, "
                   f"instead of the seed's plug-in one (fused only) ({_common('unbiased')})")
    p.add_argument("--lamb", metavar="X", type=_float_in(0.0, math.inf),
                   help=f"SIGReg weight: loss = invariance + lamb * SIGReg ({_common('lamb')})")
    p.add_argument("--sigreg", choices=("fused", "reference"),
                   help="fused (memory-bounded) or the seed's module, which materialises "
                   f"rows x slices x 17 tensors ({_common('sigreg')})")
    p.add_argument("--sigreg-views", choices=("concat", "per_view"),
                   help="SIGReg over all views' embeddings together (concat), or the mean of each view's "
                   f"SIGReg, as the LeJEPA paper does (per_view) ({_common('sigreg_views')})")
    p.add_argument("--loss-weighting", choices=("seed", "paper"),
                   help="seed: loss = invariance + lamb * SIGReg; paper: (1 - lamb) * invariance + lamb * SIGReg "
                   f"(lamb <= 1) ({_common('loss_weighting')})")
    p.add_argument("--lr", metavar="X", type=_float_in(0.0, math.inf, low_open=True),
                   help=f"peak AdamW learning rate ({_per_data('lr')})")
    p.add_argument("--weight-decay", metavar="X", type=_float_in(0.0, math.inf),
                   help=f"AdamW weight decay, not on biases and norms ({_common('weight_decay')})")
    p.add_argument("--warmup", metavar="F", type=_float_in(0.0, 1.0),
                   help=f"fraction of the steps in linear warmup, cosine decay after ({_common('warmup')})")
    p.add_argument("--local-views", metavar="N", type=_int_at_least(1),
                   help=f"local views, besides the 2 global ones ({_common('local_views')})")
    p.add_argument("--image-size", metavar="PX", type=_int_at_least(1),
                   help=f"global view size ({_per_data('image_size')})")
    p.add_argument("--local-size", metavar="PX", type=_int_at_least(1),
                   help="local view size (default: 1/2 of --image-size on the digits, 96/224 of it with --data)")
    p.add_argument("--drop-path", metavar="X", type=_float_in(0.0, 1.0),
                   help=f"stochastic depth rate of the backbone ({_common('drop_path')})")
    p.add_argument("--seed", metavar="N", type=int,
                   help=f"seed of initialisation, data order and augmentation ({_common('seed')})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--workers", metavar="N", type=_int_at_least(0),
                   help="data-loading processes per training process; the numbers do not depend on it "
                   f"({_per_data('workers')})")
    p.add_argument("--max-steps", metavar="N", type=_int_at_least(1),
                   help="stop after N optimizer steps in all (those of the resumed run included). Only a "
                   "stopping point: the schedule still spans --epochs, so a run stopped here and resumed "
                   "is the uninterrupted run")
    p.add_argument("--checkpoint", metavar="PATH", default="lejepa-checkpoint.pt",
                   help="checkpoint file, written at each epoch end (or every --checkpoint-every steps) and "
                   "when the run stops: at its end, at --max-steps or on Ctrl-C (default: %(default)s)")
    p.add_argument("--checkpoint-every", metavar="N", type=_int_at_least(1),
                   help="write the checkpoint every N steps instead of at each epoch end")
    p.add_argument("--resume", metavar="PATH",
                   help="continue the run saved in this checkpoint, exactly; options not given take its "
                   "saved values, options given must equal them (except --device, --workers, --max-steps, "
                   "--checkpoint, --checkpoint-every and --out)")
    p.add_argument("--out", metavar="PATH", help="write a JSON summary of the run here")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve(args: argparse.Namespace, saved: Optional[Mapping[str, Any]] = None) -> argparse.Namespace:
    """A copy of ``args`` with every unset run setting filled in: from ``saved`` (the settings of a
    checkpoint being resumed), else from the defaults.

    :raises UsageError: when an option given differs from its saved value; the message names
        every such option with its saved value.
    """
    args = argparse.Namespace(**vars(args))
    if args.data is not None:
        args.data = os.path.abspath(args.data)  # the same directory whatever the working directory
    if saved is not None:
        saved = {**SETTINGS_ADDED_LATER, **saved}
        differing = [
            f"{_flag(key)} {getattr(args, key)} (saved: {saved[key]})"
            for key in RUN_SETTINGS if getattr(args, key) is not None and getattr(args, key) != saved[key]
        ]
        if differing:
            raise UsageError(
                f"--resume {args.resume}: options differ from the saved run: {', '.join(differing)}; "
                "leave them out to resume, or start a new run without --resume"
            )
        for key in RUN_SETTINGS:
            setattr(args, key, saved[key])
    digits = args.data is None
    for key, value in {**(DIGITS_DEFAULTS if digits else FOLDER_DEFAULTS), **COMMON_DEFAULTS}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.directions == "blockwise" and args.sigreg != "fused":
        raise UsageError("--directions blockwise needs --sigreg fused (the seed's module draws the seed's directions)")
    for key in ("orthogonal", "unbiased"):
        if getattr(args, key) and args.sigreg != "fused":
            raise UsageError(f"--{key} needs --sigreg fused (the seed's module has the seed's statistic only)")
    if args.local_size is None:
        args.local_size = max(1, round(args.image_size * LOCAL_RATIO["digits" if digits else "folder"]))
    if args.loss_weighting == "paper" and args.lamb > 1:
        raise UsageError(
            f"--loss-weighting paper weighs the invariance by 1 - lamb: --lamb must be <= 1, got {args.lamb}"
        )
    return args


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define the run of resolved ``args`` (saved in its checkpoints)."""
    return {key: getattr(args, key) for key in RUN_SETTINGS}
