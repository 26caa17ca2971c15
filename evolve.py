"""The continual runner: a manifest of experiment segments → one ever-growing multitask system (paper Section 5).

A manifest (TOML) names where the system starts (a root ViT: AugReg `.npz`, a random init with an optional
pre-training iteration, or a previous run's system), the seed, and an ordered list of experiment segments — each
a method (μ2Net, μ2Net+ or a Section 4 baseline) with its budgets, score parameters and the tasks it iterates over.
The runner executes every task iteration of every segment in order (Algorithm 1 via `mu2net.task_iteration`),
commits a checkpoint after every generation and every task iteration (checkpoint.py), and reports the three Figure 3
metrics at each segment's end (report.py). Rerunning the same command resumes from the last commit; a
killed-and-resumed run ends bit-identical to an uninterrupted one because every task iteration's key is a pure
function of (seed, segment, iteration, task) and the state between generations is a value (`mu2net.Iteration`).
SIGTERM / SIGINT stop at a safe point with a commit; one run may span many processes (exchange.py).

    python evolve.py                                       # the quickstart (manifests/quickstart.toml)
    python evolve.py --manifest manifests/paper_sec5.toml --out runs/sec5 --seed 3
    python evolve.py --set segments.0.generations=2 --set root.pretrain.cycles=1
    python evolve.py --manifest M --out gs://bucket/run --distributed       # on every host of a TPU pod slice
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import checkpoint
import data
import exchange
import mu2net
import report
import vit
from manifest import (DEFAULT_MANIFEST, Manifest, ManifestError, image_size, load_manifest, report_tasks,
                      segment_tasks, sweep, task_names, to_dict)
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
    """TaskData by name, opened on first use (one run's cache; never module state)."""

    def __init__(self, m: Manifest):
        self.m, self.size, self.open = m, image_size(m), {}

    def __call__(self, name: str) -> mu2net.TaskData:
        if name not in self.open:
            m = self.m
            if name in m.tasks:
                u = m.tasks[name]
                spec = data.folder_task(u.folder, name, u.num_classes or None, dict(u.splits) or None)
            else:
                spec = data.resolve_tasks([name], m.catalog or None)[0]
            self.open[name] = data.make_task_data(spec, self.size, m.data_dir or None)
        return self.open[name]


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
        self.metrics = open(metrics, "ab") if metrics else None
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
            self.metrics.flush()
            return self.metrics.tell()

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


def build_root(m: Manifest, tasks: Tasks, progress: Progress, train: mu2net.Train | None = None) -> mu2net.System:
    """The start state (Section 5 starts from a system; Section 4 from a ViT root). Every process of a run builds
    it alike (a random root from the seed; a file root from its own copy of the file)."""
    r = m.root
    if r.kind == "system":
        return checkpoint.load(_expand(r.path)).system
    full = vit.CONFIGS[r.vit]
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


def _total_children(m: Manifest, cursor: tuple[int, int, int], pretrain: bool,
                    pending: mu2net.Iteration | None = None) -> int:
    n = m.root.pretrain.generations * m.root.pretrain.children if pretrain else 0
    if pending:
        n -= pending.generation * m.segments[cursor[0]].children + len(pending.done or {})
    for i, s in enumerate(m.segments):
        per = s.generations * s.children
        k = len(segment_tasks(m, s))
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


class NotImplementedYet(ManifestError, NotImplementedError):
    """A manifest asks for something this code cannot do yet."""


def run(m: Manifest, out: str | os.PathLike, stream: Any = sys.stderr, hosts: exchange.Hosts | None = None,
        every: float = 30.0, log_every: float = 300.0) -> mu2net.System:
    """Runs (or resumes) the manifest's whole sequence in `out` (a directory or an fsspec URL such as gs://…) and
    returns the final system. A checkpoint is committed after every generation and every task iteration; SIGTERM
    or SIGINT stop at the next safe point with a commit (raising `Stopped`). With several processes (`hosts`),
    every process runs this function alike and the main one alone touches `out`."""
    hosts = hosts or exchange.Hosts()
    out = _expand(str(out))
    store = checkpoint.Store(out)
    r = m.root
    if r.kind == "mu2net_state":  # fail before touching `out`
        raise NotImplementedYet(
            f"root.kind = 'mu2net_state' (path {r.path!r}): reading the authors' published μ2Net system state is not "
            f"implemented yet (it comes in a later issue). Start from root.kind = 'augreg' or 'system' meanwhile.")
    # On an object store the log and the reports are written locally and uploaded at each commit.
    with contextlib.ExitStack() as stack:
        work = Path(out)
        if not store.local and hosts.main:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mu2net-"))) / Path(store.root).name

        def first() -> bytes:
            root = checkpoint.Store(_expand(r.path)) if r.kind in ("augreg", "system") else None
            if root and not root.fs.exists(root.root) and not checkpoint.exists(out):
                raise ManifestError(f"root.path = {r.path!r} (root.kind = {r.kind!r}): no such file or directory")
            work.mkdir(parents=True, exist_ok=True)
            return b"1" if checkpoint.exists(out) else b"0"

        resuming = hosts.share(first) == b"1"
        hosts.share(lambda: (stack.enter_context(checkpoint.lock(out)), b"")[1])
        stop = stack.enter_context(Stop(stream))
        return _run(m, out, store, work, resuming, stream, hosts, stop, every, log_every)


def _run(m: Manifest, out: str, store: checkpoint.Store, work: Path, resuming: bool, stream: Any,
         hosts: exchange.Hosts, stop: Stop, every: float, log_every: float) -> mu2net.System:
    resolved = _resolved(m)
    names = [segment_tasks(m, s) for s in m.segments]
    ntasks = [len(n) for n in names]
    rtasks = report_tasks(m)
    tasks = Tasks(m)
    train = hosts.train(stop)
    metrics = work / "metrics.jsonl" if hosts.main else None
    share = len(jax.local_devices()) / len(jax.devices())  # this process's share of the children

    def upload(*files: str) -> None:
        if hosts.main and not store.local:
            for f in files:
                if (work / f).exists():
                    store.write(f, (work / f).read_bytes())

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
            with open(metrics, "ab") as f:  # drop the log lines written after the last commit
                f.truncate(int(ck.extra["metrics_bytes"]))
        system, cursor, pending = ck.system, tuple(ck.extra["cursor"]), ck.pending
        if cursor[0] < len(m.segments) and ck.extra.get("key") != key_data(iteration_key(m.seed, *cursor)):
            raise checkpoint.CheckpointError(f"{store.name(ck.state)}: the stored key of task iteration {cursor} is "
                                             f"not the one this code derives from seed {m.seed}; refusing to resume")
        if pending and (cursor[0] >= len(m.segments) or pending.task != names[cursor[0]][cursor[2]]):
            raise checkpoint.CheckpointError(f"{store.name(ck.state)}: its task iteration in progress "
                                             f"({pending.task!r}) is not the one at its cursor {cursor}; refusing to "
                                             f"resume")
        history = list(ck.extra["history"])
        progress = Progress(metrics, round(_total_children(m, cursor, False, pending) * share),
                            float(ck.extra["elapsed"]), stream, every, log_every)
        where = "" if not pending else (f", generation {pending.generation + 1}/{m.segments[cursor[0]].generations}"
                                        + (f" ({len(pending.done)} of its children done)"
                                           if pending.done is not None else ""))
        print(f"resuming {out} at segment {cursor[0]}, iteration {cursor[1]}, task {cursor[2]}{where} "
              f"(state {ck.state}, code {ck.extra.get('version')})", file=stream, flush=True)
    else:
        if metrics:
            metrics.write_bytes(b"")
        progress = Progress(metrics, round(_total_children(m, (0, 0, 0), bool(m.root.pretrain.task)) * share), 0.0,
                            stream, every, log_every)
        try:
            system = build_root(m, tasks, progress, train)
        except mu2net.Stopped:
            raise Stopped(f"stopped during the root's pre-training, before the first commit: {out} holds nothing "
                          f"yet, and rerunning starts afresh") from None
        cursor, history, ck = (0, 0, 0), [], None
        history.append(report.summary(system, rtasks, "start"))
    if hosts.main:
        (work / "manifest.json").write_text(json.dumps(resolved, indent=2) + "\n")
        upload("manifest.json")
    version = checkpoint.code_version()

    def commit(system: mu2net.System, cursor: tuple[int, int, int], prev: checkpoint.Checkpoint | None,
               state: mu2net.Iteration | None = None, final: bool = False) -> checkpoint.Checkpoint | None:
        """Commits on the main process. A full disk leaves `prev` standing: the run goes on and the next commit
        tries again, unless this is the last one (the run's end, or a stop)."""
        done = cursor[0] >= len(m.segments)
        key = None if done else key_data(iteration_key(m.seed, *cursor))
        extra = dict(cursor=list(cursor), key=key, key_impl="threefry2x32", seed=m.seed, manifest=resolved,
                     version=version, history=history, metrics_bytes=progress.size(), elapsed=progress.elapsed(),
                     done=done)
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
        report.write(work, history, m.segments, rtasks, system, final=False, stream=None)
        upload("report.md")
    try:
        while cursor[0] < len(m.segments):
            si, it, ti = cursor
            seg = m.segments[si]
            task = names[si][ti]
            conf = segment_config(m, seg, system.cfg.depth)
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
                history.append(report.summary(system, rtasks, seg.name))
                progress.write(dict(event="segment_end", **history[-1]))
            stopping = hosts.any(stop())
            ck = commit(system, cursor, ck, final=stopping)
            if cursor[0] != si and hosts.main:
                report.write(work, history, m.segments, rtasks, system, final=False, stream=sys.stdout)
                upload("report.md")
            if stopping and cursor[0] < len(m.segments):
                raise stopped(f"task iteration {it} of {task!r}")
        if hosts.main:
            report.write(work, history, m.segments, rtasks, system, final=True, stream=None)
            upload("report.md", "metrics.png", "graph.png")
        print(f"done: {out} ({_hms(progress.elapsed())})", file=stream, flush=True)
    finally:
        progress.close()
    return system


# --- CLI -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Args:
    """Run (or resume) a continual μ2Net+ experiment described by a manifest (paper Section 5)."""

    manifest: str = DEFAULT_MANIFEST
    """TOML manifest (relative paths are tried from the working directory, then from this checkout)."""
    out: str | None = None
    """Run directory; rerunning with the same one resumes. Default: runs/<manifest name>-seed<seed>."""
    seed: int | None = None
    """Overrides the manifest's seed."""
    set: tuple[str, ...] = ()
    """Dotted overrides of any manifest field, e.g. --set segments.0.generations=2 root.pretrain.cycles=1."""
    sweep_index: int | None = None
    """With s_sweep: run only this entry (e.g. one per machine)."""
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


def main(argv: Sequence[str] | None = None) -> int:
    import tyro
    a = tyro.cli(Args, args=argv)
    try:
        m = load_manifest(a.manifest, a.set, a.seed)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    runs = sweep(m)
    if a.sweep_index is not None:
        if not 0 <= a.sweep_index < len(runs):
            print(f"error: --sweep-index {a.sweep_index}: the manifest has {len(runs)} runs", file=sys.stderr)
            return 2
        runs = [runs[a.sweep_index]]
    try:
        for sub, mm in runs:
            run(mm, f"{out}/{sub}" if sub else out, every=a.progress_every)
    except (checkpoint.CheckpointError, ManifestError, data.DataError) as e:  # user input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        cmd = " ".join(shlex.quote(x) for x in [sys.executable, *(sys.argv if argv is None else ["evolve.py", *argv])])
        print(f"{e}:\n  {cmd}", file=sys.stderr)
        return STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
