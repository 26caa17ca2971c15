"""Drills of an adversarial user: racing lock takeovers, checkpoints whose names point outside the run directory,
symbolic links in it, tampered bookkeeping, logs cut short, image bombs, foreign folder names, absurd published
states. Each ends in one error line (exit 2 through the CLI) and touches nothing outside the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import checkpoint
from test_checkpoint import _system

HERE = Path(__file__).resolve().parent


# --- tools ----------------------------------------------------------------------------------------------------


def _tree(d: Path, skip: Path | None = None) -> dict[str, bytes | str]:
    """Every entry below `d` (links as their target, files as their bytes), `skip` left out."""
    out: dict[str, bytes | str] = {}
    for p in sorted(d.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = str(p.relative_to(d))
        out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


RUN_EXTRA = dict(cursor=[1, 0, 0], key=None, manifest={"name": "x", "report_set": ["digits"]}, history=[],
                 metrics_bytes=0, elapsed=0.0, classes={"digits": [str(i) for i in range(10)]}, done=True)


def _committed(run: Path, extra: dict | None = None) -> checkpoint.Checkpoint:
    ck = checkpoint.save(run, _system(), RUN_EXTRA if extra is None else extra)
    checkpoint.prune(run, ck)
    return ck


def _rewrite(run: Path, edit) -> None:
    """Edits the committed state (`edit(state dict)`) and re-signs it in COMMIT, as someone who knows the format
    can: COMMIT's sha256 guards against damage, not against a forger."""
    commit = json.loads((run / "COMMIT").read_text())
    state = msgpack.unpackb((run / commit["state"]).read_bytes(), raw=False)
    edit(state)
    data = msgpack.packb(state, use_bin_type=True)
    (run / commit["state"]).write_bytes(data)
    (run / "COMMIT").write_text(json.dumps({"state": commit["state"], "sha256": checkpoint.sha256(data),
                                            "bytes": len(data)}))


def _one_component(state: dict) -> str:
    return sorted(state["components"])[0]


# --- 1: two processes taking over one stale lock at once --------------------------------------------------------

RACE = r"""
import json, os, socket, sys, time
import checkpoint
run, log, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
# a pid above Linux's PID_MAX_LIMIT (2^22): never a live process
stale = json.dumps(dict(host=socket.gethostname(), pid=2**22 + 1, ticks=None, since=0)).encode()
real = checkpoint.Store.read
def slow(self, rel, *a):
    out = real(self, rel, *a)
    if rel == "LOCK" and slow.delay:
        time.sleep(slow.delay)  # widens the window between judging a lock stale and acting on it
    return out
checkpoint.Store.read = slow
both = nobody = 0
for t in range(trials):
    slow.delay = 0.005 if t % 2 else 0.0
    with open(os.path.join(run, "LOCK"), "wb") as f:
        f.write(stale)
    open(log, "w").close()
    r, w = os.pipe()
    kids = []
    for k in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            os.read(r, 1)
            try:
                with checkpoint.lock(run):
                    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
                    os.write(fd, b"in "); time.sleep(0.01); os.write(fd, b"out ")
            except checkpoint.Locked:
                pass
            os._exit(0)
        kids.append(pid)
    os.close(r); os.write(w, b"go"); os.close(w)
    for pid in kids:
        os.waitpid(pid, 0)
    seq = open(log).read()
    both += "in in" in seq
    nobody += not seq
print(json.dumps({"trials": trials, "two_holders": both, "no_holder": nobody}))
"""


def test_simultaneous_takeovers_of_a_stale_lock_leave_one_holder(tmp_path):
    """40 trials of two processes taking over the same dead process's LOCK at once (half of them with the window
    between reading the lock and acting on it widened): never two holders at a time. Before the takeover was
    atomic, 11 of these 40 trials had both processes holding the lock."""
    run = tmp_path / "run"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", RACE, str(run), str(tmp_path / "holders"), "40"], cwd=HERE,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(HERE)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"trials": 40, "two_holders": 0, "no_holder": 0}
    assert not (run / "LOCK").exists()  # the last holder released it


# --- 2, 3: names and links that would leave the run directory ---------------------------------------------------


