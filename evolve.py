"""The continual runner: a manifest of experiment segments → one ever-growing multitask system (paper Section 5).

A manifest (TOML) names where the system starts (a root ViT: AugReg `.npz`, a random init with an optional
pre-training iteration; or a system: a previous run's, or the authors' published μ2Net state), the seed, and an
ordered list of experiment segments — each a method (μ2Net, μ2Net+ or a Section 4 baseline) with its budgets, score
parameters and the tasks it iterates over.
The runner executes every task iteration of every segment in order (Algorithm 1 via `mu2net.task_iteration`),
commits a checkpoint after every generation and every task iteration (checkpoint.py), and reports the three Figure 3
metrics at each segment's end (report.py). Rerunning the same command resumes from the last commit; a
killed-and-resumed run ends bit-identical to an uninterrupted one because every task iteration's key is a pure
function of (seed, segment, iteration, task) and the state between generations is a value (`mu2net.Iteration`).
SIGTERM / SIGINT stop at a safe point with a commit; one run may span many processes (exchange.py).

    python evolve.py                                       # the quickstart (manifests/quickstart.toml)
    python evolve.py --manifest manifests/paper_sec5.toml --out runs/sec5 --seed 3
    python evolve.py --set segments.0.generations=2 --set root.pretrain.cycles=1
    python evolve.py predict runs/quickstart-seed0 --task digits photos/ --top-k 3 --format csv
    python evolve.py export runs/quickstart-seed0 --task digits digits.npz
    python evolve.py --manifest M --out gs://bucket/run --distributed       # on every host of a TPU pod slice

Every user-input error (manifest, data, checkpoint or state) prints one line and exits with status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import tyro

import checkpoint
import data
import exchange
import mu2net
import published
import report
import serve
import vit
from manifest import (DEFAULT_MANIFEST, Manifest, ManifestError, UserTask, image_size, load_manifest, penalties,
                      report_tasks, root_config, runs, segment_tasks, task_names, to_dict, validate)
from manifest import config as segment_config

KILL_ENV = "MU2NET_TEST_KILL_AFTER"  # tests: os._exit after this many finished child trainings
STOPPED = 3  # exit status of a run stopped by SIGTERM / SIGINT at a safe point: it resumes where it stopped
ROOT_TAG = 0x524F4F54  # "ROOT": fold-in tag of the root's keys, apart from the small segment indices


def iteration_key(seed: int, segment: int, iteration: int, task: int) -> jax.Array:
    """The key of one task iteration: a fold-in chain of its coordinates, so no RNG state is carried."""
    k = jax.random.key(seed)
    for i in (segment, iteration, task):
        k = jax.random.fold_in(k, i)
    return k


def key_data(k: jax.Array) -> list[int]:
    return [int(x) for x in jax.random.key_data(k).reshape(-1)]


class Tasks:
    """TaskData by name, opened on first use (one run's cache; never module state), and the class names of every
    task opened (kept with the run's checkpoint, for `predict` and `export`)."""

    def __init__(self, m: Manifest, stream: Any = sys.stderr):
        self.m, self.size, self.open, self.stream = m, image_size(m), {}, stream
        self.classes: dict[str, list[str]] = {}

    def __call__(self, name: str) -> mu2net.TaskData:
        if name not in self.open:
            m = self.m
            if name in m.tasks:
                u = m.tasks[name]
                spec = data.folder_task(u.folder, name, u.num_classes or None, dict(u.splits) or None, u.skip_bad,
                                        lambda msg: print(msg, file=self.stream, flush=True))
            else:
                spec = data.resolve_tasks([name], m.catalog or None)[0]
            self.open[name] = data.make_task_data(spec, self.size, m.data_dir or None)
            self.classes[name] = data.class_names(spec, m.data_dir or None)
        return self.open[name]


def check_data(m: Manifest, tasks: Tasks) -> set[str]:
    """Before any work: every TFDS dataset the run reads must be prepared (data.check_prepared: one error listing
    the missing ones and the command that prepares them), and every image folder task is opened, which decodes
    each of its images (data.folder_task). Returns the tasks the catalog marks unavailable; the run leaves them
    out."""
    written = [n for s in m.segments for n in s.tasks] + ([m.root.pretrain.task] if m.root.pretrain.task else [])
    catalog = list(dict.fromkeys(n for n in written if n not in m.tasks))
    unavailable = set(data.check_prepared(data.resolve_tasks(catalog, m.catalog or None), m.data_dir or None,
                                          catalog))
    for name in task_names(m, written):
        if name in m.tasks:
            tasks(name)
    return unavailable


# --- progress and metrics ------------------------------------------------------------------------------------


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """What a run shows and logs. On stderr: one line per finished child and per generation (segment, task,
    generation, child, elapsed, ETA from the children finished so far), and inside a long child its step, images/s,
    loss and ETA every `every` seconds. In `metrics` (JSON lines; None on processes other than the main one): every
    record, the in-child progress every `log_every` seconds. `log` is called from several training threads, hence
    the lock; a record can be only shown (a child trained here whose record the exchange logs later) or only
    recorded (a child trained by another process)."""

    def __init__(self, metrics: Path | None, total: int, elapsed: float, stream: Any = sys.stderr,
                 every: float = 30.0, log_every: float = 300.0):
        self.lock = threading.Lock()
        self.metrics = checkpoint.open_log(metrics) if metrics else None
        self.total, self.done, self.t0, self.before = total, 0, time.monotonic(), elapsed
        self.stream, self.where, self.cycles, self.gen = stream, {}, 1, {}
        self.every, self.log_every, self.steps = every, log_every, {}
        self.kill_after = int(os.environ.get(KILL_ENV, "0") or 0)

    def at(self, cycles: int, **where: Any) -> None:
        with self.lock:
            self.where, self.cycles = where, cycles

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.t0

    def write(self, rec: Mapping[str, Any]) -> None:
        with self.lock:
            self._write(rec)

    def _write(self, rec: Mapping[str, Any]) -> None:
        if self.metrics:
            line = json.dumps({**rec, "elapsed": round(self.elapsed(), 3)}, default=str)
            self.metrics.write(line.encode() + b"\n")
            self.metrics.flush()

    def size(self) -> int:
        with self.lock:
            if not self.metrics:
                return 0
            return checkpoint.synced_size(self.metrics)  # on disk before a commit records it

    def _step(self, rec: dict) -> None:
        """Inside a child: time-based, so a report costs one device sync (the loss) per `every` seconds."""
        now, child, step = time.monotonic(), rec["child"], rec["step"]
        if child not in self.steps:  # the child's first step: the clock starts
            self.steps[child] = (now, step, now, now)
            return
        t0, s0, shown, logged = self.steps[child]
        due_show, due_log = now - shown >= self.every, now - logged >= self.log_every
        if not (due_show or due_log):
            return
        rate = (step - s0) / max(now - t0, 1e-9)  # steps/s since the child's first step (compile included)
        out = dict(event="step", child=child, step=step, steps=rec["steps"], loss=float(rec["loss"]),
                   images_per_s=round(rate * rec["batch"], 1), eta=round((rec["steps"] - step) / max(rate, 1e-9), 1))
        if due_show:
            print(f"[{self.where.get('segment_name')}] {self.where.get('task')} child {child} step {step}/"
                  f"{rec['steps']} {out['images_per_s']:.1f} img/s loss {out['loss']:.4f} | child ETA "
                  f"{_hms(out['eta'])}", file=self.stream, flush=True)
        if due_log:
            self._write({**self.where, **out})
        self.steps[child] = (t0, s0, now if due_show else shown, now if due_log else logged)

    def __call__(self, rec: dict, show: bool = True, record: bool = True) -> None:
        with self.lock:
            w = self.where
            ev = rec.get("event")
            if ev == "step":
                if show:
                    self._step(rec)
                return
            if record:
                self._write({**w, **rec})
            if not show:
                return
            if ev == "child":
                self.gen[rec.get("child")] = rec.get("generation", 0)
            elif ev == "discarded" or (ev == "cycle" and rec.get("cycle") == self.cycles - 1):
                self.done += 1
                self.steps.pop(rec.get("child"), None)
                run = time.monotonic() - self.t0
                eta = run / self.done * max(self.total - self.done, 0)
                what = (f"discarded: {rec.get('reason')}" if ev == "discarded" else
                        f"val {rec.get('quality', 0):.4f} score {rec.get('score', 0):.4f}")
                print(f"[{w.get('segment_name')}] it {w.get('iteration', 0) + 1}/{w.get('iterations')} "
                      f"task {w.get('task_index', 0) + 1}/{w.get('num_tasks')} {w.get('task')} "
                      f"gen {self.gen.get(rec.get('child'), 0) + 1}/{w.get('generations')} "
                      f"child {rec.get('child')} {what} "
                      f"| {self.done}/{self.total} children, elapsed {_hms(self.elapsed())}, ETA {_hms(eta)}",
                      file=self.stream, flush=True)
                if self.kill_after and self.done >= self.kill_after:
                    if self.metrics:
                        self.metrics.flush()
                    os._exit(75)  # tests: die like a killed job, mid-iteration, without any clean-up
            elif ev == "generation":
                print(f"[{w.get('segment_name')}] task {w.get('task')} generation {rec.get('generation', 0) + 1}/"
                      f"{w.get('generations')} done: retained {rec.get('retained')}, best score {rec.get('best')}",
                      file=self.stream, flush=True)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()


class Stop:
    """SIGTERM and SIGINT (a preempted VM, a scheduler's time limit, ctrl-C): the first asks the run to stop at its
    next safe point (after the children in flight), commit and exit with `STOPPED`; a second stops at once, and the
    last commit stands."""

    def __init__(self, stream: Any = sys.stderr):
        self.signum, self.stream, self.old = None, stream, {}

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # the second signal: at once; the checkpoint protocol keeps the last commit
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the children in flight, then committing "
              f"(a second signal stops at once; the last commit stands)", file=self.stream, flush=True)

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


class Stopped(Exception):
    """The run stopped at a safe point on a signal; its last commit resumes it."""


# --- the run -------------------------------------------------------------------------------------------------


def _check_root(m: Manifest, cfg: vit.Config) -> None:
    """A system read from root.path must be the ViT the manifest names, at resolutions its patch divides."""
    r = m.root
    if r.vit and vit.CONFIGS[r.vit] != cfg:
        raise ManifestError(f"root.vit = {r.vit!r} ({vit.CONFIGS[r.vit]}) but the system at root.path = {r.path!r} "
                            f"is a {cfg}; set root.vit = '' to take it from the file")
    for i, res in enumerate(r.resolutions):
        if res % cfg.patch:
            raise ManifestError(f"root.resolutions[{i}] = {res}: expected a multiple of the patch size {cfg.patch} "
                                f"of the system at root.path = {r.path!r}")


def _local(path: str) -> str:
    return path if path.startswith("gs://") else str(Path(path).expanduser())


def machine() -> dict[str, Any]:
    """What a run's numbers depend on besides the manifest and the code: XLA's CPU code changes with the
    instruction set it may use (`XLA_FLAGS=--xla_cpu_max_isa`) and with the number of cores it splits work over
    (README, "Reproducibility"). CPU model, its AVX-512 and AMX flags, usable cores, XLA_FLAGS, jax, backend."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name":
                cpu = v.strip()
            elif k.strip() == "flags":
                flags = {f for f in v.split() if f.startswith(("avx512", "amx"))}
    except OSError:
        pass
    return dict(cpu=cpu, isa=" ".join(sorted(flags)), cores=len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__,
        backend=jax.default_backend())


def build_root(m: Manifest, tasks: Tasks, progress: Progress | None, train: mu2net.Train | None = None
               ) -> mu2net.System:
    """The start state (Section 5 starts from a system; Section 4 from a ViT root). Every process of a run builds
    it alike (a random root from the seed; a file root from its own copy of the file)."""
    r = m.root
    if r.kind == "system":
        return checkpoint.load(_expand(r.path)).system
    if r.kind == "mu2net_state":
        log = (lambda s: print(s, file=progress.stream, flush=True)) if progress else None
        system = published.read(_local(r.path), log)
        _check_root(m, system.cfg)
        # The manifest's root hyperparameters, as for the other kinds; the published root has none of its own.
        return dataclasses.replace(system, root=dataclasses.replace(system.root, hp=dict(r.hp)))
    full = root_config(r)
    if full is None:
        raise ManifestError(f"root.path = {r.path!r}: no such file (root.vit = '' reads the config from it)")
    cfg = dataclasses.replace(full, depth=r.depth or full.depth)
    res = r.resolution or max(r.resolutions)
    # Only the manifest's own root hyperparameters: a child fills the rest from its segment's search-space
    # defaults (μ2Net's mild preprocessing, μ2Net+'s none), which a full default dict here would shadow.
    hp = dict(r.hp)

    def cut(comps: dict) -> dict:
        return {k: v for k, v in comps.items() if (vit.block_index(k) or 0) < cfg.depth}

    if r.kind == "augreg":
        return mu2net.new_system(cfg, cut(vit.load_augreg(Path(r.path).expanduser(), full)), hp)
    key = jax.random.fold_in(jax.random.key(m.seed), ROOT_TAG)
    comps = cut(vit.init(full, jax.random.fold_in(key, 0), 2, res))
    system = mu2net.new_system(cfg, comps, hp)
    pt = r.pretrain
    if not pt.task:
        return system
    name = task_names(m, [pt.task])[0]
    conf = segment_config(m, pt, cfg.depth)
    start = mu2net.new_system(cfg, comps, hp | dict(pt.hp))
    progress.at(pt.cycles, segment=-1, segment_name="pretrain", iteration=0, iterations=1, task_index=0,
                num_tasks=1, task=name, generations=pt.generations)
    trained = mu2net.task_iteration(start, tasks(name), conf, jax.random.fold_in(key, 1), progress, train=train)
    best = trained.models.get(name)
    if best is None:
        raise RuntimeError(f"pre-training on {name!r} retained no model")
    progress.write(dict(event="pretrain", task=name, metrics=dict(best.metrics)))
    named = {mu2net.kind(c): trained.params[c] for c in best.components}
    return mu2net.new_system(cfg, named, hp)


def _expand(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser())


def _total_children(m: Manifest, ntasks: Sequence[int], cursor: tuple[int, int, int], pretrain: bool,
                    pending: mu2net.Iteration | None = None) -> int:
    n = m.root.pretrain.generations * m.root.pretrain.children if pretrain else 0
    if pending:
        n -= pending.generation * m.segments[cursor[0]].children + len(pending.done or {})
    for i, s in enumerate(m.segments):
        per = s.generations * s.children
        k = ntasks[i]
        for it in range(s.iterations):
            for t in range(k):
                if (i, it, t) >= cursor:
                    n += per
    return n


def _next(m: Manifest, ntasks: Sequence[int], cursor: tuple[int, int, int]) -> tuple[int, int, int]:
    seg, it, t = cursor
    t += 1
    if t == ntasks[seg]:
        t, it = 0, it + 1
    if it == m.segments[seg].iterations:
        it, seg = 0, seg + 1
    return seg, it, t


def _resolved(m: Manifest) -> dict:
    # JSON round trip so floats like inf and tuples compare as they are stored.
    return json.loads(json.dumps(to_dict(m)))


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: checkpoint {a!r} vs now {b!r}"]


def run(m: Manifest, out: str | os.PathLike, stream: Any = sys.stderr, hosts: exchange.Hosts | None = None,
        every: float = 30.0, log_every: float = 300.0) -> mu2net.System:
    """Runs (or resumes) the manifest's whole sequence in `out` (a directory or an fsspec URL such as gs://…) and
    returns the final system. Every check of the manifest's inputs (root path, data) runs before `out` is touched.
    A checkpoint is committed after every generation and every task iteration; SIGTERM or SIGINT stop at the next
    safe point with a commit (raising `Stopped`). With several processes (`hosts`), every process runs this
    function alike and the main one alone touches `out`."""
    hosts = hosts or exchange.Hosts()
    out = _expand(str(out))
    store = checkpoint.Store(out)
    r = m.root
    tasks = Tasks(m, stream)
    unavailable = check_data(m, tasks)
    names = [[t for t in segment_tasks(m, s) if t not in unavailable] for s in m.segments]
    if unavailable:
        print(f"warning: left out {len(unavailable)} task(s) the catalog marks unavailable (no TFDS builder can "
              f"prepare them): {', '.join(sorted(unavailable))}", file=stream, flush=True)
    for i, n in enumerate(names):
        if not n:
            raise ManifestError(f"segments[{i}].tasks = {list(m.segments[i].tasks)}: no task left that can be read")
    # On an object store the log and the reports are written locally and uploaded at each commit.
    with contextlib.ExitStack() as stack:
        work = Path(out)
        if not store.local and hosts.main:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mu2net-"))) / Path(store.root).name

        def first() -> bytes:
            # gs:// roots are read by their own reader (published.read): no existence check without the network
            root = checkpoint.Store(_expand(r.path)) if r.kind != "random" and not r.path.startswith("gs://") else None
            if root and not root.fs.exists(root.root) and not checkpoint.exists(out):
                raise ManifestError(f"root.path = {r.path!r} (root.kind = {r.kind!r}): no such file or directory")
            work.mkdir(parents=True, exist_ok=True)
            return b"1" if checkpoint.exists(out) else b"0"

        resuming = hosts.share(first) == b"1"
        hosts.share(lambda: (stack.enter_context(checkpoint.lock(out)), b"")[1])
        stop = stack.enter_context(Stop(stream))
        return _run(m, out, store, work, resuming, stream, hosts, stop, every, log_every, tasks, names)


def _run(m: Manifest, out: str, store: checkpoint.Store, work: Path, resuming: bool, stream: Any,
         hosts: exchange.Hosts, stop: Stop, every: float, log_every: float, tasks: Tasks,
         names: Sequence[Sequence[str]]) -> mu2net.System:
    ntasks = [len(n) for n in names]
    resolved = _resolved(m)
    rtasks = report_tasks(m)
    train = hosts.train(stop)
    metrics = work / "metrics.jsonl" if hosts.main else None
    share = len(jax.local_devices()) / len(jax.devices())  # this process's share of the children

    def upload(*files: str) -> None:
        if hosts.main and not store.local:
            for f in files:
                if (work / f).exists():
                    store.write(f, (work / f).read_bytes())

    def upload_all() -> None:
        """The reports (report.md, the figures, result.json) as written in `work`."""
        upload(*sorted(p.name for p in work.iterdir() if p.is_file() and p.name != "metrics.jsonl")
               if hosts.main and not store.local else ())

    pending = None
    if resuming:
        # a damaged checkpoint raises here, before anything is written
        ck = checkpoint.load(out, read=lambda name: hosts.share(lambda: store.read(name)))
        diff = _diff(ck.extra.get("manifest"), resolved)
        if diff:
            raise ManifestError(f"{out} holds a run of another manifest; refusing to resume it with this one "
                                f"(use another --out). Differences:\n  " + "\n  ".join(diff[:20]))
        if metrics:
            if not store.local:
                metrics.write_bytes(store.read("metrics.jsonl") if store.exists("metrics.jsonl") else b"")
            checkpoint.cut_log(metrics, ck.extra["metrics_bytes"], lambda s: print(s, file=stream, flush=True))
        system, cursor, pending = ck.system, tuple(ck.extra["cursor"]), ck.pending
        if cursor[0] < len(m.segments) and ck.extra.get("key") != key_data(iteration_key(m.seed, *cursor)):
            raise checkpoint.CheckpointError(f"{store.name(ck.state)}: the stored key of task iteration {cursor} is "
                                             f"not the one this code derives from seed {m.seed}; refusing to resume")
        if pending and (cursor[0] >= len(m.segments) or pending.task != names[cursor[0]][cursor[2]]):
            raise checkpoint.CheckpointError(f"{store.name(ck.state)}: its task iteration in progress "
                                             f"({pending.task!r}) is not the one at its cursor {cursor}; refusing to "
                                             f"resume")
        history = list(ck.extra["history"])
        tasks.classes = {**ck.extra.get("classes", {}), **tasks.classes}
        progress = Progress(metrics, round(_total_children(m, ntasks, cursor, False, pending) * share),
                            float(ck.extra["elapsed"]), stream, every, log_every)
        where = "" if not pending else (f", generation {pending.generation + 1}/{m.segments[cursor[0]].generations}"
                                        + (f" ({len(pending.done)} of its children done)"
                                           if pending.done is not None else ""))
        print(f"resuming {out} at segment {cursor[0]}, iteration {cursor[1]}, task {cursor[2]}{where} "
              f"(state {ck.state}, code {ck.extra.get('version')})", file=stream, flush=True)
    else:
        if metrics:
            checkpoint.write_atomic(metrics, b"")
        total = _total_children(m, ntasks, (0, 0, 0), bool(m.root.pretrain.task))
        progress = Progress(metrics, round(total * share), 0.0, stream, every, log_every)
        try:
            system = build_root(m, tasks, progress, train)
        except mu2net.Stopped:
            raise Stopped(f"stopped during the root's pre-training, before the first commit: {out} holds nothing "
                          f"yet, and rerunning starts afresh") from None
        cursor, history, ck = (0, 0, 0), [], None
        history.append(report.summary(system, rtasks, "start"))
    if hosts.main:
        checkpoint.write_atomic(work / "manifest.json", (json.dumps(resolved, indent=2) + "\n").encode())
        upload("manifest.json")
    version = checkpoint.code_version()
    here = machine()
    machines = list(ck.extra.get("machines", [])) if ck else []
    machines += [here] if here not in machines else []

    def commit(system: mu2net.System, cursor: tuple[int, int, int], prev: checkpoint.Checkpoint | None,
               state: mu2net.Iteration | None = None, final: bool = False) -> checkpoint.Checkpoint | None:
        """Commits on the main process. A full disk leaves `prev` standing: the run goes on and the next commit
        tries again, unless this is the last one (the run's end, or a stop)."""
        done = cursor[0] >= len(m.segments)
        key = None if done else key_data(iteration_key(m.seed, *cursor))
        extra = dict(cursor=list(cursor), key=key, key_impl="threefry2x32", seed=m.seed, manifest=resolved,
                     version=version, history=history, metrics_bytes=progress.size(), elapsed=progress.elapsed(),
                     done=done, classes=dict(tasks.classes), machines=machines)
        new = [prev]

        def save() -> bytes:
            try:
                new[0] = checkpoint.save(out, system, extra, prev, state)
            except checkpoint.DiskFull as e:
                if final or done:
                    raise
                print(f"warning: {e}; the run goes on and the next commit tries again", file=stream, flush=True)
                return b""
            upload("metrics.jsonl")
            checkpoint.prune(out, new[0])
            return b""

        hosts.share(save)
        return new[0]

    def stopped(what: str) -> Stopped:
        return Stopped(f"stopped at a safe point: {what} committed to {out} ({ck.state if ck else 'no commit'}); "
                       f"rerun the same command to resume")

    if not resuming:
        ck = commit(system, cursor, None, final=True)
    if hosts.main:
        report.write(work, history, rtasks, system, final=False, stream=None, machines=machines)
        upload_all()
    try:
        while cursor[0] < len(m.segments):
            si, it, ti = cursor
            seg = m.segments[si]
            task = names[si][ti]
            conf = segment_config(m, penalties(seg, si, history), system.cfg.depth)  # history[k]: segment k's start
            if it == ti == 0 and pending is None:  # a resumed generation's commit holds its segment_start already
                progress.write(dict(event="segment_start", segment=si, segment_name=seg.name, P=conf.P, F=conf.F))
                print(f"[{seg.name}] P = {conf.P:.4g}, F = {conf.F:.4g}, s = {conf.s:g}", file=stream, flush=True)
            progress.at(seg.cycles, segment=si, segment_name=seg.name, iteration=it, iterations=seg.iterations,
                        task_index=ti, num_tasks=ntasks[si], task=task, generations=seg.generations)

            def after(state: mu2net.Iteration, system=system, cursor=cursor, conf=conf) -> None:
                nonlocal ck
                stopping = hosts.any(stop())
                partial = state.done is not None
                if state.generation < conf.generations or partial or stopping:  # the last one: finish commits
                    ck = commit(system, cursor, ck, state, final=stopping)
                if stopping:
                    g, n, t = state.generation, conf.generations, state.task
                    raise stopped(f"{len(state.done)} of the {conf.children} children of generation {g + 1}/{n} of "
                                  f"task {t!r}" if partial else f"generation {g}/{n} of task {t!r}")

            system = mu2net.task_iteration(system, tasks(task), conf, iteration_key(m.seed, si, it, ti), progress,
                                           train=train, state=pending, after=after)
            pending = None
            best = system.models.get(task)
            progress.write(dict(event="task_iteration", segment=si, iteration=it, task_index=ti, task=task,
                                model=best.id if best else None, metrics=dict(best.metrics) if best else None))
            cursor = _next(m, ntasks, cursor)
            if cursor[0] != si:
                history.append({**report.summary(system, rtasks, seg.name), "P": conf.P, "F": conf.F})
                progress.write(dict(event="segment_end", **history[-1]))
            stopping = hosts.any(stop())
            ck = commit(system, cursor, ck, final=stopping)
            if cursor[0] != si and hosts.main:
                report.write(work, history, rtasks, system, final=False, stream=sys.stdout, machines=machines)
                upload_all()
            if stopping and cursor[0] < len(m.segments):
                raise stopped(f"task iteration {it} of {task!r}")
        if hosts.main:
            report.write(work, history, rtasks, system, final=True, stream=None, machines=machines)
            checkpoint.write_atomic(work / "result.json", (json.dumps(dict(history[-1], tasks=len(system.models)))
                                                           + "\n").encode())
            upload_all()
        print(f"done: {out} ({_hms(progress.elapsed())})", file=stream, flush=True)
    finally:
        progress.close()
    return system


# --- CLI -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Args:
    """Run (or resume) a continual μ2Net+ experiment described by a manifest (paper Section 5). Other commands:
    `evolve.py predict RUN --task T PATH...` (top-k labels for images) and `evolve.py export RUN --task T OUT.npz`
    (a task's model as an AugReg checkpoint); see their --help."""

    manifest: str = DEFAULT_MANIFEST
    """TOML manifest (relative paths are tried from the working directory, then from this checkout)."""
    out: str | None = None
    """Run directory; rerunning with the same one resumes. Default: runs/<manifest name>-seed<seed>."""
    seed: int | None = None
    """Overrides the manifest's seed."""
    set: tuple[str, ...] = ()
    """Dotted overrides of any manifest field, e.g. --set segments.0.generations=2 root.pretrain.cycles=1."""
    sweep_index: int | None = None
    """With a comparison: run only this sub-run (e.g. one per machine); `report.py OUT` aggregates them."""
    check: bool = False
    """Validate the manifest, print it resolved and exit."""
    compile_cache: str = "~/.cache/mu2net/jax"
    """Persistent XLA compilation cache ('' = off); it cuts compile time on resume, results are the same."""
    distributed: bool = False
    """Join a multi-process run (jax.distributed): on a TPU pod slice or under SLURM JAX finds its settings."""
    coordinator: str | None = None
    """host:port of process 0, where JAX cannot find it (implies --distributed)."""
    num_processes: int | None = None
    """Processes in the run, where JAX cannot find it (implies --distributed)."""
    process_id: int | None = None
    """This process's index in the run, where JAX cannot find it (implies --distributed)."""
    progress_every: float = 30.0
    """Seconds between progress lines inside a training child (its step, images/s, loss, ETA)."""


@dataclasses.dataclass
class Predict:
    """The top-k labels, with class names, of one task's model for image files or folders (searched recursively),
    using the latest commit of a run directory."""

    run: tyro.conf.Positional[str]
    """Run directory of evolve.py."""
    paths: tyro.conf.Positional[tuple[str, ...]]
    """Image files or folders."""
    task: str
    """The task whose model answers."""
    top_k: int = 5
    """How many labels per image."""
    format: Literal["table", "json", "csv"] = "table"
    """Output format (to stdout)."""


@dataclasses.dataclass
class Export:
    """One task's model as a standalone AugReg-format .npz (vit.load_augreg and other AugReg readers load it),
    with OUT.json beside it: the model's resolution, class names and config."""

    run: tyro.conf.Positional[str]
    """Run directory of evolve.py."""
    out: tyro.conf.Positional[str]
    """Output path, ending in .npz."""
    task: str
    """The task whose model is exported."""


# A user-input error: one line on stderr, exit status 2, no traceback.
USER_ERRORS = (ManifestError, data.DataError, published.StateError, checkpoint.CheckpointError, serve.ServeError,
               vit.AugRegError, report.ReportError)


def one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return "".join(x if i == 0 else (" " if lines[i - 1].endswith(":") else "; ") + x for i, x in enumerate(lines))


def served(run: str, task: str) -> tuple[mu2net.System, list[str], int, checkpoint.Checkpoint]:
    """A run's committed system, the task's class names and the run's image size S."""
    d = Path(run)
    if not checkpoint.exists(d):
        raise checkpoint.CheckpointError(f"{d}: no committed run here (expected the --out directory of evolve.py)")
    ck = checkpoint.load(d)
    model = serve.model_of(ck.system, task)
    m = validate(ck.extra["manifest"], str(d / "manifest.json"))
    classes = ck.extra.get("classes", {}).get(task)
    if classes is None:  # a run from before class names were kept: the catalog's, else the label numbers
        spec = None if task in m.tasks else data.resolve_tasks([task], m.catalog or None)[0]
        k = int(ck.system.params[model.components[-1]].bias.shape[0])
        classes = data.class_names(spec, m.data_dir or None) if spec else [str(i) for i in range(k)]
    return ck.system, list(classes), image_size(m), ck


def predict(a: Predict) -> int:
    if not a.paths:
        raise serve.ServeError("predict: expected image files or folders after the run directory")
    system, classes, size, _ = served(a.run, a.task)
    preds = serve.predict(system, a.task, serve.image_files(a.paths), classes, size, a.top_k)
    print(serve.render(preds, a.format))
    return 0


def export(a: Export) -> int:
    system, classes, _, ck = served(a.run, a.task)
    npz, side = serve.export(system, a.task, a.out, classes, {"run": str(Path(a.run).resolve()), "state": ck.state,
                                                               "version": ck.extra.get("version")})
    print(f"wrote {npz} and {side}")
    return 0


@dataclasses.dataclass
class ReportArgs:
    """Write every report of run directories (finished or not): report.md, Figures 3–7 and analysis.md in each;
    with several runs (seeds of one manifest), also the mean ± std of Figure 3 over them; for the output directory
    of a Section 4 comparison, Table 2 and Figure 2 of its finished sub-runs."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run directories."""
    out: str | None = None
    """Where the aggregate of several runs goes. Default: <the runs' common parent>/<manifest name>-aggregate."""


def report_runs(a: ReportArgs) -> int:
    """`python evolve.py report RUN [RUN ...] [--out DIR]`."""
    if not a.runs:
        raise report.ReportError("evolve.py report: expected at least one run directory")
    runs_ = [r for r in a.runs if checkpoint.exists(r) or not report.sub_runs([r])]
    for r in a.runs:
        if r not in runs_:  # a Section 4 comparison: Table 2 and Figure 2 of its finished sub-runs
            print(report.table2(report.write_comparison(r)))
            print(f"wrote {Path(r) / 'comparison.md'} and {Path(r) / 'figure2.png'}", file=sys.stderr)
    for r in runs_:
        ck = checkpoint.load(r)
        raw = ck.extra["manifest"]  # only its report set: runs of an older manifest schema are reported too
        stored = Manifest(name=raw["name"], segments=(), report_set=tuple(raw["report_set"]),
                          tasks={k: UserTask(**v) for k, v in raw.get("tasks", {}).items()},
                          catalog=raw.get("catalog", ""))
        report.analyse(r, report_tasks(stored))
        print(f"wrote the reports of {r}", file=sys.stderr)
    if len(runs_) > 1:
        out = Path(a.out) if a.out else (Path(os.path.commonpath([Path(r).resolve() for r in runs_]))
                                         / f"{ck.extra['manifest']['name']}-aggregate")
        rows = report.aggregate_runs(runs_, out)
        print(report.aggregate_table(rows), file=sys.stdout)
        print(f"wrote {out / 'aggregate.md'} and {out / 'aggregate.png'}", file=sys.stderr)
    return 0


def run_cli(a: Args, argv: Sequence[str] | None = None) -> int:
    """`python evolve.py [run] ...`; `argv` (None: sys.argv) is repeated in a stopped run's resume hint."""
    m = load_manifest(a.manifest, a.set, a.seed)
    if a.check:
        print(json.dumps(to_dict(m), indent=2))
        return 0
    if a.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(a.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    explicit = (a.coordinator, a.num_processes, a.process_id)
    if a.distributed or any(x is not None for x in explicit):
        exchange.initialize(*explicit)
    out = (a.out or f"runs/{m.name}-seed{m.seed}").rstrip("/")
    subs = runs(m)
    if a.sweep_index is not None:
        if not 0 <= a.sweep_index < len(subs):
            raise ManifestError(f"--sweep-index {a.sweep_index}: the manifest has {len(subs)} runs")
        subs = [subs[a.sweep_index]]
    try:
        for i, sub in enumerate(subs):
            if not sub.path:
                run(sub.manifest, out, every=a.progress_every)
                continue
            d = f"{out}/{sub.path}"
            if checkpoint.exists(d) and checkpoint.load(d).extra.get("done"):
                print(f"comparison: {sub.path} finished before, skipped", file=sys.stderr, flush=True)
                continue
            print(f"comparison: run {i + 1}/{len(subs)} {sub.path}", file=sys.stderr, flush=True)
            if jax.process_index() == 0:
                checkpoint.Store(_expand(d)).write("comparison.json", (json.dumps(dict(
                    family=sub.family, config=sub.config, value=sub.value, repetition=sub.repetition)) + "\n").encode())
            run(sub.manifest, d, every=a.progress_every)
            if jax.process_index() == 0 and "://" not in out:
                report.write_comparison(Path(out))  # Table 2 and Figure 2 of what has finished so far
    except Stopped as e:
        cmd = " ".join(shlex.quote(x) for x in [sys.executable, *(sys.argv if argv is None else ["evolve.py", *argv])])
        print(f"{e}:\n  {cmd}", file=sys.stderr)
        return STOPPED
    return 0


COMMANDS = {"predict": (Predict, predict), "export": (Export, export), "report": (ReportArgs, report_runs)}


def main(argv: Sequence[str] | None = None) -> int:
    """`evolve.py [run] [--manifest M ...]`, `evolve.py predict ...`, `evolve.py export ...`."""
    given, argv = argv, list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] and argv[0] in COMMANDS:
            cls, fn = COMMANDS[argv[0]]
            return fn(tyro.cli(cls, args=argv[1:], prog=f"evolve.py {argv[0]}"))
        return run_cli(tyro.cli(Args, args=argv[1:] if argv[:1] == ["run"] else argv), given)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
