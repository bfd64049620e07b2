"""``python -m lejepa_kernels``: the ``lejepa-kernels`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
