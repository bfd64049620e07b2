"""``python -m lejepa_kernels``: the ``lejepa-kernels`` command line."""

from .pretrain import main

raise SystemExit(main())
