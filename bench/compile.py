"""Compile time vs training time of small task iterations on the tiny config, per trainable/frozen split.

    python bench/compile.py [--children 4 --generations 2 --iterations 3]

    python bench/compile.py --quickstart      # the share over the whole embedded quickstart run

For each way of compiling the trainable/frozen split (train.ChildBudget.trainable_split) it runs the same sequence of
task iterations (two offline tasks, alternating) in a fresh process and prints compiles, seconds compiling, seconds in
total and the compile share, plus each split's total time relative to "mask", measured in this run.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_one(split: str, args) -> dict:
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    import data
    import methods
    import mu2net
    import schedule
    import vit
    from bench.compiles import Compiles

    catalog = data.load_catalog()
    tasks = [data.make_task_data(catalog[name], 16) for name in ("digits", "digits/parity")]
    cfg = vit.CONFIGS[args.vit]
    space = methods.search_space(cfg.depth, (8, 16), resolution=16)
    system = mu2net.new_system(cfg, vit.init(cfg, jax.random.key(0), 10, 16), space.defaults)
    conf = methods.Config(space, budget=methods.Budget(
        generations=args.generations, children=args.children, cycles=args.cycles, samples_cap=args.samples_cap,
        batch_size=32, P=2e4, F=2e6, trainable_split=split))
    t0 = time.perf_counter()
    shares, waits = [], []  # compile share and waiting share of each task iteration: the first pays for most
    with Compiles() as c, schedule.Programs() as programs:
        trainer = schedule.Local(programs)
        for i in range(args.iterations):
            for j, task in enumerate(tasks):
                t1, c1, w1 = time.perf_counter(), c.seconds, programs.waited
                state = mu2net.start(system, task.name, conf)
                for state in mu2net.generations(state, task, conf, jax.random.key(100 * i + j), trainer):
                    pass
                system = mu2net.finish(state, task, conf, trainer)
                dt = time.perf_counter() - t1
                shares.append(round(100 * (c.seconds - c1) / dt))
                waits.append(round(100 * (programs.waited - w1) / dt))
    total = time.perf_counter() - t0
    acc = {t: float(np.round(m.metrics["test"], 3)) for t, m in system.models.items()}
    steps = sum(n == "jit(_chunk)" for n in c.names)
    return dict(split=split, compiles=c.count, steps=steps, compile_s=c.seconds, wait_s=programs.waited,
                total_s=total, test=acc, shares=shares, waits=waits, load=os.getloadavg()[0])


def quickstart(keep: str | None = None) -> None:
    """Compile share of `python evolve.py` (the quickstart) from a cold cache, in this process (its run directory
    in `keep`, else a temporary one)."""
    import tempfile

    sys.path.insert(0, ROOT)
    import evolve
    import schedule
    from bench.compiles import Compiles

    t0 = time.perf_counter()
    with Compiles() as c, tempfile.TemporaryDirectory() as out, schedule.Programs() as programs:
        evolve.run(evolve.load_manifest(evolve.DEFAULT_MANIFEST), keep or out, programs=programs)
    total = time.perf_counter() - t0
    steps = sum(n == "jit(_chunk)" or "train_step" in n for n in c.names)
    waited = programs.waited
    print(f"quickstart: {c.count} compiles ({steps} of the training step or chunk), {c.seconds:.1f} s compiling of "
          f"{total:.1f} s = {100 * c.seconds / total:.1f}%; training waited {waited:.1f} s for compiles = "
          f"{100 * waited / total:.1f}%; load {os.getloadavg()[0]:.1f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--children", type=int, default=4)
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--samples-cap", type=int, default=1024)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--vit", default="tiny")
    p.add_argument("--splits", default="mask,hybrid,partition")
    p.add_argument("--quickstart", action="store_true")
    p.add_argument("--out", default=None, help="with --quickstart: keep the run directory here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quickstart:
        quickstart(args.out)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    rows = []
    for split in args.splits.split(","):
        # A fresh process per split so no compile cache is shared between them.
        cmd = [sys.executable, __file__, "--one", split] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["total_s"]
    print(f"{'split':10} {'compiles':>8} {'of steps':>8} {'compile s':>10} {'waited s':>9} {'total s':>8} "
          f"{'compile %':>9} {'waited %':>9} {'vs ' + rows[0]['split']:>9}")
    for r in rows:
        print(f"{r['split']:10} {r['compiles']:8d} {r['steps']:8d} {r['compile_s']:10.1f} {r['wait_s']:9.1f} "
              f"{r['total_s']:8.1f} {100 * r['compile_s'] / r['total_s']:8.1f}% "
              f"{100 * r['wait_s'] / r['total_s']:8.1f}% "
              f"{r['total_s'] / base:9.2f}x  per iteration: compile % {r['shares']}, waited % {r['waits']}, "
              f"load {r['load']:.1f}")


if __name__ == "__main__":
    main()
