"""The numerically sensitive tests once more on a machine unlike this one: XLA's CPU code limited to AVX2 (no
AVX-512), on one core. Their tolerances come from the error the compared computations can accumulate, not from
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


def test_numeric_tests_hold_on_avx2_and_one_core():
    """One process, both differences at once (the old fused-chunk tolerance failed with either): half the time of
    two runs, which keeps the suite short."""
    files = _numeric_files()
    assert {"test_train.py", "test_vit.py"} <= set(files)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_ADDOPTS")}  # conftest adds its own
    if platform.machine().lower() in ("x86_64", "amd64"):  # the flag names x86 instruction sets
        env["XLA_FLAGS"] = "--xla_cpu_max_isa=AVX2"
    # pinned from inside the child: a preexec_fn would fork this (JAX-threaded) process
    run = (f"import os, sys, pytest; os.sched_setaffinity(0, {{{min(os.sched_getaffinity(0))}}}); "
           f"sys.exit(pytest.main(['-q', '-m', 'numeric', '-p', 'no:cacheprovider', *{files!r}]))")
    r = subprocess.run([sys.executable, "-c", run], cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "deselected" in r.stdout, r.stdout[-2000:]
