"""Every benchmark script runs, at a tiny size, as a user runs it (`python bench/x.py ...`), so none can rot; a table
in docs/ that a script prints is the script's output."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from bench.compiles import Compiles

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(HERE))
    p = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=HERE, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout


def test_cost_table_in_the_docs_is_the_scripts_output():
    """docs/scale.md's cost of paper_sec5.toml is `python bench/cost.py` as printed: every line of its table and
    totals appears there verbatim (rerun the script and paste its output when the manifest changes)."""
    out = _run("cost.py")
    lines = [x for x in out.splitlines() if x.startswith(("|", "whole manifest", "forward FLOPs"))]
    assert len(lines) >= 5 and any(x.startswith("whole manifest") for x in lines)
    doc = (HERE / "docs" / "scale.md").read_text()
    missing = [x for x in lines if x not in doc]
    assert not missing, f"docs/scale.md does not hold bench/cost.py's output: {missing}"


def test_input_pipeline_bench_runs():
    out = _run("input.py", "--task", "digits", "--res", "16", "--batch", "8", "--steps", "2")
    assert "ratio pipeline / train step" in out


def test_child_bench_runs():
    out = _run("child.py", "--task", "digits", "--configs", "tiny", "--batches", "8", "--repeats", "1",
               "--children", "2", "--res", "8", "--cycles", "1", "--samples-cap", "16")
    assert "child/scan" in out and "vectorised/sequential" in out


def test_compile_bench_runs():
    out = _run("compile.py", "--iterations", "1", "--children", "1", "--generations", "1", "--cycles", "1",
               "--samples-cap", "64", "--splits", "mask")
    assert out.splitlines()[-1].startswith("mask")


def test_order_bench_runs():
    out = _run("order.py", "--images", "2", "--steps", "1")
    assert "PSNR" in out and "all on" in out


def test_compiles_counts_a_compile():
    with Compiles() as c:
        jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert c.count >= 1 and c.seconds > 0


def test_every_bench_script_is_run_by_a_test():
    tests = "".join(p.read_text() for p in HERE.glob("test_*.py"))
    untested = [p.name for p in (HERE / "bench").glob("*.py") if p.name != "__init__.py" and not any(
        s in tests for s in (f'"{p.name}"', f"bench/{p.name}", f"bench.{p.stem}"))]
    assert not untested, f"bench scripts no test runs: {untested}"
