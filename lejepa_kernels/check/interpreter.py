"""The Triton kernels in Triton's CPU interpreter, checked in a child process.

TRITON_INTERPRET=1 must be set before triton is first imported, and importing torch's compile
machinery may import it, so the checks run in a fresh interpreter with the variable set:

    TRITON_INTERPRET=1 python -m lejepa_kernels.check.interpreter [--quick]

prints one JSON object per line, {"result": {...}}, as each check completes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULT_KEY = "result"
OUTPUT_TAIL_LINES = 20


def worker_command(quick: bool) -> list[str]:
    """The child's command line."""
    return [sys.executable, "-m", "lejepa_kernels.check.interpreter"] + (["--quick"] if quick else [])


def worker_environment() -> dict[str, str]:
    """This process's environment with TRITON_INTERPRET=1, and this package importable."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=package_root + (os.pathsep + path if path else ""),
    )


def start_interpreted(quick: bool) -> Iterator[dict[str, Any]]:
    """Start the child now; iterate to get each of its check results as it arrives, then a
    failed result describing the child's exit (with the end of its output) if it stopped early
    or failed."""
    from .cases import small_cases

    expected = len(small_cases("triton", "interpreter", quick))
    child = subprocess.Popen(
        worker_command(quick),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=worker_environment(),
    )
    return _results(child, expected)


def _results(child: subprocess.Popen, expected: int) -> Iterator[dict[str, Any]]:
    received = 0
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    with child:
        for line in child.stdout:
            message = _parse(line)
            if message is None:
                tail.append(line.rstrip())
                continue
            received += 1
            yield message
    if child.returncode != 0 or received != expected:
        yield dict(
            backend="triton",
            device="interpreter",
            description="interpreter process",
            passed=False,
            error=(
                f"exited with status {child.returncode} after {received} of {expected} checks"
                + ("; last output:\n" + "\n".join(tail) if tail else "")
            ),
        )


def _parse(line: str) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message.get(RESULT_KEY) if isinstance(message, dict) else None


def main(argv: list[str] | None = None) -> int:
    """Run the interpreter's check table, printing one JSON line per result."""
    parser = argparse.ArgumentParser(description="Triton interpreter checks (child process).")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("set TRITON_INTERPRET=1 before running this module", file=sys.stderr)
        return 2
    from .accuracy import run_case
    from .cases import small_cases

    for case in small_cases("triton", "interpreter", args.quick):
        result = run_case(case, "triton", "interpreter")
        print(json.dumps({RESULT_KEY: result}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
