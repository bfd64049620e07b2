"""Triton kernels, one file each with its launcher: `forward.ecf_forward`, `backward.ecf_backward`."""

from .backward import ecf_backward
from .config import BACKWARD_CONFIGS, FORWARD_CONFIGS, KernelConfig
from .forward import ecf_forward

__all__ = ["BACKWARD_CONFIGS", "FORWARD_CONFIGS", "KernelConfig", "ecf_backward", "ecf_forward"]
