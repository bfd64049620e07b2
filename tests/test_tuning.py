"""The per-GPU choice of kernel configurations: timed once, kept for the process and on disk.

No GPU is needed: the timing (triton.testing.do_bench) and the device's name are stood in for.
"""

import json
import os

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from lejepa_kernels import private_cache  # noqa: E402
from lejepa_kernels.kernels import tuning  # noqa: E402
from lejepa_kernels.kernels.config import FORWARD_CANDIDATES  # noqa: E402

CANDIDATES = FORWARD_CANDIDATES[torch.bfloat16]
FILE = "tuning-test-gpu-sm90-triton.json"


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Tuning switched on for CPU tensors, in a fresh cache; candidate i takes times[i] ms.
    Yields the list of configurations timed."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(private_cache.CACHE_ENV, str(cache))
    monkeypatch.delenv(tuning.TUNING_ENV, raising=False)
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_tuning_on", lambda x: os.environ.get(tuning.TUNING_ENV, "1") != "0")
    monkeypatch.setattr(tuning, "_file_name", lambda device: FILE)
    timed = []
    times = {config: 1.0 + index for index, config in enumerate(CANDIDATES)}
    times[CANDIDATES[2]] = 0.5  # the fastest here

    def do_bench(fn, **kwargs):
        timed.append(fn())
        return times[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    yield timed


def choose(N=3000, D=64, S=1400, T=17, uniform=True):
    x = torch.zeros(1, N, D, dtype=torch.bfloat16)
    return tuning.tuned_config("forward", x, S, T, uniform, launch=lambda config: config)


def test_the_fastest_candidate_is_chosen_once_per_key(tuner):
    assert choose() == CANDIDATES[2]
    assert tuner == list(CANDIDATES)
    assert choose(N=4000, S=1100) == CANDIDATES[2]  # the same powers of 2: no new timing
    assert len(tuner) == len(CANDIDATES)
    choose(uniform=False)  # another grid kind: timed again
    assert len(tuner) == 2 * len(CANDIDATES)


def test_the_choice_is_kept_on_disk_for_later_processes(tuner, monkeypatch):
    choose()
    saved = json.loads((private_cache.cache_dir() / FILE).read_text())
    assert list(saved.values()) == [[getattr(CANDIDATES[2], f) for f in tuning._FIELDS]]
    monkeypatch.setattr(tuning, "_choices", {})  # a new process
    assert choose() == CANDIDATES[2]
    assert len(tuner) == len(CANDIDATES)  # read, not timed again


def test_saved_entries_that_are_not_candidates_are_ignored(tuner):
    cache = private_cache.cache_dir()
    cache.mkdir(mode=0o700)
    key = tuning._key("forward", torch.zeros(1, 3000, 64, dtype=torch.bfloat16), 1400, 17, True)
    (cache / FILE).write_text(json.dumps({key: [16, 16, 16, 1, 1], "junk": "x", "a:b": [1]}))
    assert choose() == CANDIDATES[2]
    assert len(tuner) == len(CANDIDATES)


def test_a_candidate_that_cannot_run_here_is_passed_over(tuner, monkeypatch):
    def launch(config):
        if config == CANDIDATES[2]:
            raise triton.runtime.errors.OutOfResources(1 << 20, 228 << 10, "shared memory")
        return config

    x = torch.zeros(1, 3000, 64, dtype=torch.bfloat16)
    assert tuning.tuned_config("forward", x, 1400, 17, True, launch) == CANDIDATES[0]


def test_tuning_off_uses_the_first_candidate(tuner, monkeypatch):
    monkeypatch.setenv(tuning.TUNING_ENV, "0")
    assert choose() == CANDIDATES[0]
    assert tuner == []


def test_an_unwritable_cache_keeps_the_choice_for_the_process(tuner, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(private_cache.CACHE_ENV, str(blocker / "cache"))
    with pytest.warns(UserWarning, match="not saved"):
        assert choose() == CANDIDATES[2]
    assert choose() == CANDIDATES[2] and len(tuner) == len(CANDIDATES)


def test_small_calls_are_not_tuned(tuner):
    assert choose(N=300, S=1000) == CANDIDATES[0]
    assert tuner == []


def test_cpu_tensors_are_not_tuned():
    x = torch.zeros(3, 4, dtype=torch.bfloat16)
    assert tuning._tuning_on(x) is False
