"""A child's training throughput against a hand-written lax.scan loop, and a generation's vectorised children.

    python bench/child.py [--task mnist5k --configs tiny,tiny4 --batches 32,128 --repeats 5]
    python bench/child.py --configs S/16 --res 224 --skip-generation       # on an accelerator

In one run, on the same device, model, batch and data (MNIST-5k at 16 px unless --res, 3 cycles of min(1 epoch,
2048 samples)):
  * child: train.train_group of one, every component trainable, with its validation after each cycle;
  * scan: the same steps by hand: a cycle's batches moved to the device in one transfer, one jitted lax.scan whose
    body preprocesses and takes an SGD step (the same maths, written on component trees), then the same
    validation with a jitted forward; and the scan alone, without validation;
and prints images/s and the ratio child/scan, each the best of the repeats (the CPU is shared with other work: the
best of a few interleaved runs is the least disturbed one, as `timeit` does). Then a
generation of 8 tiny children of one architecture (different hyperparameters, masks and data streams), trained
as one vectorised program (train.train_group of 8) against one by one (8 × train.train_group of 1).
Images/s count the training images; wall-clock seconds, and CPU seconds of this process beside them (the CPU is
shared: they show whether a change in wall time came from the load, printed as the 1-minute load average).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import augment  # noqa: E402
import data  # noqa: E402
import methods  # noqa: E402
import schedule  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402

# Crop and flip on, so that preprocessing costs what it costs in a μ2Net run (main() sets the resolution).
HP = dict(methods.PLUS_DEFAULTS, lr=0.05, crop_area_min=0.5, flip=True, resolution=16)


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - w, time.process_time() - c


def setup(config: str, task: data.Task):
    cfg = vit.CONFIGS[config]
    comps = list(vit.init(cfg, jax.random.key(0), task.num_classes, HP["resolution"]).values())
    return comps, [train.zeros_like_bf16(c) for c in comps]


def child_fn(comps, mom, task, budget, programs):
    """One child trained by train.train_group of one (what a task iteration runs)."""
    job = train.Job(comps, mom, (True,) * len(comps), HP, jax.random.key(1), lambda q: q, -1.0)
    return lambda: train.train_group([train.prepare(job, task, budget)], task, budget, programs)[0].params[0].kernel


def scan_fns(comps, task, budget):
    """The same training written by hand: trees, one scan per cycle, preprocessing in the scan body."""
    k, res = task.num_classes, HP["resolution"]
    kpad = train.padded_classes(k)
    params = tuple(comps[:-1]) + (train.pad_head(comps[-1], kpad),)
    params = jax.tree.map(jnp.asarray, params)
    hp = train.HParams.of(HP)
    steps = train.steps_per_cycle(task, budget)
    total = budget.cycles * steps
    key = jax.random.key(2)
    B = budget.batch_size

    def lr_at(t):
        return train.learning_rate(t, jnp.asarray(total, jnp.int32), hp)

    @jax.jit
    def cycle(params, mom, xs, ys, t0):
        def body(carry, a):
            p, m = carry
            x, y, i = a
            x = augment.train_preprocess(jax.random.fold_in(key, t0 + i), x, hp.aug, res)

            def loss_fn(p):
                z = vit.forward(p, x)
                z = jnp.where(jnp.arange(kpad)[None, :] < k, z, -1e30)
                return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

            loss, g = jax.value_and_grad(loss_fn)(p)
            norm = optax.global_norm(g)
            g = jax.tree.map(lambda a: a * jnp.minimum(1.0, 1.0 / (norm + 1e-12)), g)
            m = jax.tree.map(lambda mi, gi: hp.momentum * mi.astype(jnp.float32) + gi, m, g)
            p = jax.tree.map(lambda pi, mi: pi - lr_at(t0 + i) * mi, p, m)
            return (p, jax.tree.map(lambda a: a.astype(jnp.bfloat16), m)), loss

        (p, m), loss = jax.lax.scan(body, (params, mom), (xs, ys, jnp.arange(xs.shape[0], dtype=jnp.int32)))
        return p, m, loss

    @jax.jit
    def hits(p, x, y):
        pred = jnp.argmax(vit.forward(p, augment.eval_preprocess(x, res))[:, :k], axis=-1)
        return jnp.sum((pred == y) & (y >= 0))

    val = jax.device_put(list(task.eval_batches("validation", budget.eval_batch)))

    def run(validate: bool):
        p, m = params, jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.bfloat16), params)
        out = []
        for c in range(budget.cycles):
            batches = [task.train_batch(7, c * steps + i, B) for i in range(steps)]
            xs, ys = jax.device_put((np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])))
            p, m, _ = cycle(p, m, xs, ys, jnp.asarray(c * steps, jnp.int32))
            if validate:
                out.append(sum(hits(p, x, y) for x, y in val))
        return p[0].kernel, out
    return (lambda: run(True)), (lambda: run(False))


def child_vs_scan(config: str, batch: int, task: data.Task, repeats: int, budget: train.ChildBudget,
                  programs: schedule.Programs) -> None:
    comps, mom = setup(config, task)
    scan, scan_train = scan_fns(comps, task, budget)
    fns = dict(child=child_fn(comps, mom, task, budget, programs), scan=scan, scan_train=scan_train)
    for f in fns.values():
        f()  # compiles
    images = budget.cycles * train.steps_per_cycle(task, budget) * batch
    t = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t[name].append(timed(f))
    rate = {n: images / min(w for w, _ in v) for n, v in t.items()}
    cpu = {n: images / min(c for _, c in v) for n, v in t.items()}
    ratio = rate["child"] / rate["scan"]
    print(f"{config:6} batch {batch:4}: child {rate['child']:8,.0f}  scan {rate['scan']:8,.0f}  "
          f"(scan without validation {rate['scan_train']:8,.0f}) images/s;  child/scan {ratio:.2f}  "
          f"[per CPU second: child {cpu['child']:,.0f}, scan {cpu['scan']:,.0f}]  load {os.getloadavg()[0]:.1f}",
          flush=True)


def generation(task: data.Task, n: int, repeats: int, budget: train.ChildBudget, programs: schedule.Programs) -> None:
    """n tiny children of one architecture: vectorised (one train_group of n) against one by one."""
    batch = budget.batch_size
    comps, mom = setup("tiny", task)
    lrs = methods.TABLE1["lr"]
    plans = []
    for i in range(n):
        hp = dict(HP, lr=lrs[3 + i % 6], momentum=0.8 + 0.02 * i, flip=bool(i % 2))
        trainable = tuple(j >= i % 3 for j in range(len(comps)))  # different gradient masks
        job = train.Job(comps, mom, trainable, hp, jax.random.key(10 + i), lambda q: q, -1.0, f"c{i}")
        plans.append(train.prepare(job, task, budget))
    fns = dict(vectorised=lambda: train.train_group(plans, task, budget, programs),
               sequential=lambda: [train.train_group([q], task, budget, programs)[0] for q in plans])
    for f in fns.values():
        f()
    images = n * budget.cycles * train.steps_per_cycle(task, budget) * batch
    t = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t[name].append(timed(lambda f=f: [s.params[-1].kernel for s in f()]))
    rate = {k: images / min(w for w, _ in v) for k, v in t.items()}
    cpu = {k: images / min(c for _, c in v) for k, v in t.items()}
    ratio = rate["vectorised"] / rate["sequential"]
    print(f"generation of {n} tiny children, batch {batch}: vectorised {rate['vectorised']:8,.0f}  sequential "
          f"{rate['sequential']:8,.0f} images/s;  vectorised/sequential {ratio:.2f}  [per CPU second: "
          f"{cpu['vectorised']:,.0f} vs {cpu['sequential']:,.0f}]  load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mnist5k")
    ap.add_argument("--configs", default="tiny,tiny4")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--res", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--samples-cap", type=int, default=2048)
    ap.add_argument("--skip-generation", action="store_true")
    a = ap.parse_args()
    HP["resolution"] = a.res
    task = data.make_task_data(data.load_catalog()[a.task], a.res)
    print(f"task {a.task} at {a.res} px, device {jax.devices()[0]}, load {os.getloadavg()}", flush=True)
    with schedule.Programs() as programs:
        for config in a.configs.split(","):
            for batch in map(int, a.batches.split(",")):
                budget = train.ChildBudget(cycles=a.cycles, samples_cap=a.samples_cap, batch_size=batch)
                child_vs_scan(config, batch, task, a.repeats, budget, programs)
        if not a.skip_generation:
            budget = train.ChildBudget(cycles=a.cycles, samples_cap=a.samples_cap, batch_size=32)
            generation(task, a.children, a.repeats, budget, programs)


if __name__ == "__main__":
    main()
