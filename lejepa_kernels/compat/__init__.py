"""Drop-ins for other SIGReg APIs, computed by this package's fused paths.

- `lejepa_kernels.compat.lejepa`: the official LeJEPA package's `EppsPulley` and
  `SlicingUnivariateTest` (github.com/rbalestr-lab/lejepa).
- `lejepa_kernels.compat.lightly`: lightly's `SIGReg` (lightly/loss/lejepa_loss.py).
- `lejepa_kernels.swap_sigreg(model)`: replaces those modules, and stable-pretraining's
  `SlicedEppsPulley`, inside an existing model, in place.

Each submodule is imported on its own (`from lejepa_kernels.compat.lightly import SIGReg`).
"""
