"""Does it pay? Slice count and SIGReg options, pretrained and probed on the digits.

    python benchmarks/study.py                      # the grid, then the timing, then the results
    python benchmarks/study.py --report-only        # the results again from what ./study-runs holds

The grid: every option of OPTIONS at every slice count of SLICES, for 3 seeds, each one
`lejepa-kernels pretrain` on the digits default with a shortened schedule (--epochs, a whole
warmup-and-cosine schedule of that length). Each run is its own process with a fixed thread count
(--threads; 2 runs at once with --jobs 2), so the numbers depend on the hardware and the thread
count only. Runs finish in `--work` (default ./study-runs): a run with its record there is done,
one with a checkpoint continues from it (`pretrain --resume`, exactly the uninterrupted run), so a
stopped study goes on where it stopped when started again with the same command.

The timing: one process per SIGReg implementation and slice count times training steps of the
same model on views of the same shapes (the seed's module where its [rows, slices, 17] tensors
fit in --reference-memory-gib, the fused module on the PyTorch path, the fused default).

Results in --results: `<date>-study-<machine>.json` (every run, every timing), `.md` (tables) and
two plots: probe accuracy against the slice count (`-probe.png`) and seconds per step (`-speed.png`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from lejepa_kernels.atomic_file import atomic_write
from lejepa_kernels.check import write_json

SLICES = (64, 256, 1024, 4096, 16384, 65536)
OPTIONS = {
    "seed": ("the seed (concat views, plug-in statistic, seed directions)", []),
    "per_view": ("per-view statistics", ["--sigreg-views", "per_view"]),
    "unbiased": ("unbiased statistic", ["--unbiased"]),
    "orthogonal": ("orthogonal seed directions", ["--orthogonal"]),
    "blockwise": ("blockwise directions", ["--directions", "blockwise"]),
    "blockwise_orthogonal": ("orthogonal blockwise directions", ["--directions", "blockwise", "--orthogonal"]),
}
"""name -> (label, pretrain options): one change each from the seed's SIGReg, or two for the last."""
IMPLEMENTATIONS = {
    "reference": "the seed's module",
    "torch": "fused, PyTorch path",
    "fused": "fused, default backend",
}
"""The SIGReg implementations of the timing, by the name the timing process takes."""
RECORD_KEYS = (
    "probe_accuracy", "random_init_probe_accuracy", "loss", "inv_loss", "sigreg_loss", "steps", "seconds",
)


@dataclass(frozen=True)
class Run:
    """One pretraining of the grid."""

    option: str
    slices: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.option}-S{self.slices}-seed{self.seed}"


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a child process that uses `threads` threads for torch and OpenMP."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_process(argv: list[str], threads: int, log: Path) -> tuple[int, float, float]:
    """Run argv with its output in `log`; returns (exit status, wall seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=thread_env(threads))
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux: KiB


def pretrain_run(run: Run, work: Path, epochs: int, threads: int) -> dict:
    """The record of `run`: read from `work` if it is done, else trained (or continued) first."""
    directory = work / run.name
    record_path = directory / "record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint, summary_path = directory / "checkpoint.pt", directory / "summary.json"
    argv = [sys.executable, "-m", "lejepa_kernels", "pretrain", "--epochs", str(epochs),
            "--num-slices", str(run.slices), "--seed", str(run.seed), *OPTIONS[run.option][1],
            "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(summary_path)]
    resumed = checkpoint.exists()
    if resumed:
        argv += ["--resume", str(checkpoint)]
    status, wall, peak_mib = run_process(argv, threads, directory / "log.txt")
    if status != 0:
        raise RuntimeError(f"{run.name} failed with status {status}: see {directory / 'log.txt'}")
    summary = json.loads(summary_path.read_text())
    train_seconds = sum(epoch["seconds"] for epoch in summary["history"])
    record = dict(
        option=run.option, num_slices=run.slices, seed=run.seed, epochs=epochs, threads=threads,
        **{key: summary[key] for key in RECORD_KEYS},
        seconds_per_step=train_seconds / summary["steps"],
        peak_rss_mib=None if resumed else peak_mib,  # a continued run's peak is that of its last part
        resumed=resumed,
    )
    write_json(record_path, record)
    checkpoint.unlink(missing_ok=True)
    return record


def time_steps(implementation: str, slices: int, steps: int) -> float:
    """Median seconds of a training step (forward, backward, AdamW) of the digits model with
    `implementation`'s SIGReg at `slices`, after 2 warm-up steps, on random views of the
    digits' shapes: 2 x [64, 3, 64, 64] and 6 x [64, 3, 32, 32]."""
    import torch

    from lejepa_kernels import FusedSlicedEppsPulley
    from lejepa_kernels.lejepa import LeJEPA

    torch.manual_seed(0)
    model = LeJEPA("test_vit", n_slices=slices, sigreg="reference" if implementation == "reference" else "fused")
    if implementation == "torch":
        model.sigreg = FusedSlicedEppsPulley(slices, backend="torch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    global_views = [torch.randn(64, 3, 64, 64) for _ in range(2)]
    local_views = [torch.randn(64, 3, 32, 32) for _ in range(6)]
    seconds = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad()
        model(global_views=global_views, local_views=local_views).loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[2:])


