"""The continual runner: manifest validation, shipped manifests, CLI overrides, reports, and kill-and-resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import conftest
import evolve
import mu2net
import report

HERE = Path(__file__).resolve().parent

# Two offline tasks, two segments of 1 and 3 generations × 2 children, a tiny ViT: seconds per task iteration.
TINY = """
name = "tiny"
seed = 0
report_set = ["digits"]

[root]
kind = "random"
vit = "tiny"
resolutions = [8, 16]
resolution = 16
hp = { lr = 0.05 }

[root.pretrain]
task = "digits/parity"
cycles = 1
samples_cap = 64
batch_size = 32

[[segments]]
name = "one"
method = "mu2net"
tasks = ["digits", "digits/parity"]
generations = 1
children = 2
cycles = 2
samples_cap = 64
batch_size = 32
eval_batch = 128

[[segments]]
name = "two"
method = "mu2net+"
tasks = ["digits"]
generations = 3
children = 2
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
P_factor = 10
F_factor = 10
"""


def _write(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# --- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, field, expect", [
    (("", "bogus = 1\n"), "bogus: unknown key", "expected one of"),
    (("generations = 1\nchildren = 2\ncycles = 2", "generatons = 1\nchildren = 2\ncycles = 2"),
     "segments[0].generatons: unknown key", "did you mean 'generations'"),
    (("generations = 1\nchildren = 2\ncycles = 2", "generations = \"two\"\nchildren = 2\ncycles = 2"),
     "segments[0].generations = 'two'", "expected an integer"),
    (("generations = 1\nchildren = 2\ncycles = 2", "generations = -2\nchildren = 2\ncycles = 2"),
     "segments[0].generations = -2", "expected an integer in [1, 10,000]"),
    (('tasks = ["digits"]', 'tasks = ["digitz"]'), "segments[1].tasks[0] = 'digitz'", "did you mean"),
    (('method = "mu2net+"', 'method = "mu3net"'), "segments[1].method = 'mu3net'", "methods.METHODS"),
    (("P_factor = 10", "P_factor = 10\ns = 1.5"), "segments[1].s = 1.5", "(0, 1]"),
    (("P_factor = 10", "P_factor = -1"), "segments[1].P_factor = -1", "a number ≥ 0"),
    (("P_factor = 10", "P_factor = 10\nP = 3e5"), "segments[1].P = 300000.0", "no P beside P_factor = 10.0"),
    (("P_factor = 10", "P_factor = 10\npenalty_segment = 2"), "segments[1].penalty_segment = 2",
     "expected -1 or a segment index ≤ 1"),
    (('name = "one"', 'name = "one"\nF_factor = 10'), "segments[0].P_factor/F_factor = 0.0/10.0", "no models yet"),
    (('vit = "tiny"', 'vit = "huge"'), "root.vit = 'huge'", "vit.CONFIGS"),
    (('kind = "random"', 'kind = "pretrained"'), "root.kind = 'pretrained'", "'augreg'"),
    (("resolutions = [8, 16]", "resolutions = [8, 18]"), "root.resolutions[1] = 18", "multiple of the patch"),
    (("seed = 0", "seed = 1.5"), "seed = 1.5", "expected an integer"),
    (('hp = { lr = 0.05 }', 'hp = { lr = 0.05, learning_rate = 1 }'), "root.hp.learning_rate", "unknown"),
    (('name = "two"', 'name = "two"\nvalues = { resolution = 16 }'), "segments[1].values.resolution = 16",
     "non-empty list"),
    (('method = "mu2net+"', 'method = "mu2net+"\ntrainable_split = "scan"'), "segments[1].trainable_split = 'scan'",
     "'hybrid'"),
    (("cycles = 2", "cycles = 2\nvalidation_max = 20000"), "segments[0].validation_max = 20000", "[1, 10000]"),
    (("eval_batch = 128", "eval_batch = 128\nmicro_batches = 3"), "segments[0].micro_batches = 3",
     "expected a divisor of batch_size = 32"),
    (("cycles = 2", "cycles = 2\nremat = 1"), "segments[0].remat = 1", "expected a boolean"),
    (("seed = 0", 'seed = 0\ncomparison = { families = [{ name = "a", vary = "s", values = [0.5, 2.0] }] }'),
     "comparison a, s=2, repetition 0): segments[0].s = 2.0", "(0, 1]"),
    (("seed = 0", 'seed = 0\ncomparison = { families = [{ name = "a", vary = "lr", values = [0.1] }] }'),
     "comparison.families[0].vary = 'lr'", "a [[segments]] field"),
    # Values that pass a type check but cannot work: each bounded, the bound in the error.
    (("children = 2", "children = 1000000000000000000"), "segments[0].children = 1000000000000000000",
     "expected an integer in [1, 4,096]"),
    (('name = "two"', 'name = "two"\niterations = 1000000000000000000'),
     "segments[1].iterations = 1000000000000000000", "expected an integer in [1, 2^32]"),
    (("batch_size = 32\neval_batch", "batch_size = 1000000000\neval_batch"), "segments[0].batch_size = 1000000000",
     "expected an integer in [1, 65,536]"),
    (('name = "two"', 'name = "two"\nvalues = { resolution = [16, 4096] }'),
     "segments[1].eval_batch = 128: one batch at resolution 4096", "24.0 GiB of float32 images; expected at most 16"),
    (("hp = { lr = 0.05 }", "hp = { resolution = 7 }"), "root.hp.resolution = 7",
     "expected one of segments[0]'s resolutions [16]"),
    (("hp = { lr = 0.05 }", "hp = { lr = 1e30 }"), "root.hp.lr = 1e+30", "expected a number in [1e-08, 10]"),
    (('name = "two"', 'name = "two"\nvalues = { warmup = [0.1, -1] }'), "segments[1].values.warmup[1] = -1",
     "expected a number in [0, 1]"),
    (('name = "two"', 'name = "two"\ndefaults = { crop_area_min = 0 }'), "segments[1].defaults.crop_area_min = 0",
     "expected a number in [0.001, 1]"),
    (("", "[tasks.x]\nfolder = " + "[" * 20_000 + "]" * 20_000 + "\n"), "not valid TOML here",
     "nested too deeply"),
])
def test_bad_manifest_names_the_field(tmp_path, edit, field, expect):
    old, new = edit
    text = TINY.replace(old, new, 1) if old else TINY + new
    assert text != TINY
    p = _write(tmp_path, text)
    with pytest.raises(evolve.ManifestError) as e:
        evolve.load_manifest(p)
    msg = str(e.value)
    assert str(p) in msg and field in msg and expect in msg, msg


def test_missing_and_wrongly_typed_tables(tmp_path):
    p = _write(tmp_path, 'name = "x"\n')
    with pytest.raises(evolve.ManifestError, match=r"segments: missing"):
        evolve.load_manifest(p)
    p = _write(tmp_path, TINY.replace("[root.pretrain]", "[root.pretrain]\nhp = 3"))
    with pytest.raises(evolve.ManifestError, match=r"root\.pretrain\.hp = 3: expected a table"):
        evolve.load_manifest(p)


def test_bad_manifest_fails_before_any_work(tmp_path, capsys):
    p = _write(tmp_path, TINY.replace("cycles = 2", "cycles = 0"))
    out = tmp_path / "run"
    assert evolve.main(["--manifest", str(p), "--out", str(out)]) == 2
    assert not out.exists()
    assert "segments[0].cycles = 0: expected an integer in [1, 10,000]" in capsys.readouterr().err
    # A bad CLI override is checked like the file.
    good = _write(tmp_path, TINY, "good.toml")
    assert evolve.main(["--manifest", str(good), "--out", str(out), "--set", "segments.1.batch_size=-4"]) == 2
    assert not out.exists()
    assert "segments[1].batch_size = -4" in capsys.readouterr().err
    with pytest.raises(evolve.ManifestError, match="segments has 2 entries"):
        evolve.load_manifest(good, ["segments.5.cycles=1"])


def test_overrides_and_seed_reach_the_manifest(tmp_path, capsys):
    p = _write(tmp_path, TINY)
    m = evolve.load_manifest(p, ["segments.0.generations=3", "root.pretrain.task=mnist5k", "segments.1.P=inf"],
                             seed=7)
    assert m.seed == 7 and m.segments[0].generations == 3 and m.root.pretrain.task == "mnist5k"
    assert m.segments[1].P == float("inf")
    assert evolve.main(["--manifest", str(p), "--seed", "3", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3


def test_penalties_follow_section_5_2():
    """P, F = factor × the average accounted parameters / FLOPs at the start of the segment (or of the one named)."""
    m = evolve.load_manifest(evolve.DEFAULT_MANIFEST)
    starts = [{"params": math.nan, "flops": math.nan}, {"params": 1.5e4, "flops": 7e5}, {"params": 1e4, "flops": 6e5}]
    seg = dataclasses.replace(m.segments[1], P_factor=10.0, F_factor=5.0, penalty_segment=-1)
    got = evolve.penalties(seg, 1, starts)
    assert (got.P, got.F) == (1.5e5, 3.5e6)
    assert (evolve.penalties(seg, 2, starts).P, evolve.penalties(seg, 2, starts).F) == (1e5, 3e6)
    pinned = dataclasses.replace(seg, penalty_segment=1)
    assert evolve.penalties(pinned, 2, starts).P == 1.5e5  # segments after §5.2's keep its P and F
    typed = dataclasses.replace(seg, P_factor=0.0, F_factor=0.0, P=3.0, F=4.0)
    assert evolve.penalties(typed, 1, starts) is typed
    with pytest.raises(evolve.ManifestError, match=r"segments\[0\]\.P_factor = 10.0: .* no models"):
        evolve.penalties(seg, 0, starts)
    qs = m.segments[1:]
    assert all((s.P_factor, s.F_factor, s.penalty_segment) == (10.0, 10.0, 1) for s in qs), qs


# --- shipped manifests ---------------------------------------------------------------------------------------


def test_quickstart_validates_and_is_the_default():
    m = evolve.load_manifest(evolve.DEFAULT_MANIFEST)
    assert m.name == "quickstart" and len(m.segments) == 4
    assert evolve.segment_tasks(m, m.segments[2]) == ["mnist5k/parity", "mnist5k/is_greater_than_4", "mnist5k/mod3"]
    assert [s.method for s in m.segments] == ["mu2net", "mu2net+", "mu2net+", "mu2net+"]


def test_paper_sec5_validates_with_the_124_tasks_in_order():
    m = evolve.load_manifest("manifests/paper_sec5.toml")
    segs = m.segments
    assert [s.method for s in segs] == ["mu2net", "mu2net+", "mu2net+", "mu2net+"]
    assert [s.iterations for s in segs] == [2, 2, 1, 2]
    assert (segs[1].P, segs[1].F, segs[1].s) == (2.2e9, 3.8e12, 0.99)
    a, b, ab = (evolve.segment_tasks(m, segs[i]) for i in (0, 2, 3))
    assert len(a) == 69 and len(b) == 55 and ab == a + b and len(set(ab)) == 124
    assert ab[:3] == ["imagenet2012", "cifar100", "cifar10"]
    assert evolve.segment_tasks(m, segs[1]) == a
    assert m.root.kind == "mu2net_state" and m.root.vit == "L/16" and m.root.resolutions == (224, 384)
    assert evolve.report_tasks(m) == a


def test_paper_sec5_checks_its_data_before_any_work(tmp_path, capsys):
    """Every TFDS dataset of the 124 tasks must be prepared in data_dir; the error lists the missing ones and the
    command that prepares them, before the published state is read or the run directory made (no network)."""
    out = tmp_path / "run"
    args = ["--manifest", "manifests/paper_sec5.toml", "--out", str(out), "--set", f"data_dir={tmp_path / 'tfds'}",
            "--compile-cache", ""]
    assert evolve.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 92 TFDS dataset(s) are not prepared")
    assert f"python data.py prepare A B --data-dir {tmp_path / 'tfds'}" in err
    assert not out.exists()




# --- running, killing, resuming ------------------------------------------------------------------------------


def _cmd(args: list[str], kill_after: int | None = None, cache: Path | None = None) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env.pop(evolve.KILL_ENV, None)
    if kill_after:
        env[evolve.KILL_ENV] = str(kill_after)
    return [sys.executable, str(HERE / "evolve.py"), *args, "--compile-cache", str(cache) if cache else ""], env


def _run(args: list[str], kill_after: int | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    cmd, env = _cmd(args, kill_after, cache)
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)


def _signalled(args: list[str], cache: Path, signals: list[int]) -> tuple[int, str]:
    """Runs evolve.py and sends it `signals` as soon as its first child has finished (while the rest of its
    generation still trains). Two signals are two kinds: the same one sent twice can arrive as one."""
    cmd, env = _cmd(args, None, cache)
    p = subprocess.Popen(cmd, cwd=HERE, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "children, elapsed" in line and signals:
            for s in signals:
                p.send_signal(s)
            signals = []
    return p.wait(timeout=300), "".join(lines)


def _events(run: Path) -> list[str]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return sorted(json.dumps({k: v for k, v in d.items() if k != "elapsed"}, sort_keys=True) for d in lines
                  if d["event"] != "step")  # in-child progress is time-based


def _finished(log: str) -> list[str]:
    """The generation ("gen g/G") of every child a run's stderr reports finished."""
    return [x.split(" gen ")[1].split()[0] for x in log.splitlines() if "children, elapsed" in x]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run killed twice, stopped by SIGTERM, by SIGINT + SIGTERM, and resumed
    each time (seed 5 via --seed)."""
    d = tmp_path_factory.mktemp("runs")
    man = d / "tiny.toml"
    man.write_text(TINY)
    cache = d / "xla-cache"
    whole, broken = d / "whole", d / "broken"
    args = ["--manifest", str(man), "--out", str(broken), "--seed", "5"]
    r = _run(["--manifest", str(man), "--out", str(whole), "--seed", "5"], cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    # Children: 1 pre-training, then 2 per generation: segment one's two iterations of 1 generation (children 2-5),
    # segment two's 3 generations (6-11). Kill after the 2nd (mid "digits" of segment one, before its commit), resume
    # and kill after 7 more (the 9th: mid generation 2 of segment two, after generation 1's commit); resume and stop
    # with SIGTERM after one child, then with SIGINT and SIGTERM at once, then resume to the end.
    logs, codes = [], []
    for kill in (2, 7):
        r = _run(args, kill_after=kill, cache=cache)
        logs.append(r.stderr)
        assert r.returncode == 75, r.stderr[-3000:]
    for signals in ([signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]):
        code, log = _signalled(args, cache, signals)
        logs.append(log)
        codes.append(code)
    r = _run(args, cache=cache)
    logs.append(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    return whole, broken, logs, codes


def test_kill_and_resume_equals_uninterrupted(runs):
    whole, broken, logs, _ = runs
    assert all("resuming" in log for log in logs[1:])
    # Killed mid-generation, a run resumes from the last generation's commit: the third run retrains none of
    # segment two's first generation, which a restart of the task iteration would.
    assert _finished(logs[1])[-3:] == ["1/3", "1/3", "2/3"]
    assert "generation 2/3" in logs[2] and _finished(logs[2]) and "1/3" not in _finished(logs[2])
    a, b = checkpoint.load(whole), checkpoint.load(broken)
    sa, sb = a.system, b.system
    assert mu2net.identical(sa, sb)  # every parameter and momentum bit, models, lineage, counter
    assert json.dumps(a.extra["history"]) == json.dumps(b.extra["history"])  # NaN-safe: 'start' has no models
    assert a.extra["cursor"] == b.extra["cursor"] == [2, 0, 0]
    assert a.hashes == b.hashes
    assert _events(whole) == _events(broken)  # the interrupted iterations' log lines were dropped on resume
    assert set(sa.models) == {"digits", "digits/parity"}


def test_signals_stop_at_a_safe_point(runs):
    """SIGTERM: the run commits at its next safe point, says how to resume and exits with `STOPPED`; a second
    signal stops at once, the last commit stands (the next run resumes from it) and its stale lock is taken over."""
    _, broken, logs, codes = runs
    assert codes == [evolve.STOPPED, 128 + 15]
    assert "stopped at a safe point" in logs[2] and "rerun the same command to resume" in logs[2]
    assert "--out" in logs[2].rsplit("to resume", 1)[1]
    assert "taking over the stale lock" in logs[4] and "taking over" not in logs[3]
    assert not (broken / checkpoint.LOCK).exists()


def test_seed_reaches_the_run(runs):
    whole = runs[0]
    ck = checkpoint.load(whole)
    assert ck.extra["seed"] == 5 and ck.extra["manifest"]["seed"] == 5
    assert json.loads((whole / "manifest.json").read_text())["seed"] == 5
    assert ck.extra["version"]


def test_reports_written(runs):
    whole, logs = runs[0], runs[2]
    for f in ("report.md", "metrics.png", "graph.png", "metrics.jsonl", "manifest.json", *report.FIGURES):
        assert (whole / f).stat().st_size > 0, f
    text = (whole / "report.md").read_text()
    assert "avg accounted params" in text and "| digits/parity |" in text and "| two |" in text
    assert "ETA" in logs[2] and "child" in logs[2]


def test_section5_figures_from_a_tiny_run(runs, tmp_path):
    """Figures 5–7 and §5.4 of the tiny run: the data behind them is the final system's, recomputed here directly,
    and `report.analyse` rewrites the same analysis from the run directory alone."""
    import collections

    whole, broken = runs[:2]
    ck = checkpoint.load(whole)
    system, history = ck.system, ck.extra["history"]
    assert [h["segment"] for h in history] == ["start", "one", "two"]
    assert history[-1]["retained"] == report.retained(system)  # the last summary describes the final system
    assert history[-1]["report_set"] == ["digits"]
    assert history[1]["P"] == math.inf and history[2]["P"] == pytest.approx(10 * history[1]["params"])  # §5.2
    assert history[2]["F"] == pytest.approx(10 * history[1]["flops"])
    models = list(system.models.values())
    labels, counts = report.hparam_counts(history)
    assert labels == ["one", "two"]
    for n in ("lr", "resolution", "num_layers", "momentum"):
        direct = collections.Counter(m.hp[n] for m in models)
        assert {v: c[-1] for v, c in counts[n].items() if c[-1]} == dict(direct), n
        assert all(sum(c[j] for c in counts[n].values()) == len(history[j + 1]["retained"]) for j in range(2))
    _, table = report.clone_by_depth(history, system.cfg.depth)
    for i in range(system.cfg.depth):
        want = np.mean([m.mu.get(f"clone:encoderblock_{i}", m.hp["mu"]) for m in models])
        assert table[-1, i] == pytest.approx(want)
    vals = report.mu_values(history[-1]["retained"])
    acts = {a for m in models for a in m.mu}
    assert set(vals) == (acts or {"mu"}) and all(len(x) == len(models) for x in vals.values())
    text = (whole / "analysis.md").read_text()
    for head in ("## Figure 5", "## Figure 6", "## Figure 7", "## §5.4"):
        assert head in text, head
    for n, vs in counts.items():
        for v, c in vs.items():
            assert f"| {n} | {report._show(v)} | " + " | ".join(map(str, c)) + " |" in text
    for f in ("hparams.png", "mu_depth.png", "mu_values.png"):
        assert (whole / f).read_bytes()[:4] == b"\x89PNG" and (whole / f).stat().st_size > 10_000, f
    # Any run directory: the same analysis from the checkpoint alone; an old run (no retained records) gets its last
    # summary from the committed system and needs task-set A named.
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(whole, copy)
    for f in report.FIGURES:
        (copy / f).unlink()
    report.analyse(copy)
    assert (copy / "analysis.md").read_text().replace("copy", "") == text.replace(whole.name, "")
    old = [{k: v for k, v in h.items() if k not in ("retained", "report_set")} for h in history]
    checkpoint.save(copy, system, {**ck.extra, "history": old}, checkpoint.load(copy))
    with pytest.raises(report.ReportError, match="report set"):
        report.analyse(copy)
    hist = report.analyse(copy, ["digits"])
    assert hist[-1]["retained"] == history[-1]["retained"] and "retained" not in hist[1]
    assert "Only 1 of 3 summaries" in (copy / "analysis.md").read_text()
    # Repetitions: two runs of one manifest and seed have std 0 and the run's own means.
    rows = report.aggregate_runs([whole, broken], tmp_path / "agg")
    assert [r["segment"] for r in rows] == ["start", "one", "two"]
    assert rows[-1]["params"] == (history[-1]["params"], 0.0) and rows[-1]["n"] == 2
    assert "| two | 2 |" in (tmp_path / "agg" / "aggregate.md").read_text()
    assert (tmp_path / "agg" / "aggregate.png").stat().st_size > 10_000


def test_report_command(runs, tmp_path, capsys):
    import shutil
    whole, broken = runs[:2]
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(whole, a)
    shutil.copytree(broken, b)
    for d in (a, b):
        for f in ("report.md", "metrics.png", "graph.png", *report.FIGURES):
            (d / f).unlink()
    assert evolve.main(["report", str(a), str(b)]) == 0
    for d in (a, b):
        for f in ("report.md", "metrics.png", "graph.png", *report.FIGURES):
            assert (d / f).stat().st_size > 0, (d, f)
    assert (a / "analysis.md").read_text().replace("# Section 5 analysis: a", "") == \
        (whole / "analysis.md").read_text().replace("# Section 5 analysis: whole", "")
    assert "| two | 2 |" in (tmp_path / "tiny-aggregate" / "aggregate.md").read_text()
    assert "| two | 2 |" in capsys.readouterr().out
    assert evolve.main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing" in err and "Traceback" not in err


def test_finished_run_resumes_to_nothing_and_other_manifest_is_refused(runs, tmp_path):
    whole = runs[0]
    before = {p: p.read_bytes() for p in whole.rglob("*") if p.is_file() and p.name != "report.md"}
    man = _write(tmp_path, TINY)
    m = evolve.load_manifest(man, seed=5)
    with pytest.raises(evolve.ManifestError, match=r"seed: checkpoint 5 vs now 6"):
        evolve.run(evolve.load_manifest(man, seed=6), whole)
    s = evolve.run(m, whole)  # already done: loads, writes the report, trains nothing
    assert set(s.models) == {"digits", "digits/parity"}
    after = {p: p.read_bytes() for p in whole.rglob("*") if p.is_file() and p.name != "report.md"}
    for p in set(before) - {whole / f for f in ("metrics.png", "graph.png", *report.FIGURES)}:
        assert after[p] == before[p], p


def test_corrupt_run_is_refused_and_left_alone(runs, tmp_path, capsys):
    import shutil
    broken = runs[1]
    run = tmp_path / "copy"
    shutil.copytree(broken, run)
    state = next(run.glob("state-*.msgpack"))
    state.write_bytes(state.read_bytes()[:-10])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    man = _write(tmp_path, TINY)
    assert evolve.main(["--manifest", str(man), "--out", str(run), "--seed", "5", "--compile-cache", ""]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_system_root_continues_a_previous_run(runs, tmp_path):
    whole = runs[0]
    text = TINY.replace('kind = "random"', f'kind = "system"\npath = "{whole}"')
    text = text.replace('task = "digits/parity"', 'task = ""')
    m = evolve.load_manifest(_write(tmp_path, text))
    s = evolve.build_root(m, evolve.Tasks(m), None)
    prev = checkpoint.load(whole).system
    assert mu2net.identical(s, prev)
    with pytest.raises(evolve.ManifestError, match="root.pretrain.task = 'digits/parity'"):
        evolve.load_manifest(_write(tmp_path, TINY.replace('kind = "random"', f'kind = "system"\npath = "{whole}"')))


SYSTEM = """
name = "more"
seed = 1
report_set = ["digits"]
[root]
kind = "system"
path = "{path}"
{extra}
[[segments]]
name = "again"
method = "mu2net+"
tasks = ["digits"]
generations = 1
children = 2
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
"""


def test_system_root_takes_the_runs_shape(runs, tmp_path, capsys):
    """A system root that names only the run directory continues the run at the run's own ViT, resolutions and
    depth (not Root's defaults, ViT-L/16 at 224 / 384 px); a manifest that contradicts them is refused in one line."""
    whole = runs[0]
    m = evolve.load_manifest(_write(tmp_path, SYSTEM.format(path=whole, extra="")))
    r = m.root
    assert (r.vit, r.resolutions, r.resolution, r.depth) == ("tiny", (8, 16), 16, 2)  # TINY's root
    assert evolve.image_size(m) == 16 and evolve.root_config(r) == evolve.vit.CONFIGS["tiny"]
    system = evolve.run(m, tmp_path / "more", stream=open(os.devnull, "w"))
    prev = checkpoint.load(whole).system
    new = [mm for mm in system.models.values() if mm.id != prev.models["digits"].id]
    assert {t for t in system.models} == set(prev.models) and system.cfg == prev.cfg
    assert all(mm.hp["resolution"] in (8, 16) for mm in system.models.values()) and new  # a new digits model
    # Agreeing fields are accepted; contradicting ones are refused, naming the field, the value and the run's.
    agree = 'vit = "tiny"\nresolutions = [8, 16]\nresolution = 8\ndepth = 2'
    assert evolve.load_manifest(_write(tmp_path, SYSTEM.format(path=whole, extra=agree))).root.resolution == 8
    for extra, want in [('vit = "L/16"', "root.vit = 'L/16'"), ("resolutions = [224, 384]",
                        r"root.resolutions = \[224, 384\]: the run at root.path = .* has \[8, 16\]"),
                        ("depth = 1", "root.depth = 1: the run at root.path = .* has 2 blocks")]:
        with pytest.raises(evolve.ManifestError, match=want):
            evolve.load_manifest(_write(tmp_path, SYSTEM.format(path=whole, extra=extra)))
    bad = _write(tmp_path, SYSTEM.format(path=whole, extra="resolutions = [224, 384]"))
    assert evolve.main(["--manifest", str(bad), "--out", str(tmp_path / "x"), "--compile-cache", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_augreg_root_and_section4_baselines_run(tmp_path):
    """An AugReg `.npz` root cut to its first blocks (as MCCB cuts Ti/16 to 3), then the Section 4 baselines as
    segments: full fine-tune, fine-tune top layers and residual adapters, each from the root."""
    import jax

    import vit

    full = vit.CONFIGS["tiny4"]
    comps = vit.init(full, jax.random.key(3), 7, 16)
    vit.save_augreg(tmp_path / "root.npz", comps)
    seg = """
[[segments]]
name = "{name}"
method = "{method}"
tasks = ["{task}"]
generations = 1
children = 1
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
{extra}
"""
    text = f"""
name = "sec4"
seed = 0
report_set = ["digits"]
[root]
kind = "augreg"
vit = "tiny4"
path = "{tmp_path / 'root.npz'}"
depth = 2
resolutions = [8, 16]
resolution = 16
""" + "".join(seg.format(name=n, method=m, task=t, extra=x) for n, m, t, x in [
        ("full", "finetune", "digits", ""), ("top", "finetune", "digits/parity", 'clone = "top:1"'),
        ("adapters", "adapters", "mnist5k", "adapter_dim = 8")])
    m = evolve.load_manifest(_write(tmp_path, text))
    system = evolve.run(m, tmp_path / "run", stream=open(os.devnull, "w"))
    root = {mu2net.kind(c): system.params[c] for c in system.root.components}
    assert sorted(root) == ["cls", "embedding", "encoder_norm", "encoderblock_0", "encoderblock_1", "head",
                            "posembed_input"]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), root["encoderblock_1"],
                                     comps["encoderblock_1"]))
    blocks = [c for c in system.root.components if mu2net.kind(c).startswith("encoderblock")]
    full, top, ad = (system.models[t] for t in ("digits", "digits/parity", "mnist5k"))
    assert not set(full.components) & set(system.root.components)  # every layer fine-tuned
    assert [c in blocks for c in top.components if mu2net.kind(c).startswith("encoderblock")] == [True, False]
    names = [mu2net.kind(c) for c in ad.components]  # residual adapters before each frozen, shared root block
    assert names[3:7] == ["residual_adapter_0", "encoderblock_0", "residual_adapter_1", "encoderblock_1"]
    assert [c for c in ad.components if mu2net.kind(c).startswith("encoderblock")] == blocks
    assert all(m.parent == mu2net.ROOT for m in (full, top, ad))


