"""Which device trains which child, programs compiled ahead, and the compile cache a run owns.

Algorithm 1 (mu2net.py) hands a generation's children to a `mu2net.Trainer`; `Local` is the one for this process's
devices (exchange.py spreads a generation over several processes with it). Children of one architecture train in
groups (`groups`, of one unless `Budget.vectorise`), group g on local device g mod n: the paper's one child per TPU
core. Programs compile ahead of time in worker threads (`Programs`), so a new architecture compiles while other
children train. Nothing here is module state: a run makes its `Programs` and closes it at its end.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

import mu2net
import train
import vit
from methods import Config
from train import TaskData, zeros_like_bf16


class Programs:
    """A run's compiled programs by key (train.programs: kind, shapes, device), each compiled once, ahead of time
    (`jax.jit(f).lower(specs).compile()`) in worker threads, one per core: XLA compiles a program on one thread.
    `waited` adds up the seconds training waited for one (bench/compile.py). Use as a context manager, or `close`."""

    def __init__(self, workers: int | None = None):
        self._futures: dict[tuple, concurrent.futures.Future] = {}
        self._jitted: dict[tuple, Callable] = {}  # by key without the device: one trace serves every device
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers or max(2, os.cpu_count() or 2),
                                                           thread_name_prefix="mu2net-compile")
        self.waited = 0.0

    def ahead(self, key: tuple, build: train.Build) -> concurrent.futures.Future:
        """The program `key` names (its last entry the device), compiling in the background the first time (a
        failed compile is tried again)."""
        with self._lock:
            f = self._futures.get(key)
            if f is None or (f.done() and f.exception() is not None):
                f = self._futures[key] = self._pool.submit(self._compile, key, build)
            return f

    def _compile(self, key: tuple, build: train.Build) -> Any:
        fn, specs = build()
        with self._lock:
            jitted = self._jitted.setdefault(key[:-1], jax.jit(fn))
        return jitted.lower(*specs).compile()

    def __call__(self, key: tuple, build: train.Build) -> Any:
        """train.Compiled: the program, once compiled (the wait counts in `waited`)."""
        return self.wait(self.ahead(key, build))

    def wait(self, f: concurrent.futures.Future) -> Any:
        t = time.perf_counter()
        out = f.result()
        with self._lock:
            self.waited += time.perf_counter() - t
        return out

    def wait_first(self, fs: Sequence[concurrent.futures.Future]) -> None:
        """Blocks until one of the compiles `fs` is done (counted in `waited`)."""
        t = time.perf_counter()
        concurrent.futures.wait(fs, return_when=concurrent.futures.FIRST_COMPLETED)
        with self._lock:
            self.waited += time.perf_counter() - t

    def settle(self) -> None:
        """Waits for every compile under way (a test then counts only the compiles of what it runs)."""
        with self._lock:
            fs = list(self._futures.values())
        concurrent.futures.wait(fs)

    def close(self) -> None:
        """Drops the compiles not yet started; the ones under way finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Programs:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def groups(alike: Sequence[Any], most: int) -> list[list[int]]:
    """Children (indices, in order) that train together: those with equal `alike` keys (train.Plan.group), in
    groups of powers of two up to `most` (7 alike at most 8 -> 4, 2, 1), so an architecture compiles for a few
    group sizes only. A function of the children alone, never of the devices, so the result does not depend on
    how many there are."""
    by: dict[Any, list[int]] = {}
    for i, a in enumerate(alike):
        by.setdefault(a, []).append(i)
    out = []
    for idx in by.values():
        while idx:
            k = 1 << (min(most, len(idx)).bit_length() - 1)
            out.append(idx[:k])
            idx = idx[k:]
    return sorted(out)


def elsewhere(job: train.Job, cfg: vit.Config, config: Config) -> Iterator[train.Job]:
    """`job` at the search space's other resolutions (its position embedding resampled): with `full_depth`,
    the programs of these cover every child the next generation can make from this layout. Only under the "mask"
    split, whose programs do not depend on the cloning pattern, and when the resolution can move."""
    if config.budget.trainable_split != "mask" or not config.method.hp_moves:
        return
    for r in config.space.values.get("resolution", ()):
        if r != job.hp["resolution"]:
            comps = [vit.resample_posembed(c, r, cfg.patch) if isinstance(c, vit.PosEmbed) else c
                     for c in job.components]
            yield dataclasses.replace(job, components=comps, momentum=[zeros_like_bf16(c) for c in comps],
                                      hp={**job.hp, "resolution": r})


def full_depth(system: mu2net.System, params: Mapping[str, eqx.Module], ids: Sequence[str]
               ) -> tuple[list[str | None], list[eqx.Module], tuple[bool, ...]]:
    """A path laid out at the root's depth, for training and evaluation: a block it lacks (layer removal), with
    its adapter, becomes a zero placeholder whose on flag is 0, so that it is skipped (vit.forward) and paths of
    every depth share one compiled program (train.py). Returns the slots' ids (None: a placeholder), their
    components and their on flags; a path of full depth is its own layout."""
    by = {mu2net.kind(c): c for c in ids}
    root = [mu2net.kind(c) for c in system.root.components]
    adapter = next((c for c in ids if vit.is_adapter(mu2net.kind(c))), None)
    slots: list[tuple[str | None, str]] = [(by[n], by[n]) for n in ("embedding", "cls", "posembed_input")]
    for i in range(sum(map(vit.is_block, root))):
        if adapter:
            slots.append((by.get(vit.adapter(i)), adapter))
        slots.append((by.get(vit.block(i)), system.root.components[root.index(vit.block(i))]))
    slots += [(by["encoder_norm"], by["encoder_norm"]), (by["head"], by["head"])]
    comps = [params[c] if c else jax.tree.map(np.zeros_like, params[like]) for c, like in slots]
    return [c for c, _ in slots], comps, tuple(c is not None for c, _ in slots)