def reference_bytes(slices: int, rows: int = 512, points: int = 17) -> int:
    """About what the seed's module holds for a step: its [rows, slices, points] fp32 tensors,
    about 12 of them between its forward and backward."""
    return 12 * rows * slices * points * 4


def timing(
    implementation: str, slices: int, work: Path, threads: int, steps: int, limit_gib: float, measure: bool = True
) -> Optional[dict]:
    """The timing record of one implementation and slice count: from `work` if there, else
    measured (None if not `measure`); the seed's module is skipped where it would need more than
    limit_gib."""
    record = dict(implementation=implementation, num_slices=slices, threads=threads, steps=steps)
    if implementation == "reference" and reference_bytes(slices) > limit_gib * 2**30:
        return dict(record, seconds_per_step=None, peak_rss_mib=None,
                    skipped=f"needs about {reference_bytes(slices) / 2**30:.0f} GiB")
    path = work / "timing" / f"{implementation}-S{slices}.json"
    if path.exists():
        return json.loads(path.read_text())
    if not measure:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds_path, log = path.with_suffix(".seconds"), path.with_suffix(".log")
    argv = [sys.executable, __file__, "--time-one", implementation, str(slices), str(seconds_path),
            "--timing-steps", str(steps)]
    status, _, peak_mib = run_process(argv, threads, log)
    if status != 0:
        raise RuntimeError(f"timing {implementation} at {slices} slices failed: see {log}")
    record.update(seconds_per_step=float(seconds_path.read_text()), peak_rss_mib=peak_mib)
    write_json(path, record)
    return record


WORK_SETTINGS = ("epochs", "threads", "timing_steps", "timing_threads")
"""The options that a study's run directory holds results of: a study goes on only with the same."""


def check_work(args: argparse.Namespace) -> None:
    """Record WORK_SETTINGS in args.work/settings.json, or exit if it holds other values (its
    results would mix with these)."""
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "settings.json"
    wanted = {key: getattr(args, key) for key in WORK_SETTINGS}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != wanted:
            differing = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in WORK_SETTINGS if saved[k] != wanted[k])
            sys.exit(f"study: {args.work} holds a study run with {differing}: give the same, or another --work")
        return
    write_json(path, wanted)