# --- other roots, user data, predict and export -----------------------------------------------------------------


def test_augreg_root_config_from_the_file(tmp_path):
    """root.vit = "": the config comes from the AugReg file's arrays (a config no vit.CONFIGS entry names)."""
    import jax

    import vit

    cfg = vit.Config(width=48, depth=3, mlp_dim=96, heads=6, patch=4)
    vit.save_augreg(tmp_path / "r.npz", vit.init(cfg, jax.random.key(0), 3, 16))
    text = TINY.replace('kind = "random"\nvit = "tiny"', f'kind = "augreg"\nvit = ""\npath = "{tmp_path / "r.npz"}"')
    m = evolve.load_manifest(_write(tmp_path, text.replace('task = "digits/parity"', 'task = ""')))
    s = evolve.build_root(m, evolve.Tasks(m), None)
    assert s.cfg == cfg and len(s.root.components) == 3 + 3 + 2
    with pytest.raises(evolve.ManifestError, match=r"root.resolutions\[1\] = 18: expected a multiple of the patch "
                       r"size 4 of the ViT of"):
        evolve.load_manifest(_write(tmp_path, text.replace("[8, 16]", "[8, 18]").replace('task = "digits/parity"',
                                                                                        'task = ""')))
    with pytest.raises(evolve.ManifestError, match=r"root.vit = '': expected a ViT config"):
        evolve.load_manifest(_write(tmp_path, TINY.replace('vit = "tiny"', 'vit = ""')))


