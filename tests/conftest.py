import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu") if os.environ.get("NOSA_TEST_GPU") != "1" else None

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("NOSA_FIXTURES_DIR", ROOT.parent / "shared" / "fixtures" / "upstream"))


def fixture_cases(required: str = "expected.npz") -> list[str]:
    """Names of the upstream fixture cases holding `required` ([] when the fixtures are absent, as
    on the GPU machine; on the CPU the `fixture_dirs` fixture then fails loudly)."""
    return sorted(p.name for p in FIXTURES.iterdir() if (p / required).is_file()) if FIXTURES.is_dir() else []


def on_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


def pytest_collection_modifyitems(config, items):
    if on_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine with NOSA_TEST_GPU=1); "
                                   "the CPU suite covers the same code in interpret mode")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixture_dirs():
    dirs = sorted(p for p in FIXTURES.iterdir() if (p / "expected.npz").is_file()) if FIXTURES.is_dir() else []
    if not dirs:
        pytest.fail(f"upstream fixtures not found under {FIXTURES} (the shared/ folder beside the repo)")
    return dirs


# The CPU suite is compile-bound: most tests compile small programs (interpret-mode kernels, whole
# generate loops) and run them briefly. So XLA skips most of its optimisation work for them
# (`jax_disable_most_optimizations`: LLVM at O0, no expensive passes), while the tests that run long
# programs (the upstream parity fixtures: prefills of 5-9K tokens, 2-3x slower at O0) are marked
# `optimized` and compile as users' programs do. Both compile the same HLO; LLVM's level changes no
# float semantics (XLA:CPU's fast-math is off by default), and the whole suite passes either way.
# Compiled programs also go to a persistent cache shared by the test processes (the module fixture
# below drops the in-memory ones), so a program compiled by one worker or module is loaded by the
# next. On a 2-core CI machine (session 26, cold cache): 1107 s before, 1037 s with the cache alone,
# 710 s with both.
if not on_gpu():
    jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax-tests"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_compilation_cache_max_size", 2 * 2**30)


@pytest.fixture(autouse=True)
def _compile_effort(request):
    if on_gpu():
        yield
        return
    jax.config.update("jax_disable_most_optimizations", request.node.get_closest_marker("optimized") is None)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module: the suite compiles thousands, and each
    XLA:CPU executable keeps memory mappings; past the kernel's map limit (vm.max_map_count, 65530)
    a later compile crashes the process (seen as a segfault late in the full suite)."""
    yield
    jax.clear_caches()
