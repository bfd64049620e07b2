"""The native CPU kernel's library cache: what it loads, what it refuses and rebuilds, and when
it gives up (an unavailable kernel, never a crash). "Another user" is uid 65534, given real files
and directories with os.chown: those tests run as root only."""

import hashlib
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import embeddings, has_c_compiler, uniform_grid

from lejepa_kernels import FusedSlicedEppsPulley, cpu_backend, cpu_library
from lejepa_kernels.reference import random_directions

pytestmark = pytest.mark.skipif(not has_c_compiler(), reason="no C compiler here")

OTHER_UID = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
N, D, S, T, DT = 37, 5, 23, 9, 0.375


def checksum_line(data: bytes) -> str:
    """What the cache records beside a library: its sha256 and its size."""
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


def compile_library(tmp_path, source: str) -> bytes:
    """The bytes of a shared library built from C `source` with the kernel's compiler."""
    c_file, so_file = tmp_path / "planted.c", tmp_path / "planted.so"
    c_file.write_text(source)
    subprocess.run(
        cpu_library._compiler() + ["-shared", "-fPIC", str(c_file), "-o", str(so_file)],
        check=True, capture_output=True, timeout=120,
    )
    return so_file.read_bytes()


def reload_kernel() -> None:
    """Forget the loaded library: the next call finds (or builds) it again in the cache that
    $LEJEPA_KERNELS_CACHE names then."""
    cpu_library.library.cache_clear()
    cpu_library.unavailable_reason.cache_clear()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(file name, bytes) of the library the kernel builds here, built into a scratch cache."""
    cache = tmp_path_factory.mktemp("scratch") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cpu_library.CACHE_ENV, str(cache))
        reload_kernel()
        cpu_library.library()
    reload_kernel()
    (library,) = cache.glob("ecf_cpu-*.so")
    return library.name, library.read_bytes()


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """The cache the kernel uses in this test (not created): the kernel is loaded anew from it,
    and from the usual cache again after the test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(cpu_library.CACHE_ENV, str(cache))
    monkeypatch.delenv("LEJEPA_KERNELS_BACKEND", raising=False)
    reload_kernel()
    yield cache
    reload_kernel()


def assert_sums_match_fp64():
    """The kernel's sums for a small odd shape agree with fp64 cos and sin."""
    x = embeddings(N, D, torch.float32, seed=7)
    A = random_directions(D, S, 5)
    cos_sums, sin_sums = (sums[0] for sums in cpu_backend.ecf_sums(x[None], A, uniform_grid(T, DT), DT))
    angles = (x.double() @ A.double()).unsqueeze(-1) * (torch.arange(T) * DT).double()
    torch.testing.assert_close(cos_sums.double(), angles.cos().sum(0), rtol=0, atol=3e-6 * N)
    torch.testing.assert_close(sin_sums.double(), angles.sin().sum(0), rtol=0, atol=3e-6 * N)