def child_job(pool: mu2net.Pool, planned: mu2net.Planned, task: TaskData, config: Config
              ) -> tuple[train.Job, Callable[[train.Snapshot | None], mu2net.Trained | None]]:
    """What train.py needs to train a planned child: laid out by `full_depth`, scored by eq. 1 in the system as
    it stands, and judged by line 29 as its method judges (train.retains, the warm-up floor); and how the
    snapshot it keeps becomes a `mu2net.Trained` (None: nothing kept)."""
    child, model = planned.child, planned.child.model
    params = {**pool.params, **{c: p for c, (p, _) in child.new.items()}}
    slots, comps, on = full_depth(pool.system, params, model.components)
    mom = [child.new[c][1] if c in child.new else zeros_like_bf16(p) for c, p in zip(slots, comps)]
    trains = dict(zip(model.components, child.trainable))
    size = mu2net.model_size(params, model, mu2net.sharers(pool.system, task.name))
    flops = mu2net.model_flops(pool.system.cfg, params, model)
    score = lambda q: config.score(q, size, flops)  # noqa: E731
    job = train.Job(comps, mom, tuple(c is not None and trains[c] for c in slots), model.hp, planned.key, score,
                    planned.threshold, model.id, on, config.method.strict, config.method.warmup_floor)
    return job, functools.partial(_trained, child, slots, size, flops)


def _trained(child: mu2net.Child, slots: Sequence[str | None], size: float, flops: int,
             snap: train.Snapshot | None) -> mu2net.Trained | None:
    if snap is None:
        return None
    metrics = dict(quality=snap.quality, score=snap.score, params=size, flops=flops)
    return mu2net.Trained(dataclasses.replace(child.model, metrics=metrics),
                          {c: p for c, p in zip(slots, snap.params) if p is not None},
                          {c: m for c, m in zip(slots, snap.momentum) if m is not None}, snap.score)


class Local:
    """mu2net.Trainer on this process's devices (Algorithm 1 lines 26–32): a generation's children in `groups`,
    group g on device g mod n, so no device ever holds two groups. Every group's programs start compiling at once
    (`Programs`), and each device trains first its groups whose programs are ready. With `more` (a generation
    follows), the programs it may need at the other resolutions (`elsewhere`) compile after ours. A group not yet
    started when `stop()` turns true is left out of the result (a stopped generation resumes from the others)."""

    def __init__(self, programs: Programs, devices: Sequence[jax.Device] | None = None,
                 stop: Callable[[], bool] = lambda: False):
        self.programs, self.devices, self.stop = programs, list(devices or jax.local_devices()), stop

    def __call__(self, pool: mu2net.Pool, todo: Sequence[mu2net.Planned], task: TaskData, config: Config,
                 log: mu2net.Log | None = None, more: bool = False) -> dict[int, mu2net.Trained | None]:
        made = [child_job(pool, p, task, config) for p in todo]
        plans = [train.prepare(j, task, config.budget) for j, _ in made]
        units = groups([q.group for q in plans], config.budget.vectorise)
        n = len(self.devices)
        ahead = [self.compile_ahead([plans[i] for i in u], task, config.budget, self.devices[g % n])
                 for g, u in enumerate(units)]
        for job in elsewhere(made[0][0], pool.system.cfg, config) if more and made else ():
            self.compile_ahead([train.prepare(job, task, config.budget)], task, config.budget, self.devices[0])
        snaps = self._train(units, [[plans[i] for i in u] for u in units], ahead, task, config.budget, log)
        return {todo[i].index: back(snaps[i]) for i, (_, back) in enumerate(made) if i in snaps}

    def _train(self, units: list[list[int]], plans: list[list[train.Plan]], ahead: list[list[Any]],
               task: TaskData, budget: train.ChildBudget, log: mu2net.Log | None) -> dict[int, Any]:
        """Trains the groups, each device its own (a thread per device); the snapshots by child index."""
        n, snaps = len(self.devices), {}

        def worker(d: int) -> None:
            mine = list(range(d, len(units), n))
            while mine and not self.stop():
                ready = [g for g in mine if all(f.done() for f in ahead[g])]
                if not ready:
                    self.programs.wait_first([f for g in mine for f in ahead[g] if not f.done()])
                    continue
                mine.remove(g := ready[0])
                snaps.update(zip(units[g], train.train_group(plans[g], task, budget, self.programs,
                                                             self.devices[d], log)))

        if n == 1:
            worker(0)
        else:
            with concurrent.futures.ThreadPoolExecutor(n) as ex:
                list(ex.map(worker, range(n)))
        return snaps

    def compile_ahead(self, plans: Sequence[train.Plan], task: TaskData, budget: train.ChildBudget,
                      device: jax.Device) -> list[concurrent.futures.Future]:
        """Starts compiling the three programs that train `plans` (one group) on `device` (train.programs)."""
        return [self.programs.ahead(k, b) for k, b in train.programs(plans, task, budget, device)]

    def accuracy(self, pool: mu2net.Pool, model: mu2net.Model, task: TaskData, split: str, batch: int) -> float:
        """Top-1 accuracy of `model` on a split, laid out as it was validated (`full_depth`: the same program), on
        this process's first device."""
        _, comps, on = full_depth(pool.system, pool.params, model.components)
        return train.accuracy(comps, task, split, int(model.hp["resolution"]), batch, self.programs,
                              self.devices[0], on=on)

