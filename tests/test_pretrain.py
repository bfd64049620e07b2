"""Tests of `lejepa-kernels pretrain` (lejepa_kernels.pretrain): tiny runs on the bundled digits, the
command line and its errors. Exact resume: test_pretrain_resume.py; output files:
test_pretrain_files.py (both share TINY and one_thread from here)."""

import json
import subprocess
import sys

import pytest
import torch

from lejepa_kernels.cli import main
from lejepa_kernels.pretrain import linear_probe

# test_vit (0.3M parameters) at 32/16 px, 2 local views, 64 slices: a step takes a fraction of a second.
# With so few rows (4 views x 32) the SIGReg term weighs little at first, and a full-size learning
# rate makes it rise for a few dozen steps before it falls; a larger weight and a small constant
# rate show the descent within 20 steps.
TINY = ["pretrain", "--model", "test_vit", "--image-size", "32", "--local-size", "16", "--local-views", "2",
        "--batch-size", "32", "--num-slices", "64", "--lamb", "0.1", "--lr", "1e-4", "--warmup", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny runs gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP
    # threads waiting for each other made them 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(directory, name: str, *extra: str) -> dict:
    out = directory / f"{name}.json"
    assert main([*TINY, "--checkpoint", str(directory / f"{name}.pt"), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smoke")
    run(directory, "smoke", "--epochs", "1", "--max-steps", "20")
    return directory


@pytest.fixture(scope="module")
def smoke(smoke_dir) -> dict:
    return json.loads((smoke_dir / "smoke.json").read_text())


def test_summary_fields(smoke):
    for key in ("probe_accuracy", "random_init_probe_accuracy"):
        assert 0.0 <= smoke[key] <= 1.0
    assert smoke["num_slices"] == 64
    assert smoke["seconds"] > 0
    assert smoke["steps"] == 20 and len(smoke["step_losses"]) == 20
    for key in ("loss", "inv_loss", "sigreg_loss"):
        assert isinstance(smoke[key], float) and smoke[key] >= 0
    assert smoke["loss"] == pytest.approx(smoke["inv_loss"] + 0.1 * smoke["sigreg_loss"], rel=1e-5)
    assert smoke["held_out_images"] + smoke["train_images"] == 1797
    # 20 of the epoch's 44 steps: no finished epoch to record; the means are over those 20 steps.
    assert smoke["history"] == []
    assert smoke["loss"] == pytest.approx(sum(smoke["step_losses"]) / 20)


def test_loss_goes_down(smoke):
    losses = smoke["step_losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_linear_probe_separable():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float()
    assert linear_probe(x[:150], y[:150], x[150:], y[150:]) == 1.0


def error_of(capsys, *argv: str) -> str:
    """stderr of ``lejepa-kernels pretrain *argv``, which must fail with status 2: argparse exits
    with it, the command's own checks return it."""
    try:
        code = main(["pretrain", *argv])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs: must be a positive integer, got 0"),
        (["--batch-size", "-4"], "--batch-size: must be a positive integer, got -4"),
        (["--num-slices", "0"], "--num-slices: must be a positive integer, got 0"),
        (["--image-size", "0"], "--image-size: must be a positive integer, got 0"),
        (["--lamb", "-1"], "--lamb: must be a finite number >= 0.0"),
        (["--sigreg", "triton"], "invalid choice: 'triton'"),
    ],
)
def test_bad_option_values(capsys, argv, message):
    assert message in error_of(capsys, *argv)


def test_bad_data_path(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    assert f"--data {missing}: no such directory" in error_of(capsys, "--data", str(missing))
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    assert "not an ImageFolder of images" in error_of(capsys, "--data", str(tmp_path / "empty"), "--model", "test_vit")


def test_unknown_model(capsys):
    err = error_of(capsys, "--model", "no_such_model_xyz")
    assert "--model no_such_model_xyz: unknown timm model name" in err


def test_view_size_the_model_cannot_take(capsys):
    err = error_of(capsys, "--model", "test_convnext", "--image-size", "32", "--local-size", "8")
    assert "cannot take 8x8 px views" in err


def test_batch_larger_than_the_data(capsys):
    err = error_of(capsys, *TINY[1:], "--batch-size", "5000")
    assert "--batch-size 5000 is larger than the 1438 training images" in err


def test_bad_resume_file(capsys, tmp_path, smoke_dir):
    err = error_of(capsys, *TINY[1:], "--resume", str(tmp_path / "none.pt"))
    assert "no such checkpoint file" in err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    err = error_of(capsys, *TINY[1:], "--resume", str(tmp_path / "junk.pt"))
    assert "not a checkpoint of lejepa-kernels pretrain" in err
    err = error_of(capsys, *TINY[1:], "--model", "test_byobnet", "--resume", str(smoke_dir / "smoke.pt"))
    assert "options differ from the saved run: --model test_byobnet (saved: test_vit)" in err
    # A checkpoint of the first format (no random-number state, no position in the epoch).
    state = torch.load(smoke_dir / "smoke.pt", weights_only=True)
    del state["format"], state["rng"]
    state["args"] = state.pop("settings")
    torch.save(state, tmp_path / "old.pt")
    err = error_of(capsys, "--resume", str(tmp_path / "old.pt"))
    assert "written by an older lejepa-kernels pretrain (checkpoint format 1, this one reads 2)" in err


def test_no_command_prints_the_help(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lejepa-kernels") and "pretrain" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys):
    assert "CUDA is not available" in error_of(capsys, "--device", "cuda")


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lejepa_kernels", "pretrain", "--data", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    expected = f"lejepa-kernels pretrain: error: --data {tmp_path / 'nowhere'}: no such directory"
    assert proc.stderr.strip().splitlines() == [expected]


def test_orthogonal_and_unbiased_options(capsys):
    """Off by default and in checkpoints written before them; --x / --no-x; fused only."""
    import argparse

    from lejepa_kernels.pretrain.options import add_arguments, resolve

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = resolve(parser.parse_args([]))
    assert (default.orthogonal, default.unbiased) == (False, False)
    given = resolve(parser.parse_args(["--orthogonal", "--unbiased"]))
    assert (given.orthogonal, given.unbiased) == (True, True)
    assert resolve(parser.parse_args(["--no-unbiased"])).unbiased is False
    saved = vars(default)
    del saved["orthogonal"], saved["unbiased"]  # a checkpoint written before the options existed
    resumed = resolve(parser.parse_args([]), saved)
    assert (resumed.orthogonal, resumed.unbiased) == (False, False)
    for flag in ("--orthogonal", "--unbiased"):
        assert f"{flag} needs --sigreg fused" in error_of(capsys, flag, "--sigreg", "reference")
