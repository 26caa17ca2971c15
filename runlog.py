"""What a run shows and logs, and the signals that stop it at a safe point (evolve.py's segment loop).

On stderr: one line per finished child and per generation, with the elapsed time and an ETA, and inside a long child
its step, images/s, loss and ETA. In the run's `metrics.jsonl`: every record (JSON lines). SIGTERM and SIGINT ask
the run to stop after the children in flight and commit; a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import checkpoint

KILL_ENV = "MU2NET_TEST_KILL_AFTER"  # tests: os._exit after this many finished child trainings


def hms(s: float) -> str:
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
        self.failed: checkpoint.CheckpointError | None = None  # a record that could not be written (`size`)
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
        if self.metrics and not self.failed:
            line = json.dumps({**rec, "elapsed": round(self.elapsed(), 3)}, default=str)
            try:
                self.metrics.write(line.encode() + b"\n")
                self.metrics.flush()
            except OSError as e:  # often from a training thread: the run meets it at its next commit (`size`)
                self.failed = checkpoint.write_error(e, self.metrics.name)

    def size(self) -> int:
        """The log's length on disk, which a commit records; a log that lost a record (a full disk) can match no
        commit any more, so its error is raised here and the run stops before committing."""
        with self.lock:
            if self.failed:
                raise self.failed
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
                  f"{hms(out['eta'])}", file=self.stream, flush=True)
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
                      f"| {self.done}/{self.total} children, elapsed {hms(self.elapsed())}, ETA {hms(eta)}",
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
            with contextlib.suppress(OSError):  # bytes a full disk refused lie past the last commit: a resume cuts them
                self.metrics.close()


def exit_now(status: int, line: str, stream: Any = None) -> None:
    """Ends the process now with `status` and one line, skipping Python's and JAX's exit handlers (a lost
    process's heartbeat, a signal that finds no safe point to wait for). The checkpoint protocol keeps a run's
    last commit whatever the moment (checkpoint.py)."""
    with contextlib.suppress(Exception):  # inside a handler a stream may be mid-write (a reentrant call)
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        print(line, file=stream or sys.stderr, flush=True)
    os._exit(status)


def exit_at_once(signum: int, stream: Any = sys.stderr, why: str = "") -> None:
    """`exit_now` with status 128 + signum."""
    exit_now(128 + signum, f"{signal.Signals(signum).name}: stopped at once{why}; a run's last commit stands", stream)


def exit_on_signals(stream: Any = sys.stderr) -> None:
    """The CLI process's own handlers, wherever no run's `Stop` is in place (before a run, and after it stopped at
    a safe point, while the process shuts down): SIGTERM and SIGINT end it at once, not with a traceback."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: exit_at_once(signum, stream))


class Stop:
    """SIGTERM and SIGINT (a preempted VM, a scheduler's time limit, ctrl-C): the first asks the run to stop at its
    next safe point (after the children in flight), commit and exit with `STOPPED`; a second stops at once
    (`exit_at_once`), and the last commit stands."""

    def __init__(self, stream: Any = sys.stderr):
        self.signum, self.stream, self.old = None, stream, {}

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            exit_at_once(signum, self.stream, " (a second signal)")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the children in flight, then committing (a second "
              f"signal stops at once; the last commit stands)", file=self.stream, flush=True)

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def resuming_at(out: str, cursor: Sequence[int], pending: Any, generations: int, ck: Any) -> str:
    """The line a resume prints: where it resumes (a mu2net.Iteration `pending` of a task with `generations`
    generations: at which one, or after its last) from the commit `ck` (a checkpoint.Checkpoint)."""
    g = pending.generation if pending else 0
    where = "" if not pending else (f", generation {g + 1}/{generations}" if g < generations else
                                    f", after its last generation ({generations}/{generations})") + (
        f" ({len(pending.done)} of its children done)" if pending.done is not None else "")
    return (f"resuming {out} at segment {cursor[0]}, iteration {cursor[1]}, task {cursor[2]}{where} "
            f"(state {ck.state}, code {ck.extra.get('version')})")


def children_left(m: Any, ntasks: Sequence[int], cursor: tuple[int, int, int], pretrain: bool,
                  pending: Any = None) -> int:
    """How many children a run (a manifest.Manifest) still trains from `cursor`, the pre-training's if it has
    not run yet, less the generations of an iteration in progress (`pending`, a mu2net.Iteration) already done.
    Counted, not enumerated: a segment may hold up to 2^32 iterations (manifest.py)."""
    n = m.root.pretrain.generations * m.root.pretrain.children if pretrain else 0
    if pending:
        n -= pending.generation * m.segments[cursor[0]].children + len(pending.done or {})
    seg, it, t = cursor
    for i, s in enumerate(m.segments[seg:], seg):
        left = s.iterations * ntasks[i] if i > seg else (s.iterations - it) * ntasks[i] - t
        n += s.generations * s.children * left
    return n
