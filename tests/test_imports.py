"""What `import lejepa_kernels` costs: the SIGReg API imports and runs without the model's
dependencies."""

import subprocess
import sys


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
