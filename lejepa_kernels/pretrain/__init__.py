"""``lejepa-kernels pretrain``: LeJEPA pretraining with the fused SIGReg, then a linear probe.

With no arguments it pretrains a tiny ViT on scikit-learn's handwritten digits (they ship inside
scikit-learn: nothing to download) and reports a linear probe on held-out digits for the
pretrained encoder and for the same architecture at its random initialisation. ``--data PATH``
takes an ImageFolder directory instead. Under ``torchrun`` it trains with DistributedDataParallel;
the SIGReg module all-reduces its sums itself, so the loss is that of the global batch.

Modules: :mod:`.options` (command line, defaults, what may change on resume), :mod:`.data`
(datasets, views, sample order), :mod:`.train` (the run), :mod:`.checkpoint` (exact resume),
:mod:`.files` (atomic writes), :mod:`.probe` (linear probe), :mod:`.command` (the subcommand).

Example::

    lejepa-kernels pretrain --out run.json
    torchrun --nproc_per_node 8 -m lejepa_kernels pretrain --data /imagenet/train --model vit_small_patch16_224
"""

from .command import add_parser
from .options import UsageError
from .probe import embed, linear_probe
from .train import pretrain

__all__ = ["UsageError", "add_parser", "embed", "linear_probe", "pretrain"]