@pytest.mark.parametrize("target", ["../outside.txt", "../../../../etc/hostname", "/dev/zero",
                                    "components/../../outside.txt"])
def test_component_file_names_outside_the_run_are_refused(tmp_path, target):
    run = tmp_path / "run"
    _committed(run)
    (tmp_path / "outside.txt").write_bytes(b"not yours")
    _rewrite(run, lambda s: s["components"][_one_component(s)].update(file=target))
    with pytest.raises(checkpoint.CheckpointError, match=r"bad component record .*expected \{file: components/"):
        checkpoint.load(run)


def test_state_names_and_special_files_are_refused_before_reading(tmp_path):
    run = tmp_path / "run"
    _committed(run)
    commit = json.loads((run / "COMMIT").read_text())
    for name in ("..", "../run/COMMIT", "/dev/zero", "COMMIT"):
        (run / "COMMIT").write_text(json.dumps(dict(commit, state=name)))
        with pytest.raises(checkpoint.CheckpointError, match="COMMIT is corrupt: .*bad state name"):
            checkpoint.load(run)
    state = run / commit["state"]
    kept = state.read_bytes()
    for make in ("fifo", "zero", "sparse", "declared"):
        state.unlink()
        (run / "COMMIT").write_text(json.dumps(commit))
        if make == "fifo":  # would block a reader forever
            os.mkfifo(state)
            match = "not a regular file"
        elif make == "zero":  # would fill memory
            state.symlink_to("/dev/zero")
            match = "symbolic link"
        elif make == "sparse":  # a legacy COMMIT without the state's size: bounded by MAX_READ
            with open(state, "wb") as f:
                f.truncate(checkpoint.MAX_READ + 1)
            (run / "COMMIT").write_text(json.dumps({k: v for k, v in commit.items() if k != "bytes"}))
            match = "more than the"
        else:  # the size COMMIT recorded is checked before reading
            state.write_bytes(kept + b"\0" * 10)
            match = f"{len(kept) + 10} bytes, but its commit recorded {len(kept)}"
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.load(run)


def test_links_inside_the_run_are_never_followed(tmp_path):
    """A component file, the components/ folder or COMMIT made a symbolic link to a copy outside: loading refuses
    them; a commit refuses to write through a linked components/ and pruning deletes nothing there."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    ck = _committed(run)
    comp = sorted((run / "components").iterdir())[0]
    outside.mkdir()
    (outside / comp.name).write_bytes(comp.read_bytes())
    comp.unlink()
    comp.symlink_to(outside / comp.name)
    with pytest.raises(checkpoint.CheckpointError, match=f"{comp.name} is a symbolic link"):
        checkpoint.load(run)
    comp.unlink()
    (run / "components").rename(tmp_path / "real")
    for f in (tmp_path / "real").iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
    (outside / "unrelated-1.msgpack").write_bytes(b"someone else's file")
    (run / "components").symlink_to(outside)
    before = _tree(outside)
    with pytest.raises(checkpoint.CheckpointError, match="components is a symbolic link"):
        checkpoint.load(run)
    with pytest.raises(checkpoint.CheckpointError, match="components is a symbolic link"):
        checkpoint.save(run, _system(), RUN_EXTRA, None)
    with pytest.raises(checkpoint.CheckpointError, match="components is a symbolic link"):
        checkpoint.prune(run, ck)
    assert _tree(outside) == before
    (run / "components").unlink()
    (tmp_path / "real").rename(run / "components")
    (run / "COMMIT").rename(outside / "COMMIT")
    (run / "COMMIT").symlink_to(outside / "COMMIT")
    with pytest.raises(checkpoint.CheckpointError, match="COMMIT is a symbolic link"):
        checkpoint.load(run)


def test_a_loop_of_links_is_one_error(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(checkpoint.CheckpointError, match="not a directory"):
        checkpoint.exists(loop) or checkpoint.load(loop)


def test_writes_replace_links_instead_of_following_them(tmp_path):
    """write_atomic (report.md, result.json, ...) and the metrics log replace or refuse a link at their name."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").symlink_to(victim)
    checkpoint.write_atomic(run / "report.md", b"# report")
    assert victim.read_bytes() == b"keep me" and not (run / "report.md").is_symlink()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(checkpoint.CheckpointError, match="symbolic link"):
        checkpoint.open_log(run / "metrics.jsonl")
    with pytest.raises(checkpoint.CheckpointError, match="symbolic link"):
        checkpoint.cut_log(run / "metrics.jsonl", 3)
    assert victim.read_bytes() == b"keep me"


