"""lejepa_kernels: fast, memory-bounded SIGReg (sliced Epps-Pulley) for LeJEPA."""

from .functional import ecf_sums, sliced_epps_pulley
from .lejepa import LeJEPA, LeJEPAOutput
from .modules import EppsPulley, FusedSlicedEppsPulley, SlicedEppsPulley

__all__ = [
    "EppsPulley",
    "FusedSlicedEppsPulley",
    "LeJEPA",
    "LeJEPAOutput",
    "SlicedEppsPulley",
    "ecf_sums",
    "sliced_epps_pulley",
]
__version__ = "0.1.0"
