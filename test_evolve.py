"""The continual runner: manifest validation, shipped manifests, CLI overrides, reports, and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import checkpoint
import conftest
import evolve
import mu2net

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
P = 2e5
F = 7e6
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
     "segments[0].generations = -2", "expected an integer ≥ 1"),
    (('tasks = ["digits"]', 'tasks = ["digitz"]'), "segments[1].tasks[0] = 'digitz'", "did you mean"),
    (('method = "mu2net+"', 'method = "mu3net"'), "segments[1].method = 'mu3net'", "mu2net.METHODS"),
    (("P = 2e5", "P = 2e5\ns = 1.5"), "segments[1].s = 1.5", "(0, 1]"),
    (('vit = "tiny"', 'vit = "huge"'), "root.vit = 'huge'", "vit.CONFIGS"),
    (('kind = "random"', 'kind = "pretrained"'), "root.kind = 'pretrained'", "'augreg'"),
    (("resolutions = [8, 16]", "resolutions = [8, 18]"), "root.resolutions[1] = 18", "multiple of the patch"),
    (("seed = 0", "seed = 1.5"), "seed = 1.5", "expected an integer"),
    (('hp = { lr = 0.05 }', 'hp = { lr = 0.05, learning_rate = 1 }'), "root.hp.learning_rate", "unknown"),
    (('name = "two"', 'name = "two"\nvalues = { resolution = 16 }'), "segments[1].values.resolution = 16",
     "non-empty list"),
    (('method = "mu2net+"', 'method = "mu2net+"\ntrainable_split = "scan"'), "segments[1].trainable_split = 'scan'",
     "'hybrid'"),
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
    assert "segments[0].cycles = 0: expected an integer ≥ 1" in capsys.readouterr().err
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


def test_paper_sec5_root_fails_clearly_at_run_time(tmp_path):
    m = evolve.load_manifest("manifests/paper_sec5.toml")
    with pytest.raises(NotImplementedError, match="mu2net_state.*not implemented"):
        evolve.run(m, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, iters, P, F, ntasks", [("mccb", 5, 1.48e6, 15e6, 8), ("vddb", 30, 85.6e6, 100e6, 10)])
def test_paper_sec4_manifests(name, iters, P, F, ntasks):
    m = evolve.load_manifest(f"manifests/paper_sec4_{name}.toml")
    runs = evolve.sweep(m)
    assert [r[0] for r in runs] == ["s=0.02", "s=0.3", "s=0.7", "s=0.9", "s=0.95", "s=0.98", "s=1"]
    for sub, mm in runs:
        (seg,) = mm.segments
        assert mm.s_sweep == () and seg.s == float(sub[2:])
        assert (seg.iterations, seg.generations, seg.cycles, seg.samples_cap, seg.P, seg.F) == (iters, 4, 4, 51200,
                                                                                                P, F)
        assert len(evolve.segment_tasks(mm, seg)) == ntasks


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
    for f in ("report.md", "metrics.png", "graph.png", "metrics.jsonl", "manifest.json"):
        assert (whole / f).stat().st_size > 0, f
    text = (whole / "report.md").read_text()
    assert "avg accounted params" in text and "| digits/parity |" in text and "| two |" in text
    assert "ETA" in logs[2] and "child" in logs[2]


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
    for p in set(before) - {whole / "metrics.png", whole / "graph.png"}:
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


# --- progress, object stores, a full disk, many processes (issue 13) --------------------------------------------

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

    def full(self, rel, data):  # the second state file: the commit after generation 1
        calls.append(rel)
        if rel.startswith("state-") and sum(c.startswith("state-") for c in calls) == 2:
            raise checkpoint.DiskFull(f"no space left on device while writing {self.name(rel)}")
        real(self, rel, data)

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
