"""The continual runner: a manifest of experiment segments → one ever-growing multitask system (paper Section 5).

For every task iteration of every segment (manifest.py), `mu2net.generations` yields the state after each generation
and the runner commits it (checkpoint.py); `mu2net.finish` keeps the task's best model, the runner commits again and
reports each segment's end (report.py). Rerunning the same command resumes from the last commit, bit-identical to an
uninterrupted run: a task iteration's key is a pure function of (seed, segment, iteration, task), and the state
between generations is a value. SIGTERM / SIGINT stop at a safe point; a run may span many processes (exchange.py).

    python evolve.py                                       # the quickstart (manifests/quickstart.toml)
    python evolve.py --manifest manifests/paper_sec5.toml --out runs/sec5 --seed 3 --set segments.0.generations=2
    python evolve.py predict runs/quickstart-seed0 --task digits photos/ --top-k 3     # or: export ... digits.npz
    python evolve.py report runs/quickstart-seed{0,1,2}    # reports, and the mean ± std over the runs
    python evolve.py --manifest M --out gs://bucket/run --distributed       # on every host of a TPU pod slice

Every user-input error (manifest, data, checkpoint or state) prints one line and exits with status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import tyro

import checkpoint
import data
import exchange
import mu2net
import published
import report
import schedule
import serve
import vit
from manifest import (DEFAULT_MANIFEST, Cursor, Manifest, ManifestError, Tasks, check_data, check_root,  # noqa: F401
                      differences, image_size, key_data, load_manifest, penalties, readable_tasks, report_tasks,
                      resolved, root_config, round_end, runs, segment_config, segment_tasks, task_key, task_names,
                      to_dict, validate)
from runlog import (KILL_ENV, Progress, Stop, children_left, exit_now, exit_on_signals, hms,  # noqa: F401
                    resuming_at)

STOPPED = 3  # exit status of a run stopped by SIGTERM / SIGINT at a safe point: it resumes where it stopped
DISK_FULL = 4  # exit status of a run stopped by a full disk (ENOSPC, EDQUOT, EFBIG): its last commit resumes it
PEER_LOST = 5  # exit status of a process whose run lost another process (exchange.PeerLost)
ROOT_TAG = 0x524F4F54  # "ROOT": fold-in tag of the root's keys, apart from the small segment indices


class Stopped(Exception):
    """The run stopped at a safe point on a signal; its last commit resumes it."""


# --- the start state -------------------------------------------------------------------------------------------


def _expand(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser())


def build_root(m: Manifest, tasks: Tasks, progress: Progress | None, trainer: mu2net.Trainer | None = None
               ) -> mu2net.System:
    """The start state (Section 5 starts from a system; Section 4 from a ViT root). Every process of a run builds
    it alike (a random root from the seed; a file root from its own copy of the file)."""
    r = m.root
    if r.kind == "system":
        return checkpoint.load(_expand(r.path)).system
    if r.kind == "mu2net_state":
        log = (lambda s: print(s, file=progress.stream, flush=True)) if progress else None
        system = published.read(r.path if r.path.startswith("gs://") else str(Path(r.path).expanduser()), log)
        check_root(m, system.cfg)
        # The manifest's root hyperparameters, as for the other kinds; the published root has none of its own.
        return dataclasses.replace(system, root=dataclasses.replace(system.root, hp=dict(r.hp)))
    full = root_config(r)
    if full is None:
        raise ManifestError(f"root.path = {r.path!r}: no such file (root.vit = '' reads the config from it)")
    cfg = dataclasses.replace(full, depth=r.depth or full.depth)
    # Only the manifest's own root hyperparameters: a child fills the rest from its segment's search-space
    # defaults (μ2Net's mild preprocessing, μ2Net+'s none), which a full default dict here would shadow.
    hp = dict(r.hp)

    def cut(comps: dict) -> dict:
        return {k: v for k, v in comps.items() if (vit.block_index(k) or 0) < cfg.depth}

    res = r.resolution or max(r.resolutions)
    if r.kind == "augreg":  # loaded at the default resolution, as the notebooks load their roots (docs/)
        return mu2net.new_system(cfg, cut(vit.load_augreg(Path(r.path).expanduser(), full, resolution=res)), hp)
    key = jax.random.fold_in(jax.random.key(m.seed), ROOT_TAG)
    comps = cut(vit.init(full, jax.random.fold_in(key, 0), 2, res))
    if not r.pretrain.task:
        return mu2net.new_system(cfg, comps, hp)
    trainer = trainer or schedule.Local(schedule.Programs())
    return mu2net.new_system(cfg, _pretrained(m, tasks, progress, trainer, cfg, comps, key), hp)


def _pretrained(m: Manifest, tasks: Tasks, progress: Progress | None, trainer: mu2net.Trainer, cfg: vit.Config,
                comps: dict, key: jax.Array) -> dict:
    """A random root's components after its pre-training iteration (`root.pretrain`): the best model's."""
    pt = m.root.pretrain
    name = task_names(m, [pt.task])[0]
    conf = segment_config(m, pt, cfg.depth)
    start = mu2net.new_system(cfg, comps, dict(m.root.hp) | dict(pt.hp))
    if progress:
        progress.at(pt.cycles, segment=-1, segment_name="pretrain", iteration=0, iterations=1, task_index=0,
                    num_tasks=1, task=name, generations=pt.generations)
    key, task = jax.random.fold_in(key, 1), tasks(name)
    state = mu2net.start(start, task.name, conf)
    for state in mu2net.generations(state, task, conf, key, trainer, progress):
        if state.done is not None:
            raise Stopped("stopped during the root's pre-training")
    trained = mu2net.finish(state, task, conf, trainer)
    best = trained.models.get(name)
    if best is None:  # every child discarded (a non-finite loss): a manifest's hyperparameters, not a bug
        raise ManifestError(f"root.pretrain: every child of the pre-training on {name!r} was discarded (a non-finite "
                            f"loss or score), so there is no root to start from; try a smaller root.pretrain.hp.lr")
    if progress:
        progress.write(dict(event="pretrain", task=name, metrics=dict(best.metrics)))
    return {mu2net.kind(c): trained.params[c] for c in best.components}


# --- the run ---------------------------------------------------------------------------------------------------


def _next(m: Manifest, ntasks: Sequence[int], cursor: Cursor, converged: bool = False) -> Cursor:
    seg, it, t = cursor
    t += 1
    if t == ntasks[seg]:
        t, it = 0, it + 1
    if it == m.segments[seg].iterations or (converged and t == 0):
        it, seg = 0, seg + 1
    return seg, it, t


@dataclasses.dataclass
class Run:
    """One run's context, shared by its steps: the manifest, where it writes (`work` is local, uploaded to `out` at each
    commit), its processes, tasks and trainer, and what it has done (segment summaries, last commit, machines)."""

    m: Manifest
    out: str
    store: checkpoint.Store
    work: Path
    stream: Any
    hosts: exchange.Hosts
    stop: Stop
    tasks: Tasks
    names: Sequence[Sequence[str]]  # each segment's tasks, in order
    trainer: mu2net.Trainer
    progress: Progress | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    gains: list[float] = dataclasses.field(default_factory=list)  # this round's gains in validation examples
    ck: checkpoint.Checkpoint | None = None
    machines: list[dict] = dataclasses.field(default_factory=list)
    version: str = ""

    @property
    def ntasks(self) -> list[int]:
        return [len(n) for n in self.names]

    def stopped(self, what: str) -> Stopped:
        return Stopped(f"stopped at a safe point: {what} committed to {self.out} "  # by process 0 alone
                       f"({self.ck.state if self.hosts.main else 'by process 0'}); rerun the same command to resume")


def run(m: Manifest, out: str | os.PathLike, stream: Any = sys.stderr, hosts: exchange.Hosts | None = None,
        every: float = 30.0, log_every: float = 300.0, programs: schedule.Programs | None = None) -> mu2net.System:
    """Runs (or resumes) the manifest's whole sequence in `out` (a directory or an fsspec URL such as gs://…) and
    returns the final system. Every check of the manifest's inputs (root path, data) runs before `out` is touched.
    A checkpoint is committed after every generation and every task iteration; SIGTERM or SIGINT stop at the next
    safe point with a commit (raising `Stopped`). With several processes (`hosts`), every process runs this
    function alike and the main one alone touches `out`. `programs`: a compile cache (default: the run's own)."""
    hosts, out = hosts or exchange.Hosts(), _expand(str(out))
    store = checkpoint.Store(out)
    tasks = Tasks(m, stream)
    names = readable_tasks(m, tasks, stream)
    with contextlib.ExitStack() as stack:
        work = Path(out)
        if not store.local and hosts.main:  # the log and the reports are written here, uploaded at each commit
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mu2net-"))) / Path(store.root).name
        resuming = hosts.share(lambda: _first_touch(m, out, work)) == b"1"
        hosts.share(lambda: (stack.enter_context(checkpoint.lock(out)), b"")[1])
        stop = stack.enter_context(Stop(stream))
        programs = programs or stack.enter_context(schedule.Programs())  # the run's compile cache
        r = Run(m, out, store, work, stream, hosts, stop, tasks, names, hosts.trainer(programs, stop))
        return train_and_evaluate(r, resuming, every, log_every)


def _first_touch(m: Manifest, out: str, work: Path) -> bytes:
    """On the main process, before anything is written: a file root must exist; b"1" if `out` holds a run."""
    r = m.root  # gs:// roots are read by their own reader (published.read): no existence check without the network
    root = checkpoint.Store(_expand(r.path)) if r.kind != "random" and not r.path.startswith("gs://") else None
    if root and not root.fs.exists(root.root) and not checkpoint.exists(out):
        raise ManifestError(f"root.path = {r.path!r} (root.kind = {r.kind!r}): no such file or directory")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # /proc/x, a read-only file system, a loop of links
        raise checkpoint.write_error(e, str(work)) from None
    return b"1" if checkpoint.exists(out) else b"0"


def train_and_evaluate(r: Run, resuming: bool, every: float, log_every: float) -> mu2net.System:
    """The run as named steps: restore (or build the start state and commit it), then every remaining task
    iteration, committed after each generation and at its end, and each segment's reports."""
    system, cursor, pending = (_restore if resuming else _start)(r, every, log_every)
    if r.hosts.main:
        checkpoint.write_atomic(r.work / "manifest.json", (json.dumps(resolved(r.m), indent=2) + "\n").encode())
        _upload(r, "manifest.json")
    here = report.machine()
    r.version, r.machines = checkpoint.code_version(), r.machines + ([here] if here not in r.machines else [])
    if not resuming:
        r.ck = _commit(r, system, cursor, final=True)
    if r.hosts.main:
        report.write(r.work, r.history, report_tasks(r.m), system, final=False, stream=None, machines=r.machines)
        _upload_all(r)
    try:
        while cursor[0] < len(r.m.segments):
            system, cursor = _task_iteration(r, system, cursor, pending)
            pending = None
        if r.hosts.main:
            report.write(r.work, r.history, report_tasks(r.m), system, final=True, stream=None, machines=r.machines)
            checkpoint.write_atomic(r.work / "result.json", (json.dumps(dict(r.history[-1], tasks=len(
                system.models))) + "\n").encode())
            _upload_all(r)
        print(f"done: {r.out} ({hms(r.progress.elapsed())})", file=r.stream, flush=True)
    finally:
        r.progress.close()
    return system


def _start(r: Run, every: float, log_every: float) -> tuple[mu2net.System, Cursor, None]:
    """A fresh run: an empty log, the start state (`build_root`) and segment 0's start in the history."""
    metrics = r.work / "metrics.jsonl" if r.hosts.main else None
    if metrics:
        checkpoint.write_atomic(metrics, b"")
    total = children_left(r.m, r.ntasks, (0, 0, 0), bool(r.m.root.pretrain.task))
    share = len(jax.local_devices()) / len(jax.devices())  # this process's share of the children
    r.progress = Progress(metrics, round(total * share), 0.0, r.stream, every, log_every)
    try:
        system = build_root(r.m, r.tasks, r.progress, r.trainer)
    except Stopped:
        raise Stopped(f"stopped during the root's pre-training, before the first commit: {r.out} holds nothing "
                      f"yet, and rerunning starts afresh") from None
    r.history = [report.summary(system, report_tasks(r.m), "start")]
    return system, (0, 0, 0), None


def _restore(r: Run, every: float, log_every: float
             ) -> tuple[mu2net.System, Cursor, mu2net.Iteration | None]:
    """The last commit, checked against this manifest and this code's keys (a damaged checkpoint raises here,
    before anything is written); the log cut back to it."""
    m, store, out = r.m, r.store, r.out
    ck = r.ck = checkpoint.load(out, read=lambda name: r.hosts.share(lambda: store.read(name)))
    diff = differences(ck.extra.get("manifest"), resolved(m))
    if diff:
        raise ManifestError(f"{out} holds a run of another manifest; refusing to resume it with this one "
                            f"(use another --out). Differences:\n  " + "\n  ".join(diff[:20]))
    metrics = r.work / "metrics.jsonl" if r.hosts.main else None
    if metrics:
        if not store.local:
            metrics.write_bytes(store.read("metrics.jsonl") if store.exists("metrics.jsonl") else b"")
        checkpoint.cut_log(metrics, ck.extra["metrics_bytes"], lambda s: print(s, file=r.stream, flush=True))
    system, cursor, pending = ck.system, tuple(ck.extra["cursor"]), ck.pending
    if cursor[0] < len(m.segments) and ck.extra.get("key") != key_data(task_key(m, cursor)):
        raise checkpoint.CheckpointError(f"{store.name(ck.state)}: the stored key of task iteration {cursor} is "
                                         f"not the one this code derives from seed {m.seed}; refusing to resume")
    if pending and (cursor[0] >= len(m.segments) or pending.task != r.names[cursor[0]][cursor[2]]):
        raise checkpoint.CheckpointError(f"{store.name(ck.state)}: its task iteration in progress "
                                         f"({pending.task!r}) is not the one at its cursor {cursor}; refusing to "
                                         f"resume")
    r.history, r.machines, r.gains = list(ck.extra["history"]), list(ck.extra.get("machines", [])), list(ck.extra.get(
        "gains", []))
    r.tasks.classes = {**ck.extra.get("classes", {}), **r.tasks.classes}
    r.tasks.sizes = {**ck.extra.get("sizes", {}), **r.tasks.sizes}
    share = len(jax.local_devices()) / len(jax.devices())  # this process's share of the children
    r.progress = Progress(metrics, round(children_left(m, r.ntasks, cursor, False, pending) * share),
                          float(ck.extra["elapsed"]), r.stream, every, log_every)
    print(resuming_at(out, cursor, pending, m.segments[min(cursor[0], len(m.segments) - 1)].generations, ck),
          file=r.stream, flush=True)
    return system, cursor, pending


def _task_iteration(r: Run, system: mu2net.System, cursor: Cursor, pending: mu2net.Iteration | None
                    ) -> tuple[mu2net.System, Cursor]:
    """One task iteration (Algorithm 1): its generations, each committed with the iteration in progress (the last
    one's commit is the iteration's own), then line 39 and a commit; at a segment's end, its summary and reports.
    A stop request is honoured at each commit."""
    si, it, ti = cursor
    seg, name = r.m.segments[si], r.names[si][ti]
    conf = segment_config(r.m, penalties(seg, si, r.history), system.cfg.depth)  # history[k]: segment k's start
    b = conf.budget
    if it == ti == 0 and pending is None:  # a resumed generation's commit holds its segment_start already
        r.progress.write(dict(event="segment_start", segment=si, segment_name=seg.name, P=b.P, F=b.F))
        print(f"[{seg.name}] P = {b.P:.4g}, F = {b.F:.4g}, s = {b.s:g}", file=r.stream, flush=True)
    r.progress.at(seg.cycles, segment=si, segment_name=seg.name, iteration=it, iterations=seg.iterations,
                  task_index=ti, num_tasks=r.ntasks[si], task=name, generations=seg.generations)
    task, key = r.tasks(name), task_key(r.m, cursor)
    q0 = (system.models.get(name) or system.root).metrics.get("quality", 0.0)  # the root has no quality: 0
    state = pending or mu2net.start(system, task.name, conf)
    for state in mu2net.generations(state, task, conf, key, r.trainer, r.progress):
        stopping, partial = r.hosts.any(r.stop()), state.done is not None
        if state.generation < b.generations or partial or stopping:
            r.ck = _commit(r, system, cursor, state, final=stopping)
        if stopping or partial:
            g, t = state.generation, state.task
            raise r.stopped(f"{len(state.done)} of the {b.children} children of generation {g + 1}/"
                            f"{b.generations} of task {t!r}" if partial else f"generation {g}/{b.generations} of "
                            f"task {t!r}")
    system = mu2net.finish(state, task, conf, r.trainer)
    best = system.models.get(name)
    gain = ((best.metrics.get("quality", 0.0) if best else 0.0) - q0) * task.validation_size(b.validation_max)
    r.progress.write(dict(event="task_iteration", segment=si, iteration=it, task_index=ti, task=name,
                          model=best.id if best else None, metrics=dict(best.metrics) if best else None, gain=gain))
    r.gains, end = r.gains + [gain], None
    if ti + 1 == r.ntasks[si]:  # the round's end: its mean gain against until_gain
        end, r.gains = round_end(seg, it, r.gains), []
        r.progress.write(dict(event="round", segment=si, until_gain=seg.until_gain, **end))
    cursor = _next(r.m, r.ntasks, cursor, bool(end and end["converged"]))
    if cursor[0] != si:
        r.history.append({**report.summary(system, report_tasks(r.m), seg.name), "P": b.P, "F": b.F, **end})
        r.progress.write(dict(event="segment_end", **r.history[-1]))
    stopping = r.hosts.any(r.stop())
    r.ck = _commit(r, system, cursor, final=stopping)
    if cursor[0] != si and r.hosts.main:
        report.write(r.work, r.history, report_tasks(r.m), system, final=False, stream=sys.stdout,
                     machines=r.machines)
        _upload_all(r)
    if stopping and cursor[0] < len(r.m.segments):
        raise r.stopped(f"task iteration {it} of {name!r}")
    return system, cursor


def _commit(r: Run, system: mu2net.System, cursor: Cursor, state: mu2net.Iteration | None = None,
            final: bool = False) -> checkpoint.Checkpoint | None:
    """Commits on the main process (the others receive its outcome). A full disk leaves the last commit standing:
    the run goes on and the next commit tries again, unless this is the last one (the run's end, or a stop) or the
    log lost a record; then `DiskFull` ends the run (exit status DISK_FULL)."""
    done = cursor[0] >= len(r.m.segments)
    key = None if done else key_data(task_key(r.m, cursor))
    extra = dict(cursor=list(cursor), key=key, key_impl="threefry2x32", seed=r.m.seed, manifest=resolved(r.m),
                 version=r.version, history=r.history, elapsed=r.progress.elapsed(), done=done,
                 classes=dict(r.tasks.classes), sizes=dict(r.tasks.sizes), machines=r.machines, gains=list(r.gains))
    new = [r.ck]

    def save() -> bytes:
        extra["metrics_bytes"] = r.progress.size()  # raises DiskFull if the log lost a record: no commit matches it
        try:
            new[0] = checkpoint.save(r.out, system, extra, r.ck, state)
        except checkpoint.DiskFull as e:
            if final or done:
                raise
            print(f"warning: {e}; the run goes on and the next commit tries again", file=r.stream, flush=True)
            return b""
        _upload(r, "metrics.jsonl")
        checkpoint.prune(r.out, new[0])
        return b""

    r.hosts.share(save)
    return new[0]


def _upload(r: Run, *files: str) -> None:
    if r.hosts.main and not r.store.local:
        for f in files:
            if (r.work / f).exists():
                r.store.write(f, (r.work / f).read_bytes())


def _upload_all(r: Run) -> None:  # the reports (report.md, the figures, result.json) as written in `work`
    if r.hosts.main and not r.store.local:
        _upload(r, *sorted(p.name for p in r.work.iterdir() if p.is_file() and p.name != "metrics.jsonl"))


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


# A user-input error: one line on stderr, exit status 2, no traceback.
USER_ERRORS = (ManifestError, data.DataError, published.StateError, checkpoint.CheckpointError, serve.ServeError,
               vit.AugRegError, report.ReportError)


def one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return "".join(x if i == 0 else (" " if lines[i - 1].endswith(":") else "; ") + x for i, x in enumerate(lines))


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
    subs = runs(m, out=out if "://" in out else os.path.normpath(out))
    if a.sweep_index is not None:
        if not 0 <= a.sweep_index < len(subs):
            raise ManifestError(f"--sweep-index {a.sweep_index}: the manifest has {len(subs)} runs")
        subs = [subs[a.sweep_index]]
    try:
        with schedule.Programs() as programs:  # one compile cache for every sub-run of a comparison
            _sweep(subs, out, a.progress_every, programs, m.comparison.pairs)
    except Stopped as e:
        cmd = " ".join(shlex.quote(x) for x in [sys.executable, *(sys.argv if argv is None else ["evolve.py", *argv])])
        print(f"{e}:\n  {cmd}", file=sys.stderr)
        return STOPPED
    return 0


def _sweep(subs: Sequence[Any], out: str, every: float, programs: schedule.Programs, pairs: Sequence = ()) -> None:
    """The manifest's run, or each unfinished sub-run of its comparison, then Table 2, Figure 2 and paired.md."""
    for i, sub in enumerate(subs):
        if not sub.path:
            run(sub.manifest, out, every=every, programs=programs)
            continue
        d = f"{out}/{sub.path}"
        if checkpoint.finished(d):
            print(f"comparison: {sub.path} finished before, skipped", file=sys.stderr, flush=True)
            continue
        if sub.shared and not checkpoint.finished(f"{out}/{sub.shared}"):
            raise ManifestError(f"comparison: {sub.path} continues {out}/{sub.shared}, which has not finished; run "
                                f"it first (the whole comparison, or its --sweep-index)")
        print(f"comparison: run {i + 1}/{len(subs)} {sub.path}", file=sys.stderr, flush=True)
        if jax.process_index() == 0 and sub.family:  # a shared run is no family's
            checkpoint.Store(_expand(d)).write("comparison.json", (json.dumps(sub.info()) + "\n").encode())
        run(sub.manifest, d, every=every, programs=programs)
        if jax.process_index() == 0 and "://" not in out:
            report.write_comparison(Path(out), pairs)  # Table 2, Figure 2, paired.md of what has finished so far


COMMANDS = {"predict": (serve.PredictArgs, serve.predict_cli), "export": (serve.ExportArgs, serve.export_cli),
            "report": (report.ReportArgs, report.report_cli)}


def main(argv: Sequence[str] | None = None) -> int:
    """`evolve.py [run] [--manifest M ...]`, `evolve.py predict ...`, `evolve.py export ...`."""
    given, argv = argv, list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] and argv[0] in COMMANDS:
            cls, fn = COMMANDS[argv[0]]
            return fn(tyro.cli(cls, args=argv[1:], prog=f"evolve.py {argv[0]}"))
        return run_cli(tyro.cli(Args, args=argv[1:] if argv[:1] == ["run"] else argv), given)
    except exchange.PeerLost as e:  # not through JAX's shutdown barrier: it waits for the lost heartbeat, then aborts
        exit_now(PEER_LOST, f"error: {one_line(e)}")
    except USER_ERRORS as e:  # a full disk (checkpoint.DiskFull) too, with its own status
        full = isinstance(e, checkpoint.DiskFull)
        print(f"error: {one_line(e)}" + ("; free space and rerun the same command (a run resumes from its last "
                                          "commit)" if full else ""), file=sys.stderr)
        return DISK_FULL if full else 2


if __name__ == "__main__":
    exit_on_signals()  # outside a run's `Stop` too (before it, and after it stopped): a signal ends with 128 + n
    sys.exit(main())