# --- 7: the metrics log --------------------------------------------------------------------------------------


def test_log_length_is_synced_before_a_commit_records_it(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    with checkpoint.open_log(tmp_path / "metrics.jsonl") as f:
        f.write(b'{"a": 1}\n')
        assert checkpoint.synced_size(f) == 9
    assert synced == [str(tmp_path / "metrics.jsonl")]


def test_a_log_shorter_than_its_commit_is_kept_without_padding(tmp_path):
    """Resuming cuts the log back to its committed length; a log that is shorter (its last lines lost) used to be
    padded with NUL bytes up to that length. Now it is kept up to its last whole line, with a warning."""
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3')  # the last line torn
    said = []
    assert checkpoint.cut_log(log, 100, said.append) == 18
    assert log.read_bytes() == b'{"a": 1}\n{"b": 2}\n' and "recorded 100" in said[0] and "(18 bytes)" in said[0]
    assert checkpoint.cut_log(log, 9, said.append) == 9 and log.read_bytes() == b'{"a": 1}\n' and len(said) == 1
    assert checkpoint.cut_log(tmp_path / "gone.jsonl", 5, said.append) == 0  # a lost log: begun afresh
    assert (tmp_path / "gone.jsonl").read_bytes() == b"" and len(said) == 2


# --- 5, 8: image folders -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets data.py's own filter
def test_image_bomb_is_refused_as_a_corrupt_image(tmp_path):
    """A PNG of 12,000² pixels (tens of KB on disk, 432 MB decoded; under Pillow's own limit of 179 M pixels):
    refused from its header, without decoding, as unreadable images are."""
    import data
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    bomb = tmp_path / "a" / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)  # 1 bit per pixel: small to write, small on disk
    assert bomb.stat().st_size < 100_000
    with pytest.raises(data.DataError, match=r"bomb\.png \(ValueError: 12000×12000 pixels, more than the 16,777,216"):
        data.folder_task(tmp_path)
    with pytest.raises(data.DataError, match="cannot decode image .*bomb.png"):
        data.load_image(bomb)
    Image.new("1", (4096, 4096)).save(bomb)  # at the limit: read
    assert data.load_image(bomb).shape == (4096, 4096, 3)


# --- 2, 3, 5, 9: each drill through the CLI, in a real process: one line, exit 2, nothing written outside ------

MANIFEST = """
name = "drill"
seed = 0
report_set = ["digits"]
[root]
kind = "{kind}"
path = "{path}"
vit = "tiny"
resolutions = [8, 16]
resolution = 16
[[segments]]
name = "one"
method = "mu2net+"
tasks = ["{task}"]
generations = 1
children = 1
cycles = 1
samples_cap = 32
batch_size = 32
{extra}
"""


def _manifest(d: Path, name: str, kind: str = "random", path: str = "", task: str = "digits", extra: str = "") -> Path:
    p = d / f"{name}.toml"
    p.write_text(MANIFEST.format(kind=kind, path=path, task=task, extra=extra))
    return p


