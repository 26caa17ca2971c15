"""The continual runner: a manifest of experiment segments → one ever-growing multitask system (paper Section 5).

A manifest (TOML) names where the system starts (a root ViT: AugReg `.npz`, a random init with an optional
pre-training iteration, or a previous run's system), the seed, and an ordered list of experiment segments — each
a method (μ2Net, μ2Net+ or a Section 4 baseline) with its budgets, score parameters and the tasks it iterates over.
The runner executes every task iteration of every segment in order (Algorithm 1 via `mu2net.task_iteration`),
commits a checkpoint after each (checkpoint.py), and reports the three Figure 3 metrics at each segment's end
(report.py). Rerunning the same command resumes from the last commit; a killed-and-resumed run ends bit-identical to
an uninterrupted one because every task iteration's key is a pure function of (seed, segment, iteration, task).

    python evolve.py                                       # the quickstart (manifests/quickstart.toml)
    python evolve.py --manifest manifests/paper_sec5.toml --out runs/sec5 --seed 3
    python evolve.py --set segments.0.generations=2 --set root.pretrain.cycles=1
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import checkpoint
import data
import mu2net
import report
import vit
from manifest import (DEFAULT_MANIFEST, Manifest, ManifestError, image_size, load_manifest, report_tasks,
                      segment_tasks, sweep, task_names, to_dict)
from manifest import config as segment_config
KILL_ENV = "MU2NET_TEST_KILL_AFTER"  # tests: os._exit after this many finished child trainings
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
    """One stderr line per finished child and per generation (segment, task, generation, child, elapsed, ETA from
    the children finished so far) and the JSON-lines metrics log. `log` is called from several training threads,
    hence the lock."""

    def __init__(self, run: Path, total: int, elapsed: float, stream: Any = sys.stderr):
        self.lock = threading.Lock()
        self.metrics = open(run / "metrics.jsonl", "ab")
        self.total, self.done, self.t0, self.before = total, 0, time.monotonic(), elapsed
        self.stream, self.where, self.cycles, self.gen = stream, {}, 1, {}
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
        line = json.dumps({**rec, "elapsed": round(self.elapsed(), 3)}, default=str)
        self.metrics.write(line.encode() + b"\n")
        self.metrics.flush()

    def size(self) -> int:
        with self.lock:
            self.metrics.flush()
            return self.metrics.tell()

    def __call__(self, rec: dict) -> None:
        with self.lock:
            w = self.where
            self._write({**w, **rec})
            ev = rec.get("event")
            if ev == "child":
                self.gen[rec.get("child")] = rec.get("generation", 0)
            elif ev == "cycle" and rec.get("cycle") == self.cycles - 1:
                self.done += 1
                run = time.monotonic() - self.t0
                eta = run / self.done * max(self.total - self.done, 0)
                print(f"[{w.get('segment_name')}] it {w.get('iteration', 0) + 1}/{w.get('iterations')} "
                      f"task {w.get('task_index', 0) + 1}/{w.get('num_tasks')} {w.get('task')} "
                      f"gen {self.gen.get(rec.get('child'), 0) + 1}/{w.get('generations')} "
                      f"child {rec.get('child')} val {rec.get('quality', 0):.4f} score {rec.get('score', 0):.4f} "
                      f"| {self.done}/{self.total} children, elapsed {_hms(self.elapsed())}, ETA {_hms(eta)}",
                      file=self.stream, flush=True)
                if self.kill_after and self.done >= self.kill_after:
                    self.metrics.flush()
                    os._exit(75)  # tests: die like a killed job, mid-iteration, without any clean-up
            elif ev == "generation":
                print(f"[{w.get('segment_name')}] task {w.get('task')} generation {rec.get('generation', 0) + 1}/"
                      f"{w.get('generations')} done: retained {rec.get('retained')}, best score {rec.get('best')}", file=self.stream,
                      flush=True)

    def close(self) -> None:
        self.metrics.close()


# --- the run -------------------------------------------------------------------------------------------------


def build_root(m: Manifest, tasks: Tasks, progress: Progress) -> mu2net.System:
    """The start state (Section 5 starts from a system; Section 4 from a ViT root)."""
    r = m.root
    if r.kind == "system":
        return checkpoint.load(Path(r.path).expanduser()).system
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
    trained = mu2net.task_iteration(start, tasks(name), conf, jax.random.fold_in(key, 1), progress)
    best = trained.models.get(name)
    if best is None:
        raise RuntimeError(f"pre-training on {name!r} retained no model")
    progress.write(dict(event="pretrain", task=name, metrics=dict(best.metrics)))
    named = {mu2net.kind(c): trained.params[c] for c in best.components}
    return mu2net.new_system(cfg, named, hp)


def _total_children(m: Manifest, cursor: tuple[int, int, int], pretrain: bool) -> int:
    n = m.root.pretrain.generations * m.root.pretrain.children if pretrain else 0
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


def run(m: Manifest, out: str | os.PathLike, stream: Any = sys.stderr) -> mu2net.System:
    """Runs (or resumes) the manifest's whole sequence in `out`; returns the final system."""
    out = Path(out)
    r = m.root
    if r.kind == "mu2net_state":  # fail before touching `out`
        raise NotImplementedYet(
            f"root.kind = 'mu2net_state' (path {r.path!r}): reading the authors' published μ2Net system state is not "
            f"implemented yet (it comes in a later issue). Start from root.kind = 'augreg' or 'system' meanwhile.")
    if r.kind in ("augreg", "system") and not Path(r.path).expanduser().exists() and not checkpoint.exists(out):
        raise ManifestError(f"root.path = {r.path!r} (root.kind = {r.kind!r}): no such file or directory")
    out.mkdir(parents=True, exist_ok=True)
    resolved = _resolved(m)
    names = [segment_tasks(m, s) for s in m.segments]
    ntasks = [len(n) for n in names]
    rtasks = report_tasks(m)
    tasks = Tasks(m)
    if checkpoint.exists(out):
        ck = checkpoint.load(out)  # a damaged checkpoint raises here, before anything is written
        diff = _diff(ck.extra.get("manifest"), resolved)
        if diff:
            raise ManifestError(f"{out} holds a run of another manifest; refusing to resume it with this one "
                                f"(use another --out). Differences:\n  " + "\n  ".join(diff[:20]))
        with open(out / "metrics.jsonl", "ab") as f:  # drop the log lines of the iteration that was interrupted
            f.truncate(int(ck.extra["metrics_bytes"]))
        system, cursor = ck.system, tuple(ck.extra["cursor"])
        if cursor[0] < len(m.segments) and ck.extra.get("key") != key_data(iteration_key(m.seed, *cursor)):
            raise checkpoint.CheckpointError(f"{out / ck.state}: the stored key of task iteration {cursor} is not "
                                             f"the one this code derives from seed {m.seed}; refusing to resume")
        history = list(ck.extra["history"])
        progress = Progress(out, _total_children(m, cursor, False), float(ck.extra["elapsed"]), stream)
        print(f"resuming {out} at segment {cursor[0]}, iteration {cursor[1]}, task {cursor[2]} "
              f"(state {ck.state}, code {ck.extra.get('version')})", file=stream, flush=True)
    else:
        (out / "metrics.jsonl").write_bytes(b"")
        progress = Progress(out, _total_children(m, (0, 0, 0), bool(m.root.pretrain.task)), 0.0, stream)
        system, cursor, history, ck = build_root(m, tasks, progress), (0, 0, 0), [], None
        history.append(report.summary(system, rtasks, "start"))
    (out / "manifest.json").write_text(json.dumps(resolved, indent=2) + "\n")
    version = checkpoint.code_version()

    def commit(system: mu2net.System, cursor: tuple[int, int, int], prev: checkpoint.Checkpoint | None):
        done = cursor[0] >= len(m.segments)
        key = None if done else key_data(iteration_key(m.seed, *cursor))
        extra = dict(cursor=list(cursor), key=key, key_impl="threefry2x32", seed=m.seed, manifest=resolved,
                     version=version, history=history, metrics_bytes=progress.size(), elapsed=progress.elapsed(),
                     done=done)
        new = checkpoint.save(out, system, extra, prev)
        checkpoint.prune(out, new)
        return new

    if ck is None:
        ck = commit(system, cursor, None)
    report.write(out, history, m.segments, rtasks, system, final=False, stream=None)
    try:
        while cursor[0] < len(m.segments):
            si, it, ti = cursor
            seg = m.segments[si]
            task = names[si][ti]
            conf = segment_config(m, seg, system.cfg.depth)
            progress.at(seg.cycles, segment=si, segment_name=seg.name, iteration=it, iterations=seg.iterations,
                        task_index=ti, num_tasks=ntasks[si], task=task, generations=seg.generations)
            system = mu2net.task_iteration(system, tasks(task), conf, iteration_key(m.seed, si, it, ti), progress)
            best = system.models.get(task)
            progress.write(dict(event="task_iteration", segment=si, iteration=it, task_index=ti, task=task,
                                model=best.id if best else None, metrics=dict(best.metrics) if best else None))
            cursor = _next(m, ntasks, cursor)
            if cursor[0] != si:
                history.append(report.summary(system, rtasks, seg.name))
                progress.write(dict(event="segment_end", **history[-1]))
            ck = commit(system, cursor, ck)
            if cursor[0] != si:
                report.write(out, history, m.segments, rtasks, system, final=False, stream=sys.stdout)
        report.write(out, history, m.segments, rtasks, system, final=True, stream=None)
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
    """With a manifest sweep: run only this entry (e.g. one per machine)."""
    check: bool = False
    """Validate the manifest, print it resolved and exit."""
    compile_cache: str = "~/.cache/mu2net/jax"
    """Persistent XLA compilation cache ('' = off); it cuts compile time on resume, results are the same."""


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
    out = Path(a.out) if a.out else Path("runs") / f"{m.name}-seed{m.seed}"
    runs = sweep(m)
    if a.sweep_index is not None:
        if not 0 <= a.sweep_index < len(runs):
            print(f"error: --sweep-index {a.sweep_index}: the manifest has {len(runs)} runs", file=sys.stderr)
            return 2
        runs = [runs[a.sweep_index]]
    try:
        for sub, mm in runs:
            run(mm, out / sub if sub else out)
    except (checkpoint.CheckpointError, ManifestError, data.DataError) as e:  # user input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