PUBLISHED = """
name = "published"
seed = 0
report_set = ["digits"]
[root]
kind = "mu2net_state"
path = "{path}"
vit = "{vit}"
resolutions = [8, 16]
resolution = 16
[[segments]]
name = "new task"
method = "mu2net+"
tasks = ["digits"]
generations = 1
children = 1
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
"""


def test_mu2net_state_root_runs(tmp_path, capsys):
    """root.kind = "mu2net_state": a state in the notebook's layout (test_published's writer) is the start system;
    a new task iteration extends it and leaves the published models as they were."""
    import jax
    import numpy as np

    import published
    from test_published import _state

    state = _state().save(tmp_path / "exp", 3, 0)
    m = evolve.load_manifest(_write(tmp_path, PUBLISHED.format(path=state, vit="tiny")))
    s = evolve.run(m, tmp_path / "run", stream=open(os.devnull, "w"))
    start = published.read(str(state))
    assert set(s.models) == {"t_a", "t_b", "t_c", "digits"} and s.root.components == start.root.components
    key = mu2net.selections_key("digits")  # the one thing that may change: how often one parented digits
    assert all(dataclasses.replace(s.models[t], metrics={k: v for k, v in s.models[t].metrics.items() if k != key})
               == start.models[t] for t in ("t_a", "t_b", "t_c"))
    for c in start.component_ids():  # nothing published is trained: every array bit-identical
        assert all((np.asarray(x) == np.asarray(y)).all()
                   for x, y in zip(jax.tree.leaves(start.params[c]), jax.tree.leaves(s.params[c]), strict=True))
    assert all(mu2net.id_number(c) >= start.counter for c in s.component_ids() - start.component_ids())
    assert checkpoint.load(tmp_path / "run").extra["classes"]["digits"] == [str(i) for i in range(10)]
    bad = _write(tmp_path, PUBLISHED.format(path=state, vit="tiny4"), "bad.toml")
    assert evolve.main(["--manifest", str(bad), "--out", str(tmp_path / "run2"), "--compile-cache", ""]) == 2
    assert "root.vit = 'tiny4'" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in state.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:100] if f.name.startswith("checkpoint_") else f.read_bytes())
    bad = _write(tmp_path, PUBLISHED.format(path=broken, vit="tiny"), "broken.toml")
    assert evolve.main(["--manifest", str(bad), "--out", str(tmp_path / "run3"), "--compile-cache", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{broken / 'checkpoint_3_0'}" in err and "truncated" in err


def _images(root: Path, classes=("a", "b"), n=4) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 0, 255 if c == "a" else 0)).save(root / c / f"{i}.png")
    return root


