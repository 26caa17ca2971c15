"""Test-wide settings, in the style of Equinox's conftest: strict promotion, fake devices, no network."""
import os
import socket
import tempfile

# Several fake CPU devices so the per-device child training is tested; must precede the first jax import. XLA:CPU
# splits a matmul over its thread pool in a way that depends on how many devices the process has, so bit-for-bit
# comparisons between processes with other device counts (test_evolve's 2 processes × 2 devices against 1 × 4)
# need single-threaded Eigen; subprocesses inherit the flags.
CPU_FLAGS = "--xla_force_host_platform_device_count={} --xla_cpu_multi_thread_eigen=false"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + CPU_FLAGS.format(4)
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-data-dir")
os.environ["NO_GCE_CHECK"] = "true"

import functools  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Test files compile the same tiny structures again and again: share the executables within one test session, with
# the evolve.py and bench/ processes the tests start too (through the environment: JAX reads these at import; a
# program's key includes XLA_FLAGS, so a process with other flags, e.g. test_numerics' AVX2 run, compiles its own).
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mu2net-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# Unit roundoffs of float32 and bfloat16 (8-bit significand): numerical tests derive their tolerances from these and
# from how many terms the compared computations sum (test_numerics.py reruns them on AVX2 and on one core).
U32, UBF16 = 2.0**-24, 2.0**-9


class NetworkBlocked(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise NetworkBlocked(f"network access attempted in a test: {args[:1]}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt (TFDS, pretrained weights, GCS metadata) fails at once instead of hanging."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    yield


@functools.cache
def programs():
    """One compile cache for the whole test session (a run owns its own: evolve.run); tests then compile each tiny
    structure once."""
    import schedule

    return schedule.Programs()


def trainer(devices=None, stop=lambda: False):
    """This process's devices (all of them by default), compiling through the session's cache."""
    import schedule

    return schedule.Local(programs(), devices, stop)


def task_iteration(system, task, config, key, log=None, devices=None):
    """One whole active-task iteration (Algorithm 1: `start`, every generation, `finish`) on this process's
    devices."""
    import mu2net

    return resume(mu2net.start(system, task.name, config), task, config, key, log, devices)


def resume(state, task, config, key, log=None, devices=None):
    """A task iteration from `state` (its start, or a committed state) to its end."""
    import mu2net

    local = trainer(devices)
    for state in mu2net.generations(state, task, config, key, local, log):
        assert state.done is None, "this trainer never stops"
    return mu2net.finish(state, task, config, local)
