"""Every benchmark script runs, at a tiny size, as a user runs it (`python bench/x.py ...`), so none can rot; a table
in docs/ that a script prints is the script's output."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import train
import vit
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


def test_memory_bench_runs():
    """bench/memory.py for a tiny child, in one process: --check runs the step and measures its peak RSS against
    the analysis, then the table, from the same compiled programs: 4 micro-batches with remat keep less than the
    plain step, and a tiny child fits every device."""
    out = _run("memory.py", "--check", "tiny:32:64:1", "--cases", "tiny:32:64:1", "--settings", "plain,remat+mb4")
    checks = [r.split("|")[1:-1] for r in out.splitlines() if r.startswith("| tiny") and len(r.split("|")) == 7]
    assert [r[1].strip() for r in checks] == ["plain", "remat+mb4"]
    assert all(float(r[2]) > 0 for r in checks)  # predicted outputs + temps
    assert float(checks[0][3]) > 0  # the plain step's temporaries are fresh pages; a smaller one may reuse freed ones
    rows = [r.split("|")[1:-1] for r in out.splitlines() if r.startswith("| tiny") and len(r.split("|")) > 7]
    temps = {r[3].strip(): float(r[5]) for r in rows}
    assert set(temps) == {"plain", "remat+mb4"} and temps["remat+mb4"] < temps["plain"]
    assert all([c.strip() for c in r[-4:-1]] == ["yes"] * 3 for r in rows)


def test_memory_cases_of_the_paper_manifests():
    """Section 5's manifest only: expanding the Section 4 comparisons' sub-runs takes minutes (each validated)."""
    from bench import memory

    cases = {(c.vit, c.depth, c.res, c.batch, c.S) for c in memory.manifest_cases(memory.MANIFESTS[:1])}
    assert cases == {("L/16", 0, 384, 64, 384)}  # both families: L/16 at Table 1's largest resolution, batch 64


def test_realsize_bench_runs():
    """bench/realsize.py at tiny size: validation of 3 images in a batch of 4 (the set's size, not eval_batch's
    256), every phase measured. --before's two differences in-process (no second JAX start): its task pads the
    validation to eval_batch, and without remat the backward keeps every block's activations."""
    from bench import realsize

    out = _run("realsize.py", "--vit", "tiny", "--file-res", "8", "--res", "16", "--batch", "2", "--steps", "2",
               "--val", "3", "--peak-n", "128")
    assert re.search(r"matmul peak \(float32, 128², the larger of two\): [\d.]+ GFLOP/s", out)
    assert "validation of 3 in batches of 4)" in out
    assert float(re.search(r"([\d.]+) images/s", out).group(1)) > 0
    peak, start, ratio = re.search(r"growth over the RSS before training \(([\d.]+) − ([\d.]+) GB\) / model = "
                                   r"([\d.]+)", out).groups()
    assert float(peak) >= float(start) > 0 and float(ratio) >= 0
    task, budget = _Val(), train.ChildBudget()
    assert train.eval_batch(task, budget) == 4 and train.eval_batch(realsize.Padded(task, 256), budget) == 256
    cfg = vit.CONFIGS["B/16"]
    assert realsize.activations(cfg, 4, 384, True, 1) < realsize.activations(cfg, 4, 384, False, 1) / 4


class _Val:
    num_validation = 3


def test_compiles_counts_a_compile():
    with Compiles() as c:
        jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert c.count >= 1 and c.seconds > 0


def test_every_bench_script_is_run_by_a_test():
    tests = "".join(p.read_text() for p in HERE.glob("test_*.py"))
    untested = [p.name for p in (HERE / "bench").glob("*.py") if p.name != "__init__.py" and not any(
        s in tests for s in (f'"{p.name}"', f"bench/{p.name}", f"bench.{p.stem}"))]
    assert not untested, f"bench scripts no test runs: {untested}"
