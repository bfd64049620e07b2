"""benchmarks/study.py: a stopped study goes on where it stopped (a finished run is read, a run
with a checkpoint continues from it), a failed run stops it, and its results hold every run with
the statistics over seeds. The pretraining is a stand-in here: the real grid takes an hour."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import study  # noqa: E402


def stand_in(calls, status=0):
    """A `run_process` that records its argv and writes a pretrain summary whose probe accuracy
    encodes the slice count, the seed and (for blockwise directions) the option."""

    def run_process(argv, threads, log):
        calls.append(argv)
        value = {flag: argv[argv.index(flag) + 1] for flag in ("--num-slices", "--seed", "--out")}
        summary = dict(
            probe_accuracy=0.8 + int(value["--seed"]) * (0.02 if "blockwise" in argv else 0.01)
            + int(value["--num-slices"]) / 1e5,
            random_init_probe_accuracy=0.7, loss=1.5, inv_loss=0.5, sigreg_loss=50.0, steps=4, seconds=9.0,
            history=[dict(seconds=1.0), dict(seconds=3.0)],
        )
        Path(value["--out"]).write_text(json.dumps(summary))
        return status, 9.0, 321.0

    return run_process


def test_finished_runs_are_read_and_checkpointed_ones_continue(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(study, "run_process", stand_in(calls))
    done, stopped, fresh = (study.Run("seed", 64, 0), study.Run("unbiased", 64, 1), study.Run("per_view", 256, 2))
    (tmp_path / done.name).mkdir()
    (tmp_path / done.name / "record.json").write_text(json.dumps(dict(option="seed", probe_accuracy=0.5)))
    (tmp_path / stopped.name).mkdir()
    (tmp_path / stopped.name / "checkpoint.pt").write_bytes(b"saved")

    assert study.pretrain_run(done, tmp_path, epochs=3, threads=1) == dict(option="seed", probe_accuracy=0.5)
    assert calls == []
    resumed = study.pretrain_run(stopped, tmp_path, epochs=3, threads=1)
    assert calls[-1][-2:] == ["--resume", str(tmp_path / stopped.name / "checkpoint.pt")]
    assert "--unbiased" in calls[-1] and calls[-1][calls[-1].index("--epochs") + 1] == "3"
    assert resumed["resumed"] and resumed["peak_rss_mib"] is None  # the peak of a part is not the run's
    assert not (tmp_path / stopped.name / "checkpoint.pt").exists()
    record = study.pretrain_run(fresh, tmp_path, epochs=3, threads=1)
    assert "--resume" not in calls[-1] and calls[-1][calls[-1].index("--sigreg-views") + 1] == "per_view"
    assert record["seconds_per_step"] == 1.0 and record["peak_rss_mib"] == 321.0 and not record["resumed"]
    assert record["probe_accuracy"] == pytest.approx(0.8 + 0.02 + 256e-5)
    assert json.loads((tmp_path / fresh.name / "record.json").read_text()) == record


def test_a_failed_run_stops_the_study(monkeypatch, tmp_path):
    monkeypatch.setattr(study, "run_process", stand_in([], status=1))
    run = study.Run("seed", 64, 0)
    with pytest.raises(RuntimeError, match="seed-S64-seed0 failed with status 1"):
        study.pretrain_run(run, tmp_path, epochs=1, threads=1)
    assert not (tmp_path / run.name / "record.json").exists()


def test_results_hold_every_run_and_the_statistics_over_seeds(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")  # the bench extra's: the plots
    monkeypatch.setattr(study, "run_process", stand_in([]))
    runs = [study.Run(option, s, seed) for option in ("seed", "blockwise") for s in (64, 256) for seed in range(3)]
    records = [study.pretrain_run(run, tmp_path / "work", epochs=1, threads=1) for run in runs]
    summary = study.summarise(records)
    assert summary["blockwise"][256] == dict(
        mean=pytest.approx(0.82 + 256e-5), min=pytest.approx(0.8 + 256e-5), max=pytest.approx(0.84 + 256e-5), n=3
    )
    difference = study.paired_differences(records)["blockwise"][64]  # 0, 0.01, 0.02 over the seeds
    assert difference == dict(mean=pytest.approx(0.01), se=pytest.approx(0.01 / 3**0.5), n=3)
    too_big = study.timing("reference", 1 << 20, tmp_path / "work", threads=1, steps=1, limit_gib=8.0)
    assert too_big["seconds_per_step"] is None and too_big["skipped"].startswith("needs about")
    args = argparse.Namespace(results=tmp_path / "results", epochs=1, threads=1, jobs=2)
    timed = dict(implementation="fused", num_slices=64, threads=1, steps=1, seconds_per_step=0.25, peak_rss_mib=900.0)
    path = study.write_results(args, records, [too_big, timed])
    data = json.loads(path.read_text())
    assert len(data["runs"]) == 12 and data["timings"] == [too_big, timed] and data["options"]["blockwise"]["argv"]
    table = path.with_suffix(".md").read_text()
    assert "| the seed's module | 1048576 | needs about 408 GiB |  |" in table
    assert "| fused, default backend | 64 | 0.250 | 900 |" in table
    assert "| blockwise directions | 0.821 [0.801, 0.841] | 0.823 [0.803, 0.843] |" in table
    assert "| blockwise directions | +0.010 ± 0.006 | +0.010 ± 0.006 |" in table
    assert Path(f"{path.with_suffix('')}-probe.png").stat().st_size > 0
    assert Path(f"{path.with_suffix('')}-speed.png").stat().st_size > 0


def test_a_study_goes_on_only_with_its_settings_and_reports_its_grid(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(study, "run_process", stand_in([]))
    work = ["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    for run in (study.Run("seed", 64, 0), study.Run("unbiased", 64, 0)):
        study.pretrain_run(run, tmp_path / "work", epochs=3, threads=1)
    reported = []
    monkeypatch.setattr(study, "write_results", lambda args, records, timings: reported.append(records) or "out")
    study.main([*work, "--report-only", "--options", "seed", "--slices", "64", "--seeds", "1"])
    assert [(r["option"], r["num_slices"], r["seed"]) for r in reported[-1]] == [("seed", 64, 0)]  # the grid's only
    with pytest.raises(SystemExit, match="holds a study run with --epochs 3: give the same, or another --work"):
        study.main([*work, "--report-only", "--epochs", "5"])


def test_timing_skips_the_seed_module_where_it_would_not_fit(tmp_path):
    skipped = study.timing("reference", 1 << 16, tmp_path, threads=1, steps=1, limit_gib=1.0, measure=False)
    assert skipped["skipped"] == "needs about 26 GiB" and not (tmp_path / "timing").exists()
    assert study.timing("fused", 1 << 16, tmp_path, threads=1, steps=1, limit_gib=1.0, measure=False) is None
