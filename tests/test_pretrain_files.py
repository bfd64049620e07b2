"""Output files of `lejepa-kernels pretrain` (--checkpoint, --out): checked before the run starts,
written atomically through fresh temporary files."""

import errno
import json
import os
import resource
import signal
import stat

import pytest
import torch
from test_pretrain import TINY, one_thread  # noqa: F401  (one_thread: a module-wide autouse fixture)

from lejepa_kernels.cli import main
from lejepa_kernels.lejepa import LeJEPA
from lejepa_kernels.pretrain import train


@pytest.fixture(autouse=True)
def no_probe(monkeypatch):
    """The probe is not under test here: a constant in its place saves seconds per run."""
    monkeypatch.setattr(train, "linear_probe", lambda *features: 0.5)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_links_at_the_output_paths_are_not_followed(tmp_path):
    # A link planted where a fixed temporary name would be, and one at --out itself.
    checkpoint, out = tmp_path / "run.pt", tmp_path / "run.json"
    for name in ("victim-1", "victim-2"):
        (tmp_path / name).write_text("precious")
    (tmp_path / "run.pt.tmp").symlink_to(tmp_path / "victim-1")
    out.symlink_to(tmp_path / "victim-2")
    assert main([*TINY, "--max-steps", "1", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert (tmp_path / "victim-1").read_text() == (tmp_path / "victim-2").read_text() == "precious"
    assert torch.load(checkpoint, weights_only=True)["step"] == 1
    assert not out.is_symlink() and json.loads(out.read_text())["steps"] == 1
    # Nothing else left behind, and the files get the usual mode (mkstemp's are private).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.pt", "run.pt.tmp", "victim-1", "victim-2"]
    for path in (checkpoint, out):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()


@pytest.fixture
def file_size_limit():
    """set(n_bytes): files this process writes stop growing at n_bytes, as on a full disk (a
    write past it is cut short; SIGXFSZ, which would kill the process, is ignored). Restored
    after the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda n_bytes: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def assert_failed_checkpoint_write(code: int, capsys, checkpoint) -> None:
    """Status 1, one line naming the checkpoint and the free space, and nothing else left
    behind: the previous checkpoint as it was, no temporary file."""
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lejepa-kernels pretrain: error: --checkpoint {checkpoint}: could not write it: ")
    assert line.endswith(" MiB free on its file system); any previous checkpoint there is unchanged")
    assert os.listdir(checkpoint.parent) == ["run.pt"]
    assert checkpoint.read_bytes() == b"previous checkpoint"


def test_a_short_checkpoint_write_is_one_line_and_leaves_the_previous_checkpoint(
    tmp_path, capsys, file_size_limit
):
    """A full disk cuts torch.save's writes short, which it reports as a RuntimeError
    ("unexpected pos ..."): the command says what failed in one line."""
    checkpoint = tmp_path / "run.pt"
    checkpoint.write_bytes(b"previous checkpoint")
    file_size_limit(100_000)  # the tiny run's checkpoint is about 1.4 MB
    code = main([*TINY, "--max-steps", "1", "--checkpoint", str(checkpoint)])
    assert_failed_checkpoint_write(code, capsys, checkpoint)


def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "run.pt"
    checkpoint.write_bytes(b"previous checkpoint")

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    code = main([*TINY, "--max-steps", "1", "--checkpoint", str(checkpoint)])
    assert_failed_checkpoint_write(code, capsys, checkpoint)


def output_options(tmp_path, option: str, path) -> list[str]:
    """--checkpoint and --out in tmp_path, but ``option`` at ``path``."""
    paths = {"--checkpoint": tmp_path / "run.pt", "--out": tmp_path / "run.json", option: path}
    return [text for pair in paths.items() for text in map(str, pair)]


def error_lines(capsys, monkeypatch, *argv: str) -> list[str]:
    """stderr of a command that must fail with status 2 before it trains."""

    def no_training(*args, **kwargs):
        pytest.fail("the command trained before it checked its output paths")

    monkeypatch.setattr(LeJEPA, "forward", no_training)
    try:
        code = main([*TINY, "--max-steps", "1", *argv])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("option", ["--checkpoint", "--out"])
def test_output_path_that_is_a_directory(tmp_path, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    argv = output_options(tmp_path, option, str(tmp_path))
    assert error_lines(capsys, monkeypatch, *argv) == [
        f"lejepa-kernels pretrain: error: {option} {tmp_path}: is a directory; give a file path"
    ]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option", ["--checkpoint", "--out"])
def test_output_path_under_a_file(tmp_path, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "run.pt"
    argv = output_options(tmp_path, option, str(path))
    assert error_lines(capsys, monkeypatch, *argv) == [
        f"lejepa-kernels pretrain: error: {option} {path}: {tmp_path / 'file'} is not a directory"
    ]
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("option", ["--checkpoint", "--out"])
def test_output_path_whose_directory_cannot_be_created(tmp_path, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    path = "/proc/lejepa-kernels-test/run.pt"  # /proc takes no new directory, not even from root
    argv = output_options(tmp_path, option, path)
    (line,) = error_lines(capsys, monkeypatch, *argv)
    assert line.startswith(
        f"lejepa-kernels pretrain: error: {option} {path}: cannot create a file in /proc/lejepa-kernels-test ("
    )
    assert os.listdir(tmp_path) == []
