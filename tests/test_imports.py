"""What `import lejepa_kernels` costs: the SIGReg API imports and runs without the model's
dependencies, and the import loads no compiler stack, touches no CUDA and builds no kernel."""

import os
import subprocess
import sys

import torch

from lejepa_kernels import backends


def test_sigreg_without_timm():
    script = (
        "import sys\n"
        "sys.modules['timm'] = None  # any import of timm now fails\n"
        "import torch, lejepa_kernels as lk\n"
        "assert 'lejepa_kernels.lejepa' not in sys.modules\n"
        "x = torch.randn(9, 4, requires_grad=True)\n"
        "lk.FusedSlicedEppsPulley(8, backend='torch')(x).backward()\n"
        "lk.sliced_epps_pulley(x, 0, 8, backend='torch')\n"
        "try:\n"
        "    lk.LeJEPA\n"
        "except ImportError as error:\n"
        "    print('refused:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout and "timm" in result.stdout


def test_import_loads_no_compiler_stack_cuda_or_kernel(tmp_path):
    cache = tmp_path / "kernel-cache"
    script = (
        "import sys, torch, lejepa_kernels\n"
        "from lejepa_kernels import cpu_library\n"
        "heavy = ('triton', 'timm', 'torch._dynamo', 'torch._inductor', 'lejepa_kernels.kernels')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
        "print(torch.cuda.is_initialized())\n"
        "print(cpu_library.library.cache_info().currsize, cpu_library.unavailable_reason.cache_info().currsize)\n"
    )
    env = {**os.environ, "LEJEPA_KERNELS_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["[]", "False", "0 0"]
    assert not cache.exists()  # the kernel is neither built nor looked up


def test_backend_availability_carries_the_compile_constant_mark():
    """backends._unavailable carries what torch.compiler.assume_constant_result would set (the
    fullgraph tests of test_modules.py fail without it)."""

    def probe():
        pass

    torch.compiler.assume_constant_result(probe)
    assert vars(probe) and vars(probe).items() <= vars(backends._unavailable).items()