def _user(folder: Path, extra: str = "") -> str:
    """TINY with segment one on the image folder task `mine`."""
    text = TINY.replace('report_set = ["digits"]',
                        f'report_set = ["digits"]\n[tasks.mine]\nfolder = "{folder}"\n{extra}')
    return text.replace('tasks = ["digits"]', 'tasks = ["mine"]')


def test_user_data_checked_before_any_work(tmp_path, capsys):
    folder = _images(tmp_path / "imgs")
    (folder / "a" / "bad.png").write_bytes(b"not a png")
    (folder / "empty").mkdir()
    text = _user(folder)
    out = tmp_path / "run"
    assert evolve.main(["--manifest", str(_write(tmp_path, text)), "--out", str(out), "--compile-cache", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.png" in err and f"{folder / 'empty'}" in err and "skip_bad" in err
    assert not out.exists()
    m = evolve.load_manifest(_write(tmp_path, _user(folder, "skip_bad = true")))
    warned = tmp_path / "log"
    with open(warned, "w") as f:
        tasks = evolve.Tasks(m, f)
        assert evolve.check_data(m, tasks) == set()
    assert "skipped 1 unreadable image(s), 1 empty class folder(s)" in warned.read_text()
    assert tasks("mine").num_classes == 2 and tasks.classes["mine"] == ["a", "b"]


def test_predict_and_export_from_a_run(runs, tmp_path, capsys):
    import jax
    import numpy as np

    import augment
    import data
    import vit

    whole = runs[0]
    folder = tmp_path / "digits"
    folder.mkdir()
    x, y = data._offline("sklearn_digits")
    from PIL import Image
    for i in range(6):
        Image.fromarray(x[i, ..., 0]).save(folder / f"{i}.png")
    assert evolve.main(["predict", str(whole), "--task", "digits", str(folder), "--top-k", "2", "--format",
                        "json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert [Path(p["file"]).name for p in js] == [f"{i}.png" for i in range(6)]
    assert all(len(p["top"]) == 2 and p["top"][0]["class"] == str(p["top"][0]["label"]) for p in js)
    assert evolve.main(["export", str(whole), "--task", "digits", str(tmp_path / "d.npz")]) == 0
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["task"] == "digits"
    s = checkpoint.load(whole).system
    imgs = augment.eval_preprocess(np.stack([data.to_rgb(x[i], 16) for i in range(4)]), meta["resolution"])
    fwd = jax.jit(vit.forward)
    np.testing.assert_array_equal(fwd(list(vit.load_augreg(tmp_path / "d.npz").values()), imgs),
                                  fwd(mu2net.assemble(s, s.models["digits"]), imgs))
    # user errors: one line, status 2
    (folder / "9.png").write_bytes(b"broken")
    for args, words in [(["predict", str(whole), "--task", "nope", str(folder)], "'nope'"),
                        (["predict", str(tmp_path), "--task", "digits", str(folder)], "no committed run"),
                        (["predict", str(whole), "--task", "digits", str(folder)], "9.png"),
                        (["predict", str(whole), "--task", "digits"], "expected image files"),
                        (["export", str(whole), "--task", "digits", str(tmp_path / "d.bin")], ".npz")]:
        assert evolve.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, (args, err)


def test_user_errors_exit_2_without_traceback(tmp_path):
    """Through a real process: status 2 and one line on stderr."""
    bad = _write(tmp_path, TINY.replace("cycles = 2", "cycles = 0"))
    for args in (["predict", str(tmp_path), "--task", "digits", str(tmp_path)],
                 ["--manifest", str(bad), "--compile-cache", ""]):
        r = subprocess.run([sys.executable, str(HERE / "evolve.py"), *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


# --- progress, object stores, a full disk, many processes --------------------------------------------

# One task iteration of 2 generations × 2 children on one architecture (few compiles): with 2 processes, one child
# each per generation.
SMALL = """
name = "small"
seed = 2
report_set = ["digits"]
[root]
kind = "random"
vit = "tiny"
resolutions = [8, 16]
resolution = 16
hp = { lr = 0.05 }
[[segments]]
name = "one"
method = "mu2net+"
tasks = ["digits"]
generations = 2
children = 2
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
P = 2e5
F = 7e6
values = { num_layers = [2], resolution = [16] }
"""


class Stream:
    """A stderr stand-in that keeps what is written and, if asked, sends this process a SIGTERM once a child has
    finished (as a scheduler preempting the job would)."""

    def __init__(self, term: bool = False):
        self.text, self.term = [], term

    def write(self, s: str) -> None:
        self.text.append(s)
        if self.term and "children, elapsed" in s:
            self.term = False
            os.kill(os.getpid(), signal.SIGTERM)

    def flush(self) -> None:
        pass

    def __str__(self) -> str:
        return "".join(self.text)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """SMALL run on 4 devices into a local directory, the disk full at its generation commit and in-child progress
    shown and logged at every step; the same run into fsspec's memory filesystem on 1 device, stopped by SIGTERM
    after its first child and resumed."""
    import fsspec
    import jax

    import exchange
    d = tmp_path_factory.mktemp("small")
    m = evolve.load_manifest(_write(d, SMALL))
    real, calls = checkpoint.Store.write, []

    def full(self, rel, blob):  # the second state file: the commit after generation 1
        calls.append(rel)
        if rel.startswith("state-") and sum(c.startswith("state-") for c in calls) == 2:
            raise checkpoint.DiskFull(f"no space left on device while writing {self.name(rel)}")
        real(self, rel, blob)

    a_log = Stream()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint.Store, "write", full)
        a = evolve.run(m, d / "a", a_log, every=0.0, log_every=0.0)
    url = "memory://mu2net-test/b"
    one = exchange.Hosts(jax.local_devices()[:1])
    b_logs = [Stream(term=True), Stream()]
    with pytest.raises(evolve.Stopped, match="safe point: 1 of the 2 children of generation 1/2 of task 'digits' "):
        evolve.run(m, url, b_logs[0], hosts=one)
    stopped = checkpoint.load(url)
    b = evolve.run(m, url, b_logs[1], hosts=one)
    yield dict(m=m, d=d, a=a, a_log=str(a_log), b=b, b_logs=list(map(str, b_logs)), stopped=stopped, url=url)
    fsspec.filesystem("memory").rm("/mu2net-test", recursive=True)


def test_progress_inside_a_child(small):
    log = small["a_log"]
    lines = [x for x in log.splitlines() if "img/s" in x]
    assert lines and all(" step " in x and " loss " in x and "child ETA" in x for x in lines)
    steps = [json.loads(x) for x in (small["d"] / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert steps and {"step", "steps", "loss", "images_per_s", "eta", "task"} <= set(steps[0])
    assert all(r["steps"] == 2 and 1 <= r["step"] <= 2 and r["images_per_s"] > 0 for r in steps)


def test_full_disk_at_a_commit_leaves_the_run_going(small):
    assert "warning: no space left on device while writing" in small["a_log"]
    assert "the next commit tries again" in small["a_log"]
    ck = checkpoint.load(small["d"] / "a")
    assert mu2net.identical(ck.system, small["a"]) and ck.extra["done"]


def test_a_disk_that_stays_full_stops_the_run_cleanly(tmp_path, monkeypatch, capsys):
    """The disk fills up at the first generation's commit and stays full: the run warns and goes on, the next
    log record is lost, and the next commit (the run's end) stops it with one line and `DISK_FULL`; the last commit
    (the start) stands, loadable, with its log (a resume from it: test_kill_and_resume_equals_uninterrupted)."""
    import errno
    man, out = _write(tmp_path, SMALL), tmp_path / "run"
    argv = ["--manifest", str(man), "--out", str(out), "--compile-cache", ""]
    full, saves = [False], []
    real_put, real_save = checkpoint._put, checkpoint.save

    def put(fd, data):  # every byte written to the run directory, through the checkpoint's own write helpers
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_put(fd, data)

    def save(*a, **k):
        saves.append(1)
        full[0] = full[0] or len(saves) == 2
        return real_save(*a, **k)

    class Log:  # metrics.jsonl on the same disk
        def __init__(self, f):
            self.f = f

        def __getattr__(self, k):
            return getattr(self.f, k)

        def write(self, b):
            if full[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

    real_log = checkpoint.open_log
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "_put", put)
        mp.setattr(checkpoint, "save", save)
        mp.setattr(checkpoint, "open_log", lambda p: Log(real_log(p)))
        real_run = evolve.run
        mp.setattr(evolve, "run", lambda *a, **k: real_run(*a, stream=sys.stderr, **k))  # its warnings, captured
        assert evolve.main(argv) == evolve.DISK_FULL
    err = capsys.readouterr().err
    assert "warning: no space left on device while writing" in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on device while writing {out / 'metrics.jsonl'}"), last
    assert "free space and rerun the same command" in last
    ck = checkpoint.load(out)
    assert ck.extra["cursor"] == [0, 0, 0] and ck.pending is None and not (out / checkpoint.LOCK).exists()
    assert ck.extra["metrics_bytes"] <= (out / "metrics.jsonl").stat().st_size  # a resume cuts the log back to it


def test_object_store_run_stops_resumes_and_equals_a_local_one(small):
    """A run directory on a non-local filesystem (fsspec memory), 1 device instead of 4, stopped part-way through a
    generation (1 of its 4 children trained) and resumed from there: the same system, bit for bit."""
    st = small["stopped"]
    assert st.pending is not None and st.pending.generation == 0 and list(st.pending.done) == [0]
    assert "generation 1/2 (1 of its children done)" in small["b_logs"][1]
    assert len([x for x in small["b_logs"][1].splitlines() if "children, elapsed" in x]) == 3  # 4 - 1 kept
    assert mu2net.identical(small["a"], small["b"])
    ck = checkpoint.load(small["url"])
    assert mu2net.identical(ck.system, small["a"]) and not checkpoint.Store(small["url"]).exists(checkpoint.LOCK)
    got = checkpoint.Store(small["url"]).read("metrics.jsonl").decode().splitlines()
    assert _events_of(got) == _events_of((small["d"] / "a" / "metrics.jsonl").read_text().splitlines())
    assert "report.md" in checkpoint.Store(small["url"]).glob("*.md")


def _events_of(lines: list[str]) -> list[str]:
    recs = [json.loads(x) for x in lines]
    return sorted(json.dumps({k: v for k, v in d.items() if k != "elapsed"}, sort_keys=True) for d in recs
                  if d["event"] != "step")


def test_lock_refuses_a_second_run_of_the_same_directory(tmp_path, capsys):
    man = _write(tmp_path, SMALL)
    with checkpoint.lock(tmp_path / "run"):
        assert evolve.main(["--manifest", str(man), "--out", str(tmp_path / "run"), "--compile-cache", ""]) == 2
    err = capsys.readouterr().err
    assert f"is in use by process {os.getpid()}" in err and "refusing to run it twice" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_two_processes_equal_one(small, tmp_path):
    """2 processes × 2 CPU devices on JAX's multi-controller runtime (gloo collectives), a generation's children
    spread over both: the same system, bit for bit, as 1 process with 4 devices and with 1 device."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    man = _write(tmp_path, SMALL)
    out = tmp_path / "mp"
    env = {k: v for k, v in os.environ.items() if k != evolve.KILL_ENV}
    env["XLA_FLAGS"] = conftest.CPU_FLAGS.format(2)
    procs = [subprocess.Popen([sys.executable, str(HERE / "evolve.py"), "--manifest", str(man), "--out", str(out),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                               "--compile-cache", ""], cwd=HERE, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    res = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], res[0][1][-3000:] + res[1][1][-3000:]
    for _, err in res:  # each process trained its own half of every generation
        assert len([x for x in err.splitlines() if "children, elapsed" in x]) == 2, err[-2000:]
    ck = checkpoint.load(out)
    assert mu2net.identical(ck.system, small["a"]) and mu2net.identical(ck.system, small["b"])
    assert _events_of((out / "metrics.jsonl").read_text().splitlines()) == \
        _events_of((small["d"] / "a" / "metrics.jsonl").read_text().splitlines())
