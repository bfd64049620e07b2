"""The ``pretrain`` subcommand of ``lejepa-kernels``: its parser and exit statuses."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointWriteError
from .options import UsageError, add_arguments
from .train import pretrain

__all__ = ["add_parser", "run"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # 130 = 128 + SIGINT, what shells report for Ctrl-C


def run(args: argparse.Namespace) -> int:
    """Run ``lejepa-kernels pretrain``: 0 when done, 1 when a checkpoint could not be written, 2
    after a mistake in the options or inputs (each one line on stderr), 130 after Ctrl-C (the
    checkpoint is written first)."""
    try:
        pretrain(args)
    except CheckpointWriteError as err:
        print(f"lejepa-kernels pretrain: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except UsageError as err:
        print(f"lejepa-kernels pretrain: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register ``pretrain`` among the ``lejepa-kernels`` ``commands``."""
    parser = commands.add_parser(
        "pretrain",
        help="pretrain a LeJEPA encoder, then linear-probe it against random initialisation",
        description="Pretrain a LeJEPA encoder (2 global + local multi-crop views, AdamW with warmup "
        "and cosine decay, bf16 autocast on CUDA, DDP under torchrun), then fit a linear probe on "
        "frozen features of a held-out split for the pretrained and the randomly initialised "
        "encoder. Without --data: scikit-learn's handwritten digits, a few minutes on a CPU. "
        "A run stopped at any step (--max-steps, Ctrl-C) and continued with --resume gives the "
        "numbers of the uninterrupted run.",
    )
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser
