"""Exact resume of `lejepa-kernels pretrain`: a run stopped at any step (--max-steps, Ctrl-C) and
resumed gives the per-step losses of the uninterrupted run; the options that define a run cannot
change on resume."""

import argparse
import json
import random
import signal

import pytest
import torch
from test_pretrain import TINY, one_thread  # noqa: F401  (one_thread: a module-wide autouse fixture)

from lejepa_kernels.cli import main
from lejepa_kernels.lejepa import LeJEPA
from lejepa_kernels.pretrain import add_parser, checkpoint, train
from lejepa_kernels.pretrain.options import FREE_ON_RESUME, RUN_SETTINGS

# The tiny run with 256 images per step: 5 steps per epoch of the 1,438 training images, so that a
# few steps cross an epoch boundary. The schedule spans the 2 epochs; the runs stop at STEPS. On the
# CPU, whose kernels are deterministic (exactness holds on one device; CUDA kernels need not be).
DEVICE = ["--device", "cpu"]
RUN = [*TINY, *DEVICE, "--batch-size", "256", "--epochs", "2"]
STEPS_PER_EPOCH, STEPS = 5, 7


@pytest.fixture(scope="module", autouse=True)
def no_probe():
    """The probe is not under test here: a constant in its place saves seconds per run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "linear_probe", lambda *features: 0.5)
        yield


def spy_on_saves(patch: pytest.MonkeyPatch) -> list[int]:
    """The steps of the checkpoints written from now on, in order."""
    steps = []
    save = checkpoint.save_checkpoint

    def recording_save(path, state):
        steps.append(state["step"])
        save(path, state)

    patch.setattr(train, "save_checkpoint", recording_save)
    return steps


def run(directory, name: str, *argv: str, base=RUN) -> dict:
    out = directory / f"{name}.json"
    assert main([*base, "--checkpoint", str(directory / f"{name}.pt"), "--out", str(out), *argv]) == 0
    return json.loads(out.read_text())


def resume(directory, name: str, saved, *argv: str) -> dict:
    """Resume ``saved`` with no run option: they all come from the checkpoint."""
    return run(directory, name, "--resume", str(saved), *argv, base=["pretrain", *DEVICE])


def without_seconds(history: list) -> list:
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(directory, summary, steps of its checkpoints) of the run of STEPS steps in one go."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        saves = spy_on_saves(patch)
        summary = run(directory, "uninterrupted", "--max-steps", str(STEPS))
    return directory, summary, saves


def test_uninterrupted_run(uninterrupted):
    _, summary, saves = uninterrupted
    assert summary["steps"] == STEPS and len(summary["step_losses"]) == STEPS
    # Only finished epochs are recorded; the summary's means are over the epoch in progress.
    assert [(h["epoch"], h["step"]) for h in summary["history"]] == [(1, STEPS_PER_EPOCH)]
    assert summary["history"][0]["loss"] == pytest.approx(sum(summary["step_losses"][:STEPS_PER_EPOCH]) / 5)
    assert summary["loss"] == pytest.approx(sum(summary["step_losses"][STEPS_PER_EPOCH:]) / 2)
    # --max-steps only stops the run: the learning rate follows the 2-epoch schedule (cosine, no warmup).
    assert summary["history"][0]["lr"] == pytest.approx(1e-4 * 0.5)
    # Checkpoints at the end of each epoch, and where the run stops.
    assert saves == [STEPS_PER_EPOCH, STEPS]


@pytest.mark.parametrize("stop", [3, STEPS_PER_EPOCH], ids=["mid-epoch", "epoch-end"])
def test_stopped_and_resumed_run_is_the_uninterrupted_one(tmp_path, uninterrupted, stop):
    _, expected, _ = uninterrupted
    stopped = run(tmp_path, "stopped", "--max-steps", str(stop))
    assert stopped["step_losses"] == expected["step_losses"][:stop]
    state = torch.load(tmp_path / "stopped.pt", weights_only=True)
    assert state["step"] == stop and state["model"]["sigreg.global_step"].item() == stop

    resumed = resume(tmp_path, "resumed", tmp_path / "stopped.pt", "--max-steps", str(STEPS))
    assert resumed["step_losses"] == expected["step_losses"]
    assert without_seconds(resumed["history"]) == without_seconds(expected["history"])
    assert resumed["loss"] == expected["loss"]
    state = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert state["step"] == STEPS and state["model"]["sigreg.global_step"].item() == STEPS


def interrupt_during_step(patch: pytest.MonkeyPatch, step: int) -> None:
    """Send this process a SIGINT (Ctrl-C) at the start of the forward of training step ``step``."""
    forward, calls = LeJEPA.forward, []

    def forward_interrupted(self, *args, **kwargs):
        if self.training:
            calls.append(None)
            if len(calls) == step:
                signal.raise_signal(signal.SIGINT)
        return forward(self, *args, **kwargs)

    patch.setattr(LeJEPA, "forward", forward_interrupted)


def test_ctrl_c_writes_a_checkpoint_and_the_resumed_run_is_the_uninterrupted_one(
    tmp_path, capsys, monkeypatch, uninterrupted
):
    _, expected, _ = uninterrupted
    handler = signal.getsignal(signal.SIGINT)
    saves = spy_on_saves(monkeypatch)
    interrupt_during_step(monkeypatch, 3)
    argv = [*RUN, "--checkpoint", str(tmp_path / "stopped.pt"), "--checkpoint-every", "2"]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C raised KeyboardInterrupt out of the command")
    assert code == 130
    assert signal.getsignal(signal.SIGINT) is handler
    # The step under way finishes; its checkpoint joins the one of --checkpoint-every 2.
    assert saves == [2, 3]
    err = capsys.readouterr().err
    assert f"stopped at step 3 of 10 (epoch 1, after batch 3 of 5); checkpoint {tmp_path / 'stopped.pt'}" in err
    monkeypatch.undo()

    resumed = resume(tmp_path, "resumed", tmp_path / "stopped.pt", "--max-steps", str(STEPS))
    assert resumed["step_losses"] == expected["step_losses"]


def test_the_numbers_do_not_depend_on_the_workers(tmp_path, uninterrupted):
    _, expected, _ = uninterrupted
    with_workers = run(tmp_path, "workers", "--max-steps", "2", "--workers", "2")
    assert with_workers["step_losses"] == expected["step_losses"][:2]


def test_options_that_define_the_run_cannot_change_on_resume(tmp_path, capsys, uninterrupted):
    directory, _, _ = uninterrupted
    saved = directory / "uninterrupted.pt"
    code = main([*RUN, "--lr", "2e-4", "--seed", "1", "--resume", str(saved), "--max-steps", "8",
                 "--checkpoint", str(tmp_path / "changed.pt")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lejepa-kernels pretrain: error: --resume {saved}: options differ from the saved run: "
        "--lr 0.0002 (saved: 0.0001), --seed 1 (saved: 0); leave them out to resume, or start a new run "
        "without --resume"
    ]
    assert not (tmp_path / "changed.pt").exists()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here")),
])
def test_generator_states_are_restored(device):
    device = torch.device(device)
    state = checkpoint.rng_state(device)
    expected = torch.rand(3), torch.rand(3, device=device), random.random()
    torch.rand(3), torch.rand(3, device=device), random.random()
    checkpoint.set_rng_state(state, device)
    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.rand(3, device=device), expected[1])
    assert random.random() == expected[2]


def test_every_option_defines_the_run_or_may_change_on_resume():
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    options = {action.dest for action in parser._actions} - {"help"}
    assert options == set(RUN_SETTINGS) | set(FREE_ON_RESUME)
    assert not set(RUN_SETTINGS) & set(FREE_ON_RESUME)


def test_loss_options_are_saved_and_checked_on_resume():
    """--sigreg-views and --loss-weighting define the run: refused when they differ from the
    checkpoint's; a checkpoint saved before they existed resumes as concat / seed."""
    from lejepa_kernels.pretrain.options import UsageError, resolve

    parse = add_parser(argparse.ArgumentParser().add_subparsers()).parse_args
    fresh = resolve(parse(["--sigreg-views", "per_view", "--loss-weighting", "paper"]))
    saved = {key: getattr(fresh, key) for key in RUN_SETTINGS}
    assert (saved["sigreg_views"], saved["loss_weighting"]) == ("per_view", "paper")
    with pytest.raises(UsageError, match=r"--sigreg-views concat \(saved: per_view\)"):
        resolve(parse(["--sigreg-views", "concat", "--resume", "x.pt"]), saved)
    older = {key: value for key, value in saved.items() if key not in ("sigreg_views", "loss_weighting")}
    resumed = resolve(parse(["--resume", "x.pt"]), older)
    assert (resumed.sigreg_views, resumed.loss_weighting) == ("concat", "seed")
    with pytest.raises(UsageError, match="--lamb must be <= 1"):
        resolve(parse(["--loss-weighting", "paper", "--lamb", "2"]))
