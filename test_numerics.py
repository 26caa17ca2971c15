"""The numerically sensitive tests once more on machines unlike this one: XLA's CPU code limited to AVX2 (no
AVX-512), and one core. Their tolerances come from the error the compared computations can accumulate, not from
this machine, so they must hold there too (a 2-core AVX2 CPU once failed test_train's fused-chunk test). Rerun are
those marked `numeric`: the ones comparing two differently compiled programs (a fused chunk against single steps,
one program against several, XLA against numpy through a whole block); test_augment's comparisons, each one resize
or colour conversion with a derived tolerance, are left to the main run to keep this one short."""

import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _numeric_files() -> list[str]:
    return sorted(p.name for p in HERE.glob("test_*.py") if "@pytest.mark.numeric" in p.read_text())


def test_numeric_tests_hold_on_avx2_and_on_one_core():
    files = _numeric_files()
    assert {"test_train.py", "test_vit.py"} <= set(files)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "numeric", "-p", "no:cacheprovider", *files]
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_ADDOPTS")}  # conftest adds its own
    one_core = min(os.sched_getaffinity(0))
    runs = {"one core": (dict(base), lambda: os.sched_setaffinity(0, {one_core}))}
    if platform.machine().lower() in ("x86_64", "amd64"):  # the flag names x86 instruction sets
        runs["AVX2"] = (dict(base, XLA_FLAGS="--xla_cpu_max_isa=AVX2"), None)
    procs = {k: subprocess.Popen(cmd, cwd=HERE, env=env, preexec_fn=pre, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, (env, pre) in runs.items()}
    out = {k: p.communicate(timeout=900)[0] for k, p in procs.items()}
    failed = {k: out[k][-3000:] for k, p in procs.items() if p.returncode != 0}
    assert not failed, failed
    assert all(" passed" in o and "deselected" in o for o in out.values()), out
