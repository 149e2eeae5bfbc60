"""Test set-up: 8 fake CPU devices (every sharding layout is tested that way), one persistent
compilation cache for the whole session, and shared fixtures."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e|: the max relative error used by every parity test."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def rel_l2(actual, expected) -> float:
    """||a - e|| / ||e||."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def pytest_configure(config):
    """One jax persistent compilation cache for the session: its workers (pytest-xdist starts them
    after this, with this environment) and the ``lens-train``/``launch/local.sh`` processes the
    tests start (their environments are copies of ``os.environ``). The same tiny step compiles in
    many tests and processes; each compiles it once (on 2 cores, tests/train ran 12% faster with
    it). A cache set by the caller (``JAX_COMPILATION_CACHE_DIR``) is used and left in place."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config._lens_jax_cache = tempfile.mkdtemp(prefix="lens_jax_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._lens_jax_cache
    # Programs that compile in under half a second are cheaper to compile than to read back.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
    cache = getattr(config, "_lens_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)


@pytest.fixture(scope="module")
def no_persistent_compilation_cache():
    """Compiles for TPU topologies (compile-only, from this CPU host) bypass the session's cache:
    an executable compiled for no client cannot be read back ("PjRtCompiler must be constructed
    with a Client"), so a second compile of the same program warned and recompiled. Child
    processes of such tests drop ``JAX_COMPILATION_CACHE_DIR`` from their environment."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()   # jax decides once per process whether the cache is used
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", saved)
        cc.reset_cache()


def env_without_compilation_cache(**extra) -> dict:
    """``os.environ`` plus ``extra``, without the session's compilation cache (see above)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(extra)
    return env


@pytest.fixture
def rng():
    return np.random.default_rng(0)