def summarise(records: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """option -> slices -> mean, min, max and count of the probe accuracy over the seeds."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for record in records:
        table.setdefault(record["option"], {}).setdefault(record["num_slices"], []).append(record["probe_accuracy"])
    return {
        option: {s: dict(mean=statistics.fmean(v), min=min(v), max=max(v), n=len(v)) for s, v in sorted(by.items())}
        for option, by in table.items()
    }


def paired_differences(records: list[dict], baseline: str = "seed") -> dict[str, dict[int, dict[str, float]]]:
    """option -> slices -> mean and standard error of its probe accuracy minus `baseline`'s, paired
    by seed (the same initialisation, data order and views), over the seeds both have."""
    accuracy = {(r["option"], r["num_slices"], r["seed"]): r["probe_accuracy"] for r in records}
    table: dict[str, dict[int, dict[str, float]]] = {}
    for (option, slices, seed), value in sorted(accuracy.items()):
        if option != baseline and (baseline, slices, seed) in accuracy:
            table.setdefault(option, {}).setdefault(slices, []).append(value - accuracy[baseline, slices, seed])
    return {
        option: {
            s: dict(mean=statistics.fmean(d), se=statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None, n=len(d))
            for s, d in by.items()
        }
        for option, by in table.items()
    }


def plot_probe(records: list[dict], path: Path) -> None:
    """Probe accuracy against the slice count: the mean over the seeds and their range, per option."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for option, by_slices in summarise(records).items():
        xs = list(by_slices)
        line, = ax.plot(xs, [v["mean"] for v in by_slices.values()], marker="o", label=OPTIONS[option][0])
        ax.fill_between(xs, [v["min"] for v in by_slices.values()], [v["max"] for v in by_slices.values()],
                        color=line.get_color(), alpha=0.12)
    random_init = statistics.fmean(r["random_init_probe_accuracy"] for r in records)
    ax.axhline(random_init, color="grey", linestyle="--", label=f"random initialisation ({random_init:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("slices")
    ax.set_ylabel("linear probe accuracy (359 held-out digits)")
    ax.set_title("Probe accuracy: mean over seeds, band = their range")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speed(timings: list[dict], path: Path) -> None:
    """Seconds per training step against the slice count, per SIGReg implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for implementation, label in IMPLEMENTATIONS.items():
        points = [(t["num_slices"], t["seconds_per_step"]) for t in timings
                  if t["implementation"] == implementation and t["seconds_per_step"] is not None]
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("slices")
    ax.set_ylabel("seconds per training step")
    ax.set_title("LeJEPA training step on the digits (512 rows of 512 into SIGReg)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(records: list[dict], timings: list[dict], machine: str) -> str:
    """Tables of the study: probe accuracy per option and slice count, then the timing."""
    table = summarise(records)
    slices = sorted({r["num_slices"] for r in records})
    lines = [f"# SIGReg study on the digits ({machine})", "",
             "Probe accuracy, mean over seeds [min, max]:", "",
             "| option | " + " | ".join(str(s) for s in slices) + " |",
             "| --- |" + " ---: |" * len(slices)]
    for option, by_slices in table.items():
        cells = [f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" if (v := by_slices.get(s)) else "" for s in slices]
        lines.append(f"| {OPTIONS[option][0]} | " + " | ".join(cells) + " |")
    lines += ["", "Probe accuracy minus the seed's, paired by seed: mean ± standard error:", "",
              "| option | " + " | ".join(str(s) for s in slices) + " |", "| --- |" + " ---: |" * len(slices)]
    for option, by_slices in paired_differences(records).items():
        cells = [
            f"{v['mean']:+.3f} ± {v['se']:.3f}" if (v := by_slices.get(s)) and v["se"] is not None
            else f"{v['mean']:+.3f}" if v else ""
            for s in slices
        ]
        lines.append(f"| {OPTIONS[option][0]} | " + " | ".join(cells) + " |")
    random_init = sorted({round(r["random_init_probe_accuracy"], 4) for r in records})
    lines += ["", f"Random initialisation: {', '.join(f'{a:.3f}' for a in random_init)} (one per seed).", "",
              "Seconds per training step (median) and peak RSS of the timing process:", "",
              "| implementation | slices | s/step | peak RSS (MiB) |", "| --- | ---: | ---: | ---: |"]
    for t in sorted(timings, key=lambda t: (list(IMPLEMENTATIONS).index(t["implementation"]), t["num_slices"])):
        seconds = f"{t['seconds_per_step']:.3f}" if t["seconds_per_step"] is not None else t["skipped"]
        peak = f"{t['peak_rss_mib']:.0f}" if t["peak_rss_mib"] is not None else ""
        lines.append(f"| {IMPLEMENTATIONS[t['implementation']]} | {t['num_slices']} | {seconds} | {peak} |")
    return "\n".join(lines) + "\n"


def machine_name() -> str:
    """This machine in result names: its architecture and core count."""
    return f"cpu-{platform.machine().replace('_', '-').lower()}-{os.cpu_count()}-cores"


def write_results(args: argparse.Namespace, records: list[dict], timings: list[dict]) -> Path:
    """The JSON, markdown and plots of the study in args.results; returns the JSON's path."""
    import torch

    from lejepa_kernels import cpu_backend

    machine = machine_name()
    stem = args.results / f"{datetime.date.today().isoformat()}-study-{machine}"
    args.results.mkdir(parents=True, exist_ok=True)
    data = dict(
        machine=machine, processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        torch=torch.__version__, python=platform.python_version(),
        cpu_kernel=cpu_backend.unavailable() or "built",  # else "auto" takes the PyTorch path: other roundings
        epochs=args.epochs, threads=args.threads,
        jobs=args.jobs,
        command=" ".join(["python", "benchmarks/study.py", *(a for a in sys.argv[1:] if a != "--report-only")]),
        options={name: dict(label=label, argv=argv) for name, (label, argv) in OPTIONS.items()},
        runs=records, timings=timings, probe_accuracy=summarise(records),
        difference_from_seed=paired_differences(records),
    )
    write_json(stem.with_suffix(".json"), data)
    atomic_write(stem.with_suffix(".md"), lambda f: f.write(markdown(records, timings, machine).encode()))
    if records:
        plot_probe(records, Path(f"{stem}-probe.png"))
    if any(t["seconds_per_step"] is not None for t in timings):
        plot_speed(timings, Path(f"{stem}-speed.png"))
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("study-runs"), help="run directory (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default: %(default)s)")
    parser.add_argument("--slices", type=int, nargs="+", default=list(SLICES))
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (default: %(default)s)")
    parser.add_argument("--timing-steps", type=int, default=5, help="timed steps (default: %(default)s)")
    parser.add_argument("--timing-threads", type=int, default=os.cpu_count() or 1,
                        help="threads of the timing processes, run one at a time (default: the cores)")
    parser.add_argument("--reference-memory-gib", type=float, default=8.0,
                        help="time the seed's module where it needs less (default: %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="only write the results from --work")
    parser.add_argument("--time-one", nargs=3, metavar=("IMPLEMENTATION", "SLICES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_one is not None:
        implementation, slices, out = args.time_one
        seconds = time_steps(implementation, int(slices), args.timing_steps)
        atomic_write(Path(out), lambda file: file.write(f"{seconds!r}\n".encode()))
        return

    check_work(args)
    runs = [Run(option, s, seed) for seed in range(args.seeds) for option in args.options for s in args.slices]
    pairs = [(i, s) for i in IMPLEMENTATIONS for s in args.slices]
    if args.report_only:  # the grid's runs and timings that are done
        records = [json.loads(p.read_text()) for run in runs if (p := args.work / run.name / "record.json").exists()]
        timings = [
            record for i, s in pairs
            if (record := timing(i, s, args.work, args.timing_threads, args.timing_steps, args.reference_memory_gib,
                                 measure=False)) is not None
        ]
    else:
        with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(runs), desc="runs") as bar:
            futures = [pool.submit(pretrain_run, run, args.work, args.epochs, args.threads) for run in runs]
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:  # a failed run, Ctrl-C: start no other run (those running finish)
                pool.shutdown(cancel_futures=True)
                raise
            records = [future.result() for future in futures]
        timings = [timing(i, s, args.work, args.timing_threads, args.timing_steps, args.reference_memory_gib)
                   for i, s in tqdm(pairs, desc="timing")]
    print(f"results: {write_results(args, records, timings)}")


if __name__ == "__main__":
    main()
