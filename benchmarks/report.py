"""Turn a pytest-benchmark JSON file into results/<date>-<device>.{json,md,png}.

    pytest benchmarks --benchmark-json=/tmp/sigreg.json
    python benchmarks/report.py /tmp/sigreg.json

The markdown table gives, per workload and mode, each provider's median and interquartile
range, peak extra memory, speedup and memory ratio against the seed, and on a GPU the achieved
TFLOP/s and roofline fraction. The PNG (needs matplotlib: `pip install matplotlib`) plots the
forward+backward time and memory against the number of slices.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROVIDER_ORDER = ("seed", "seed_compiled", "fused", "fused_blockwise")


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows.append({**info, "median_ms": bench["stats"]["median"] * 1e3, "iqr_ms": bench["stats"]["iqr"] * 1e3})
    return data, rows


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def markdown(data: dict, rows: list[dict]) -> str:
    device = rows[0]["device"]
    date = data["datetime"][:10]
    versions = data.get("machine_info", {})
    lines = [
        f"# SIGReg benchmarks: {device}, {date}",
        "",
        f"Python {versions.get('python_version', '?')}; dtype {rows[0]['dtype']}; "
        "time is the median (and interquartile range) of the rounds; memory is the peak extra "
        "memory of one call (GPU: allocator peak; CPU: resident-set peak in a fresh process).",
        "",
        "| workload | N | D | S | mode | provider | median ms | IQR ms | speedup vs seed | peak extra MiB "
        "| memory vs seed | TFLOP/s | roofline |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seed_time = {
        (r["workload"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "seed" and r["status"] == "ok"
    }
    order = {p: i for i, p in enumerate(PROVIDER_ORDER)}
    for r in sorted(rows, key=lambda r: (r["s"], r["n"], r["mode"], order[r["provider"]])):
        key = (r["workload"], r["mode"])
        if r["status"] != "ok":
            cells = [r["status"]] + [""] * 7
        else:
            speedup = f"{seed_time[key] / r['median_ms']:.1f}x" if key in seed_time else ""
            cells = [
                f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}", speedup,
                _fmt(r.get("peak_extra_mib"), "{:.1f}"), _fmt(r.get("memory_vs_seed"), "{:.3f}"),
                _fmt(r.get("tflops"), "{:.1f}"), _fmt(r.get("roofline_fraction"), "{:.2f}"),
            ]
        lines.append(
            f"| {r['workload']} | {r['n']} | {r['d']} | {r['s']} | {r['mode']} | {r['provider']} | "
            + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "" if value is None else spec.format(value)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    step = [r for r in rows if r["mode"] == "forward+backward" and r["status"] == "ok"]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for provider in PROVIDER_ORDER:
        mine = sorted((r for r in step if r["provider"] == provider), key=lambda r: r["s"])
        if not mine:
            continue
        slices = [r["s"] for r in mine]
        ax_time.plot(slices, [r["median_ms"] for r in mine], marker="o", label=provider)
        with_memory = [r for r in mine if r.get("peak_extra_mib") is not None]
        ax_mem.plot(
            [r["s"] for r in with_memory], [r["peak_extra_mib"] for r in with_memory], marker="o", label=provider
        )
    for ax, label in ((ax_time, "forward+backward median (ms)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("slices S")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SIGReg, {rows[0]['device']} ({', '.join(sorted({r['workload'] for r in step}))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data, rows = load_rows(args.json)
    stem = args.out_dir / f"{data['datetime'][:10]}-{slug(rows[0]['device'])}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.json.resolve() != stem.with_suffix(".json").resolve():
        shutil.copyfile(args.json, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(markdown(data, rows))
    wrote_png = plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if wrote_png else " (no matplotlib: no PNG)"))


if __name__ == "__main__":
    main()
