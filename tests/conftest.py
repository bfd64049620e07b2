"""Test session set-up: without a GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is imported; the package imports triton only when a
kernel is first launched, so setting it here, before any test module runs, is early enough.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
