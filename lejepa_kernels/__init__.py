"""lejepa_kernels: fast, memory-bounded SIGReg (sliced Epps-Pulley) for LeJEPA.

SIGReg compares the empirical characteristic function (ECF) of random 1-D projections of the
embeddings with the standard normal's; everything here turns on the ECF sums over rows,
`cos_sums` and `sin_sums` [slices, grid points] (docs/DESIGN.md).

The SIGReg module and functions need only torch; `LeJEPA` and `LeJEPAOutput` (the model, built
on timm) are imported when first used. The seed-faithful reference modules, which materialise
[N, S, T] tensors, are in `lejepa_kernels.reference`, not here. Drop-ins for the official LeJEPA
package's and lightly's APIs are in `lejepa_kernels.compat`; `swap_sigreg(model)` puts fused
modules in place of those (and of stable-pretraining's) inside an existing model.
"""

from .compat.swap import swap_sigreg
from .functional import ecf_sums, sliced_epps_pulley
from .modules import FusedSlicedEppsPulley

__all__ = [
    "FusedSlicedEppsPulley",
    "LeJEPA",
    "LeJEPAOutput",
    "ecf_sums",
    "sliced_epps_pulley",
    "swap_sigreg",
]
__version__ = "0.2.0"  # the one place it is written: pyproject.toml reads it at build time

_MODEL_NAMES = ("LeJEPA", "LeJEPAOutput")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from . import lejepa

        return getattr(lejepa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