def assert_auto_falls_back_and_cpu_raises(reason: str):
    """'auto' warns once, giving the PyTorch path's loss; backend='cpu' raises; both say reason."""
    x = embeddings(33, 8, torch.float32, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = FusedSlicedEppsPulley(16)(x)
        FusedSlicedEppsPulley(16)(x)
    fallbacks = [str(w.message) for w in caught if "slower PyTorch path" in str(w.message)]
    assert len(fallbacks) == 1 and reason in fallbacks[0], fallbacks
    assert torch.equal(loss, FusedSlicedEppsPulley(16, backend="torch")(x))
    with pytest.raises(cpu_library.CpuKernelUnavailable, match=re.escape(reason)):
        FusedSlicedEppsPulley(16, backend="cpu")(x)


def mode(path) -> int:
    return os.lstat(path).st_mode & 0o7777


@pytest.mark.parametrize(
    "planting",
    [
        pytest.param("world-writable shared cache", marks=as_root),
        pytest.param("cache symlinked to another user's directory", marks=as_root),
        pytest.param("library of another user", marks=as_root),
        "library writable by others",
        "symlinked library",
    ],
)
def test_planted_library_is_never_loaded(tmp_path, kernel_cache, built, planting):
    """A library under the kernel's (publicly computable) name, with a matching checksum, whose
    loading would run its constructor: refused; the kernel builds its own and gives the sums."""
    name, _ = built
    marker = tmp_path / "constructor-ran"
    planted = compile_library(
        tmp_path,
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'    FILE *f = fopen("{marker}", "w");\n'
        "    if (f) fclose(f);\n"
        "}\n",
    )
    other_users = planting.startswith(("world-writable", "cache symlinked"))
    directory = tmp_path / "elsewhere" if planting.startswith("cache symlinked") else kernel_cache
    directory.mkdir(mode=0o700)
    library, checksum = directory / name, directory / (name + ".sha256")
    if planting == "symlinked library":
        (tmp_path / "evil.so").write_bytes(planted)
        library.symlink_to(tmp_path / "evil.so")
    else:
        library.write_bytes(planted)
        library.chmod(0o777 if planting == "library writable by others" else 0o755)
    checksum.write_text(checksum_line(planted))
    if planting == "library of another user":
        os.chown(library, OTHER_UID, OTHER_UID)
    if other_users:
        for path in (directory, library, checksum):
            os.chown(path, OTHER_UID, OTHER_UID)
        directory.chmod(0o1777 if planting == "world-writable shared cache" else 0o755)
    if planting.startswith("cache symlinked"):
        kernel_cache.symlink_to(directory)

    try:
        assert_sums_match_fp64()
    finally:
        assert not marker.exists(), "the planted library was loaded: its constructor ran"
    if other_users:  # left alone; the kernel's own library is in a private directory inside
        assert library.read_bytes() == planted and os.lstat(library).st_uid == OTHER_UID
        private = kernel_cache / f"lejepa_kernels-{os.geteuid()}"
        assert mode(private) == 0o700 and os.lstat(private).st_uid == os.geteuid()
        library = private / name
    assert os.lstat(library).st_uid == os.geteuid() and mode(library) == 0o755
    assert library.read_bytes() == built[1]
    assert (library.parent / (name + ".sha256")).read_text() == checksum_line(built[1])


def test_created_cache_directories_are_private(tmp_path, monkeypatch, built):
    cache = tmp_path / "new" / "nested" / "cache"
    monkeypatch.setenv(cpu_library.CACHE_ENV, str(cache))
    reload_kernel()
    try:
        assert_sums_match_fp64()
    finally:
        reload_kernel()
    for directory in (tmp_path / "new", tmp_path / "new" / "nested", cache):
        assert mode(directory) == 0o700, directory
    assert mode(cache / built[0]) == 0o755


@as_root
def test_untrusted_cache_without_a_private_directory_is_an_unavailable_kernel(
    tmp_path, kernel_cache, built
):
    """A world-writable cache where another user holds the private directory's name: the
    reason names both and the fix; 'auto' warns and takes the PyTorch path, 'cpu' raises."""
    private = kernel_cache / f"lejepa_kernels-{os.geteuid()}"
    private.mkdir(parents=True)
    os.chown(kernel_cache, OTHER_UID, OTHER_UID)
    kernel_cache.chmod(0o1777)
    os.chown(private, OTHER_UID, OTHER_UID)

    reason = cpu_library.unavailable_reason()
    assert reason is not None
    what_and_fix = (str(kernel_cache), "mode 1777", str(private), f"uid {OTHER_UID}", "only you")
    for part in what_and_fix + (f"${cpu_library.CACHE_ENV}",):
        assert part in reason, reason
    assert_auto_falls_back_and_cpu_raises(f"{private} is owned by uid {OTHER_UID}")
    assert not list(tmp_path.rglob("*.so"))


def test_library_without_the_kernel_symbols_is_an_unavailable_kernel(tmp_path, kernel_cache, built):
    """A valid library of the right checksum that lacks the kernel's functions (another source
    built under the name): an unavailable kernel, not an AttributeError."""
    name, _ = built
    other = compile_library(tmp_path, "int unrelated(void) { return 1; }\n")
    kernel_cache.mkdir(mode=0o700)
    (kernel_cache / name).write_bytes(other)
    (kernel_cache / name).chmod(0o755)
    (kernel_cache / (name + ".sha256")).write_text(checksum_line(other))

    missing = f"{kernel_cache / name} has no function ecf_forward_block"
    assert_auto_falls_back_and_cpu_raises(missing)


def test_damaged_library_is_rebuilt(tmp_path, built):
    """Truncated (loading it would raise SIGBUS), overwritten with zeros at the same size, or
    without its checksum (an older cache): each is rebuilt, in a child process (a SIGBUS there
    cannot stop the tests), and the sums match fp64."""
    name, good = built
    damages = {
        "truncated": lambda path: path.write_bytes(good[: len(good) // 2]),
        "zeroed": lambda path: path.write_bytes(good[:4096] + bytes(len(good) - 4096)),
        "no checksum": lambda path: path.with_name(name + ".sha256").unlink(),
    }
    caches = []
    for damage, apply in damages.items():
        cache = tmp_path / damage.replace(" ", "-")
        cache.mkdir(mode=0o700)
        (cache / name).write_bytes(good)
        (cache / name).chmod(0o755)
        (cache / (name + ".sha256")).write_text(checksum_line(good))
        apply(cache / name)
        caches.append(str(cache))
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        from lejepa_kernels import cpu_backend, cpu_library
        x = torch.randn({N}, {D}, generator=torch.Generator().manual_seed(0))
        A = torch.randn({D}, {S}, generator=torch.Generator().manual_seed(1))
        angles = (x.double() @ A.double()).unsqueeze(-1) * (torch.arange({T}) * {DT}).double()
        for cache in sys.argv[1:]:
            os.environ[cpu_library.CACHE_ENV] = cache
            cpu_library.library.cache_clear()
            cos_sums, sin_sums = (s[0] for s in cpu_backend.ecf_sums(x[None], A, torch.arange({T}) * {DT}, {DT}))
            torch.testing.assert_close(cos_sums.double(), angles.cos().sum(0), rtol=0, atol={3e-6 * N})
            torch.testing.assert_close(sin_sums.double(), angles.sin().sum(0), rtol=0, atol={3e-6 * N})
            print(cache, "ok", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *caches], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-3000:])
    for cache in caches:
        library = os.path.join(cache, name)
        with open(library, "rb") as f:
            assert f.read() == good, cache
        with open(library + ".sha256") as f:
            assert f.read() == checksum_line(good), cache


def test_cache_holds_the_library_and_its_checksum_only(kernel_cache, built):
    """No partial files are left beside them."""
    assert_sums_match_fp64()
    assert sorted(p.name for p in kernel_cache.iterdir()) == [built[0], built[0] + ".sha256"]


def test_library_is_built_once_then_reused(kernel_cache, built):
    """Readable by all, as libraries are; writable by its owner only."""
    assert_sums_match_fp64()
    library = kernel_cache / built[0]
    first = os.lstat(library)
    assert mode(library) == 0o755
    reload_kernel()
    assert_sums_match_fp64()
    again = os.lstat(library)
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_concurrent_builders_share_one_library(tmp_path, built):
    """Processes starting at once on an empty cache (DDP ranks): each builds or loads a whole
    library, the sums match fp64 in all, and one library and its checksum are left."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import torch
        from lejepa_kernels import cpu_backend, cpu_library
        x = torch.randn({N}, {D}, generator=torch.Generator().manual_seed(0))
        A = torch.randn({D}, {S}, generator=torch.Generator().manual_seed(1))
        angles = (x.double() @ A.double()).unsqueeze(-1) * (torch.arange({T}) * {DT}).double()
        cos_sums, sin_sums = (s[0] for s in cpu_backend.ecf_sums(x[None], A, torch.arange({T}) * {DT}, {DT}))
        torch.testing.assert_close(cos_sums.double(), angles.cos().sum(0), rtol=0, atol={3e-6 * N})
        torch.testing.assert_close(sin_sums.double(), angles.sin().sum(0), rtol=0, atol={3e-6 * N})
        """
    )
    env = dict(os.environ, LEJEPA_KERNELS_CACHE=str(cache))
    ranks = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for rank in ranks:
        _, errors = rank.communicate(timeout=300)
        assert rank.returncode == 0, errors[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == [built[0], built[0] + ".sha256"]
    assert (cache / built[0]).read_bytes() == built[1]
