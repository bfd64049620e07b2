"""The release artefacts: `python -m build` makes an sdist and a wheel holding the package (its
modules, the CPU kernel's C source, py.typed), the licence and the metadata, and nothing else (no
tests, no build leftovers); `twine check --strict` passes on both. Needs the `release` extra."""

import email.parser
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import lejepa_kernels

ROOT = Path(__file__).resolve().parents[1]
VERSION = lejepa_kernels.__version__
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("build", "twine")),
    reason="needs build and twine: pip install -e '.[release]'",
)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout's files, tracked or not ignored: what a clean clone of this working
    tree holds, without build leftovers (a stale egg-info's file list would leak into the sdist)."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()
    copy = tmp_path_factory.mktemp("source")
    for name in filter(None, listing.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is still listed
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def dist(source, tmp_path_factory) -> Path:
    """The sdist and the wheel, as `python -m build` makes them (the wheel from the sdist)."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def package_files(source: Path) -> set[str]:
    return {path.relative_to(source).as_posix() for path in (source / "lejepa_kernels").rglob("*") if path.is_file()}


def wheel_files(dist: Path) -> tuple[zipfile.ZipFile, str]:
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"lejepa_kernels-{VERSION}-py3-none-any.whl"
    return zipfile.ZipFile(wheel), f"lejepa_kernels-{VERSION}.dist-info"


def test_wheel_holds_the_package_and_the_licence_only(source, dist):
    wheel, info = wheel_files(dist)
    metadata = {"METADATA", "WHEEL", "RECORD", "entry_points.txt", "top_level.txt", "licenses/LICENSE"}
    assert {"lejepa_kernels/csrc/ecf_cpu.c", "lejepa_kernels/py.typed"} <= package_files(source)
    assert set(wheel.namelist()) == package_files(source) | {f"{info}/{name}" for name in metadata}
    assert wheel.read(f"{info}/licenses/LICENSE") == (source / "LICENSE").read_bytes()
    assert "lejepa-kernels = lejepa_kernels.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()


def test_wheel_metadata(dist):
    wheel, info = wheel_files(dist)
    metadata = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
    assert metadata["Name"] == "lejepa-kernels" and metadata["Version"] == VERSION
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    requires = metadata.get_all("Requires-Dist")
    runtime = {line.split(">=")[0].split(";")[0] for line in requires if "extra ==" not in line}
    assert runtime == {"torch", "timm", "triton", "torchvision", "scikit-learn", "tqdm"}
    release = [line.split(">=")[0] for line in requires if 'extra == "release"' in line]
    assert release == ["build", "twine"]
    urls = dict(line.split(", ", 1) for line in metadata.get_all("Project-URL"))
    repository = "https://github.com/lejepa-kernels/lejepa-kernels"
    assert urls == {"Homepage": repository, "Source": repository, "Issues": f"{repository}/issues",
                    "Changelog": f"{repository}/blob/main/CHANGELOG.md"}
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def test_sdist_holds_the_package_and_what_builds_it_only(source, dist):
    (sdist,) = dist.glob("*.tar.gz")
    top = f"lejepa_kernels-{VERSION}"
    assert sdist.name == f"{top}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {member.name for member in tar.getmembers() if member.isfile()}
    project = {"README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in", "pyproject.toml"}
    generated = {"PKG-INFO", "setup.cfg"} | {
        f"lejepa_kernels.egg-info/{name}"
        for name in ("PKG-INFO", "SOURCES.txt", "dependency_links.txt", "entry_points.txt", "requires.txt",
                     "top_level.txt")
    }
    assert names == {f"{top}/{name}" for name in package_files(source) | project | generated}


def test_twine_check_passes(dist):
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, sorted(dist.iterdir()))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2
