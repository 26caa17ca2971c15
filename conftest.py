"""Test-wide settings, in the style of Equinox's conftest: strict promotion, fake devices, no network."""
import os
import socket

# Several fake CPU devices so the per-device child training is tested; must precede the first jax import. XLA:CPU
# splits a matmul over its thread pool in a way that depends on how many devices the process has, so bit-for-bit
# comparisons between processes with other device counts (test_evolve's 2 processes × 2 devices against 1 × 4)
# need single-threaded Eigen; subprocesses inherit the flags.
CPU_FLAGS = "--xla_force_host_platform_device_count={} --xla_cpu_multi_thread_eigen=false"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + CPU_FLAGS.format(4)
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-data-dir")
os.environ["NO_GCE_CHECK"] = "true"

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Test files compile the same tiny structures again and again: share the executables within one test session.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mu2net-xla-"))
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
