"""Triton kernels, one file each with its launcher: `forward.ecf_forward`, `backward.ecf_backward`.

Glossary (the same names in the Python, Triton and C code; docs/DESIGN.md has the mathematics):

- N, D: rows and features of the embeddings x [N, D] (fp32, bf16 or fp16).
- S: slices, the random unit directions A [D, S] (fp32).
- T: grid points t [T]; dt: their spacing when t_k = k * dt (0.0 for any other grid).
- P = x @ A [N, S]: the projections, formed tile by tile and never stored whole.
- cos_sums, sin_sums [S, T]: the sums over rows of cos(t_k P) and sin(t_k P), the unnormalised
  empirical characteristic function (ECF) of each slice.
- dP [N, S]: the gradient with respect to P; the backward forms it per chunk of slices, then
  dx = dP @ A^T.
"""

from .backward import ecf_backward
from .config import BACKWARD_CANDIDATES, FORWARD_CANDIDATES, KernelConfig
from .forward import ecf_forward

__all__ = ["BACKWARD_CANDIDATES", "FORWARD_CANDIDATES", "KernelConfig", "ecf_backward", "ecf_forward"]