def _csv_edit(state: Path, dst: Path, column: str, value: str) -> Path:
    """A copy of a published state whose path 7 (task t_a) has `column` = `value` in population.csv."""
    import csv
    import shutil
    shutil.copytree(state, dst)
    with open(dst / "population.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["id"] == "7":
            r[column] = value
    with open(dst / "population.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    """A published state in the notebook's layout (test_published's writer)."""
    from test_published import _state
    return _state().save(tmp_path_factory.mktemp("exp"), 3, 0)


@pytest.fixture(scope="module")
def drills(tmp_path_factory, state):
    """Tampered run directories, states and folders (under `d/w`, each drill's outside world under `d`), each
    given to the CLI in its own process, three processes at a time."""
    import concurrent.futures

    import evolve
    d = tmp_path_factory.mktemp("drills")
    w = d / "w"
    w.mkdir()
    (d / "outside.txt").write_bytes(b"not yours")
    (d / "outside").mkdir()
    img = d / "img.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)

    def run(name: str, edit=None, extra: dict | None = None) -> Path:
        r = w / name
        _committed(r, extra)
        if edit:
            _rewrite(r, edit)
        return r

    def comp(field, value):
        return lambda s: s["components"][_one_component(s)].update({field: value})

    cases: dict[str, tuple[list[str], str, bool]] = {}  # name -> (argv, what the line names, in a real process)
    r = run("dotdot", comp("file", "../../outside.txt"))
    cases["predict: a component file ../../outside.txt"] = (["predict", str(r), "--task", "digits", str(img)],
                                                        "bad component record", True)
    r = run("zero", comp("file", "../" * 40 + "dev/zero"))
    cases["export: a component file ../../(...)/dev/zero"] = (["export", str(r), "--task", "digits", str(w / "x.npz")],
                                                  "bad component record", True)
    r = run("nofile", lambda s: s["components"][_one_component(s)].pop("file"))
    cases["predict: no file key"] = (["predict", str(r), "--task", "digits", str(img)], "bad component record", False)
    r = run("state")
    c = json.loads((r / "COMMIT").read_text())
    (r / "COMMIT").write_text(json.dumps(dict(c, state="..")))
    cases["system root: a '..' state"] = (["--manifest", str(_manifest(w, "sys", "system", str(r))), "--out",
                                           str(w / "out-sys"), "--compile-cache", ""], "bad state name '..'", True)
    r = run("linked")
    (d / "outside" / "components").mkdir()
    for f in (r / "components").iterdir():
        f.rename(d / "outside" / "components" / f.name)
    (r / "components").rmdir()
    (r / "components").symlink_to(d / "outside" / "components")
    cases["report: components/ a link outside"] = (["report", str(r)], "components is a symbolic link", True)
    loop = w / "loop"
    loop.symlink_to(loop)
    cases["predict: a loop of links"] = (["predict", str(loop), "--task", "digits", str(img)], "not a directory",
                                         False)
    r = run("nohist", lambda s: s["extra"].pop("history"))
    cases["report: no history"] = (["report", str(r)], "extra.history is missing", False)
    entry = dict(segment="start", test_acc_set=0.5, set_tasks=1, params=1.0, flops=1.0, models=1, test={"digits": 0.5})
    r = run("nosegment", lambda s: s["extra"].update(history=[{k: v for k, v in entry.items() if k != "segment"}]))
    cases["report: a history entry without its segment"] = (["report", str(r)], "extra.history[0].segment is missing",
                                                             False)
    r = run("nohp", lambda s: s["extra"].update(history=[dict(entry, retained={"digits": {"id": "digits/1"}})]))
    cases["report: a retained record without hp"] = (["report", str(r)], "extra.history[0].retained = ", False)
    m = _manifest(w, "resume")
    r = run("bytes", lambda s: s["extra"].update(metrics_bytes="x"),
            dict(RUN_EXTRA, manifest=evolve.resolved(evolve.load_manifest(m))))  # the resume reaches the log
    cases["resume: metrics_bytes = 'x'"] = (["--manifest", str(m), "--out", str(r),
                                             "--compile-cache", ""], "extra.metrics_bytes = 'x'", True)
    runs = [run(f"named{i}", lambda s: s["extra"]["manifest"].update(name="../x")) for i in range(2)]
    cases["report RUN1 RUN2: a manifest name ../x"] = (["report", *map(str, runs)], "a relative path without '..'",
                                                      True)
    for col, val in [("id", "seven"), ("id", "nan"), ("id", "1e30"), ("parent_id", ""), ("task_name", ""),
                     ("hparams.ds_image_size", "big"), ("hparams.opt_lr", "fast")]:
        bad = _csv_edit(state, w / f"state-{col}-{val}", col, val)
        m = _manifest(w, f"pub-{col}-{val}", "mu2net_state", str(bad))
        cases[f"published state: {col} = {val!r}"] = (
            ["--manifest", str(m), "--out", str(w / f"out-{col}-{val}"), "--compile-cache", ""],
            f"{col} = {val!r}" if val in ("", "seven", "big", "fast") else f"{col} = {float(val)!r}", val == "seven")
    folder = w / "utf8"
    for c in (b"\xff\xfe", b"ok"):
        os.makedirs(os.path.join(os.fsencode(folder), c))
        for i in range(2):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(os.fsdecode(os.path.join(os.fsencode(folder), c, b"%d.png" % i)))
    m = _manifest(w, "utf8", task="mine", extra=f'[tasks.mine]\nfolder = "{folder}"')
    cases["a class folder named b'\\xff\\xfe'"] = (["--manifest", str(m), "--out", str(w / "out-utf8"),
                                                     "--compile-cache", ""], "not printable UTF-8", True)
    m = _manifest(w, "unwritable")
    cases["--out /proc/mu2net-drill"] = (["--manifest", str(m), "--out", "/proc/mu2net-drill", "--compile-cache", ""],
                                         "cannot write /proc/mu2net-drill", True)
    cases["--out below a loop of links"] = (["--manifest", str(m), "--out", str(loop / "run"), "--compile-cache", ""],
                                            "Too many levels of symbolic links", False)
    r = run("export", extra=dict(RUN_EXTRA, manifest=evolve.resolved(evolve.load_manifest(m)),
                                 classes={"digits": ["0", "1"]}))
    cases["export: /proc/x.npz"] = (["export", str(r), "--task", "digits", "/proc/x.npz"],
                                    "cannot write /proc/x.npz", False)
    before = _tree(d, skip=w)

    def cli(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(HERE / "evolve.py"), *argv], cwd=d, capture_output=True, text=True,
                              timeout=300, env={k: v for k, v in os.environ.items() if k != evolve.KILL_ENV})

    real = [n for n, (_, _, r) in cases.items() if r]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        done = dict(zip(real, ex.map(cli, [cases[n][0] for n in real])))
    return dict(cases=cases, done=done, before=before, after=_tree(d, skip=w), w=w, d=d)


def _one_error_line(rc: int, err: str, words: str) -> bool:
    return rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and words in err


def test_every_drill_is_one_line_and_exit_2(drills):
    """In real processes: a traversal, /dev/zero, a '..' state, a linked components/, a bad metrics_bytes, a
    manifest name leaving the report folder, a text id in a published state, a non-UTF-8 class folder, an --out
    that cannot be made."""
    bad = {n: (r.returncode, r.stderr[-600:]) for n, r in drills["done"].items()
           if not _one_error_line(r.returncode, r.stderr, drills["cases"][n][1])}
    assert not bad and len(drills["done"]) == 9, bad


def test_the_other_drills_in_process(drills, capsys):
    """The same checks as the CLI's, each variant once more through evolve.main (no process start)."""
    import evolve
    bad = {}
    for name, (argv, words, real) in drills["cases"].items():
        if not real:
            rc = evolve.main(argv)
            err = capsys.readouterr().err
            if not _one_error_line(rc, err, words):
                bad[name] = (rc, err[-600:])
    assert not bad, bad
    assert _tree(drills["d"], skip=drills["w"]) == drills["before"]


def test_no_drill_wrote_outside_its_run_directory(drills):
    assert drills["after"] == drills["before"]
    w = drills["w"]
    # The published-state and folder checks come before the run directory is made.
    assert not [p.name for p in w.iterdir() if p.name.startswith("out-") and p.name != "out-sys"]



def test_a_read_only_run_and_a_pretraining_that_keeps_nothing_are_one_line(tmp_path, monkeypatch, capsys):
    """`report` on a read-only run directory (EROFS at the checkpoint's write helper, as a read-only mount gives
    it; then ENOSPC, a full disk: status DISK_FULL) and a pre-training whose every child is discarded (a trainer
    that keeps none, as a NaN loss does): one line, exit 2; the run directory holds no commit and nothing is written
    beside it."""
    import errno

    import evolve
    import schedule
    run = tmp_path / "w" / "ro"
    _committed(run)
    before = _tree(tmp_path)

    def erofs(d, name, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "_write_at", erofs)
        assert evolve.main(["report", str(run)]) == 2
    assert _one_error_line(2, capsys.readouterr().err, f"cannot write {run / 'report.md'}: Read-only file system")
    assert _tree(tmp_path) == before

    def enospc(d, name, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as mp:  # a full disk instead: its own status
        mp.setattr(checkpoint, "_write_at", enospc)
        assert evolve.main(["report", str(run)]) == evolve.DISK_FULL
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on device while writing {run / 'report.md'}")
    assert err.count("\n") == 1
    assert _tree(tmp_path) == before
    (tmp_path / "m.toml").write_text(MANIFEST.format(kind="random", path="", task="digits", extra="") .replace(
        "[[segments]]", '[root.pretrain]\ntask = "digits/parity"\nsamples_cap = 32\nbatch_size = 32\n[[segments]]'))
    monkeypatch.setattr(schedule.Local, "__call__", lambda self, pool, todo, *a, **k: {p.index: None for p in todo})
    out = tmp_path / "w" / "nan"
    assert evolve.main(["--manifest", str(tmp_path / "m.toml"), "--out", str(out), "--compile-cache", ""]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress lines, when the run's stream is this test's stderr
    assert "Traceback" not in err and last.startswith("error: root.pretrain: every child of the pre-training on "
                                                      "'digits/parity' was discarded"), err[-2000:]
    assert not checkpoint.exists(out) and not (out / checkpoint.LOCK).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml", "w"]


# --- 11: the published-state reader's memory ------------------------------------------------------------------


def test_zip_bomb_and_oversized_entries_are_refused_by_their_declared_sizes(tmp_path, monkeypatch, state):
    """A population.csv declaring more than MAX_CSV (here lowered to 1 MB; a 2 MB member of zeros, 2 KB deflated)
    is refused before it is read; a checkpoint entry declaring 4 GiB (a 6-byte header) is refused by msgpack's
    bound on one entry (MAX_ENTRY), before any of it is buffered."""
    import zipfile

    import published
    monkeypatch.setattr(published, "MAX_CSV", 1 << 20)
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as f:
        f.writestr("exp/state_1_0/population.csv", b"\0" * (2 << 20))
        f.writestr("exp/state_1_0/checkpoint_1_0", b"")
    assert z.stat().st_size < 10_000
    with pytest.raises(published.StateError, match=r"population.csv: declares 2,097,152 bytes, more than the "
                                                   r"1,048,576"):
        published.read(str(z))
    import shutil
    state = shutil.copytree(state, tmp_path / "exp")
    ck = state / "checkpoint_3_0"
    ck.write_bytes(b"\x81" + msgpack.packb("head:13") + b"\xc9\xff\xff\xff\xff\x01")  # {head:13: ext32 of 4 GiB}
    with pytest.raises(published.StateError, match="checkpoint_3_0: not a readable Flax msgpack .*exceeds"):
        published.read(str(state))


def test_published_memory_bench_runs(tmp_path):
    """bench/published_memory.py at a tiny size (its figures on a ≥ 1 GB state are in docs/guarantees.md): the
    peak above the resident size before the read stays within the arrays read plus what one entry needs."""
    from bench import published_memory
    out = published_memory.main(["--gb", "0.0005", "--config", "tiny", "--dir", str(tmp_path)])
    m = out["folder"]
    assert out["array_bytes"] >= 5e5 and m["held"] >= out["array_bytes"] // 2
    assert 0 < m["peak_above_before"] <= out["array_bytes"] + (64 << 20)


def test_a_full_disk_at_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    """LOCK is created, then written: a full disk in between removes it, so the next run is not refused by an
    empty lock; the error is one line naming it."""
    import errno

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_put", enospc)
    with pytest.raises(checkpoint.DiskFull, match=f"while writing {tmp_path / 'run' / checkpoint.LOCK}"):
        with checkpoint.lock(tmp_path / "run"):
            pass
    assert not (tmp_path / "run" / checkpoint.LOCK).exists()


# --- 10: signals and peers ------------------------------------------------------------------------------------

LATE = r"""
import os, signal, sys, time
import runlog
runlog.exit_on_signals()  # as evolve.py's __main__
with runlog.Stop() as stop:  # a run that stops at its safe point, as evolve.run
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop()
print("stopped at a safe point", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGINT)  # a second signal while the process shuts down
time.sleep(60)
"""


def test_a_late_second_signal_exits_128_plus_n_without_a_traceback():
    """After a run's `Stop` gave its handlers back, a second signal ends the process at once with 128 + n and one
    line, not a KeyboardInterrupt traceback (Python's default handler) nor a kill by the signal."""
    r = subprocess.run([sys.executable, "-c", LATE], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + 2, r.stderr[-2000:]
    assert r.stderr.splitlines()[-1] == "SIGINT: stopped at once; a run's last commit stands"
    assert "Traceback" not in r.stderr
    src = (HERE / "evolve.py").read_text()
    assert src.split('if __name__ == "__main__":')[1].lstrip().startswith("exit_on_signals()")


def test_a_lost_process_ends_the_others_at_once_with_one_line(tmp_path):
    """Process 1 of 2 killed (SIGKILL) once the run has started: process 0 meets it at its next collective and
    ends with one line naming it and `PEER_LOST`, not by JAX's shutdown barrier (which waits for the lost
    heartbeat, then aborts); its last commit stands."""
    import socket

    import conftest
    import evolve
    from test_evolve import SMALL
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    (tmp_path / "m.toml").write_text(SMALL)
    env = {k: v for k, v in os.environ.items() if k != evolve.KILL_ENV}
    env["XLA_FLAGS"] = conftest.CPU_FLAGS.format(2)
    procs = [subprocess.Popen([sys.executable, str(HERE / "evolve.py"), "--manifest", str(tmp_path / "m.toml"),
                               "--out", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--compile-cache", ""], cwd=HERE,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for line in procs[1].stderr:
        if "P = " in line:  # the segment has started: process 1 is about to train its child
            procs[1].kill()
            break
    procs[1].wait(timeout=60)
    _, err = procs[0].communicate(timeout=300)
    assert procs[0].returncode == evolve.PEER_LOST, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 1 of the run is lost (") and "the last commit stands" in last, last
    assert "Traceback" not in err and "Check failure" not in err
    assert checkpoint.load(tmp_path / "run").extra["cursor"] == [0, 0, 0]
    assert not (tmp_path / "run" / checkpoint.LOCK).exists()  # released as the error left the run


# --- 12: what a resume and the other processes say --------------------------------------------------------------


def test_resume_and_stop_lines_say_where_the_run_is():
    """A resume committed after its task's last generation says so (not "generation 2/1"); a process other than
    the main one, which commits nothing itself, says process 0 committed (not "(no commit)")."""
    from types import SimpleNamespace as NS

    import evolve
    import runlog
    ck = NS(state="state-000004.msgpack", extra={"version": "abc"})
    last = runlog.resuming_at("runs/x", (0, 0, 1), NS(generation=1, done=None), 1, ck)
    assert last == ("resuming runs/x at segment 0, iteration 0, task 1, after its last generation (1/1) "
                    "(state state-000004.msgpack, code abc)")
    mid = runlog.resuming_at("runs/x", (0, 0, 1), NS(generation=0, done={0: None}), 2, ck)
    assert ", generation 1/2 (1 of its children done) (state" in mid
    assert ", generation" not in runlog.resuming_at("runs/x", (1, 0, 0), None, 2, ck)
    r = evolve.Run(None, "runs/x", None, None, None, NS(main=False), None, None, [], None)
    assert "committed to runs/x (by process 0); rerun" in str(r.stopped("generation 1/2 of task 'digits'"))
    r = evolve.Run(None, "runs/x", None, None, None, NS(main=True), None, None, [], None, ck=ck)
    assert "committed to runs/x (state-000004.msgpack); rerun" in str(r.stopped("generation 1/2 of task 'digits'"))
