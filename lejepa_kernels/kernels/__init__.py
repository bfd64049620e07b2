"""Triton kernels, one file each with its launcher: `ecf_forward` and `ecf_backward`."""

from .config import BACKWARD_CONFIGS, FORWARD_CONFIGS, KernelConfig
from .ecf_backward import ecf_backward
from .ecf_forward import ecf_forward

__all__ = ["BACKWARD_CONFIGS", "FORWARD_CONFIGS", "KernelConfig", "ecf_backward", "ecf_forward"]
