"""One child of a real-size root on this machine: compile time, training speed against the machine's matmul peak,
and peak memory against an analytic model of the child's training state (docs/hardware.md).

    python bench/realsize.py                        # a B/16 root file at 224 px, a child at 384 px, batch 4
    python bench/realsize.py --res 224 --before     # as the code was: no remat, validation padded to eval_batch
    python bench/realsize.py --vit tiny --file-res 16 --res 16 --peak-n 256    # (tests)

In one process, each phase timed and its peak RSS taken (/proc/self/status VmHWM, reset before the phase):
(1) the float32 matmul peak: the best of a few `jnp.dot` of two n × n matrices, measured again at the end and the
larger kept (the machine may be shared: the less disturbed measurement); (2) a random root written as an AugReg
`.npz` (vit.save_augreg) at --file-res, and an image-folder task of random PNGs at --size px (train, validation
and test folders); (3) the root read back as a run reads an "augreg" root (vit.load_augreg at the child's
resolution, the config inferred from the file), a zero head for the task, every component trainable under the
"mask" split, μ2Net+'s default hyperparameters; (4) the child's three programs compiled as a run compiles them
(schedule.Programs: ahead, in worker threads); (5) the child trained by train.train_group (--cycles cycles of
--steps steps and their validation); (6) the chunk of steps alone, called twice on the same arguments, the faster
timed (steady state); (7) validation alone.

FLOP/s count the model's work, 3 forward passes per training image (score.flops counts a forward as XLA's cost
analysis does; the backward costs two), and beside it what the program executes: with remat one more forward
of the blocks. The model of the memory (bytes): parameters (float32) + momentum (bfloat16) + gradients (float32)
+ activations (what the backward keeps: per block b·n·(7·d + 3·m) + 2·b·h·n² floats; with remat every block's
input b·n·d and one block's activations) + data (the uint8 and float32 chunk, the validation set). On a CPU the
device is the host: the process's RSS also holds the runtime, the compiled programs and the host copy of the
components a run keeps (mu2net.System), so the child's own memory is the growth of the peak over the RSS before it.
"""
import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import methods  # noqa: E402
import schedule  # noqa: E402
import score  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402

GB = 1e9


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class Phase:
    """Wall seconds, RSS on entry and peak RSS (VmHWM, reset on entry) of a block of work."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.t, self.start = time.perf_counter(), status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.seconds, self.peak = time.perf_counter() - self.t, status("VmHWM")


def matmul_peak(n: int, repeats: int = 3) -> float:
    """Float32 FLOP/s of the best of `repeats` n × n matrix products (2·n³ each)."""
    a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(jax.random.key(0)))
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def write_folder(root: Path, classes: int, counts: dict[str, int], size: int) -> data.TaskSpec:
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(d / f"{i}.png")
    return data.folder_task(root, "realsize", splits={s: s for s in counts})


class Padded:
    """The task as the code before saw it: validation padded to budget.eval_batch, whatever the set's size."""

    def __init__(self, task: data.Task, n: int):
        self.task, self.num_validation = task, n

    def __getattr__(self, name):
        return getattr(self.task, name)


def activations(cfg: vit.Config, b: int, res: int, remat: bool, micro: int) -> int:
    """Bytes the backward pass keeps (the docstring's model), for one micro-batch."""
    b = b // micro
    n, d, m, h = vit.grid(res, cfg.patch) ** 2 + 1, cfg.width, cfg.mlp_dim, cfg.heads
    block = 4 * (b * n * (7 * d + 3 * m) + 2 * b * h * n * n)
    return cfg.depth * 4 * b * n * d + block if remat else cfg.depth * block


def nbytes(tree) -> int:
    """Bytes of a tree's arrays, concrete or abstract (jax.ShapeDtypeStruct)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@dataclasses.dataclass
class Result:
    eval_batch: int
    peak: float  # matmul FLOP/s
    compile: Phase
    child: Phase
    steps: Phase  # one call of the chunk (best of two)
    validation: Phase
    step_s: float
    images_s: float
    flops_s: float  # the model's
    executed_s: float  # what the program computes (remat: + a forward of the blocks)
    model: dict[str, int]
    rss: dict[str, int]  # RSS after each stage
    xla: dict[str, int]  # the programs' memory analysis

    @property
    def state(self) -> int:
        return sum(self.model.values())


def alone(a: argparse.Namespace, plan: train.Plan, task: data.Task, budget: train.ChildBudget, run_chunk, hits,
          device: jax.Device) -> tuple[int, Phase, Phase]:
    """The chunk of steps alone, on the arguments train_group gives it (its first chunk: `steps` valid steps),
    called twice and the faster kept; then validation alone. Returns the steps and the two phases."""
    c = train.chunk_length(1, budget, task.image_size, a.res)
    steps = min(c, a.steps)
    args = jax.device_put(jax.tree.map(lambda v: np.asarray(v)[None],
                                       (plan.diff, plan.mom, plan.mask, plan.on, plan.frozen, plan.hp)), device)
    xs = jax.device_put(np.zeros((1, c, a.batch, a.res, a.res, 3), np.float32), device)
    ys = jax.device_put(np.zeros((1, c, a.batch), np.int32), device)
    ints = jax.device_put([np.int32(0), np.int32(steps), np.int32(steps), np.int32(task.num_classes)], device)
    jax.block_until_ready((args, xs, ys, ints))
    calls = []
    for _ in range(2):
        with Phase() as p:
            jax.block_until_ready(run_chunk(*args, xs, ys, *ints))
        calls.append(p)
    del xs
    diff, _, _, on, frozen, _ = args
    val = jax.device_put(list(task.eval_batches("validation", train.eval_batch(task, budget), budget.validation_max)),
                         device)
    with Phase() as validation:
        jax.block_until_ready(train._evaluate(hits, diff, on, frozen, val, ints[-1]))
    return steps, min(calls, key=lambda p: p.seconds), validation


def run(a: argparse.Namespace, work: Path) -> Result:
    cfg = vit.CONFIGS[a.vit]
    rss = dict(start=status("VmRSS"))
    path = work / "root.npz"
    vit.save_augreg(path, vit.init(cfg, jax.random.key(0), 1000, a.file_res))
    classes, n_train = 2, a.batch * a.steps
    spec = write_folder(work / "task", classes, {"train": n_train, "validation": a.val, "test": classes},
                        a.size or a.res)
    task = data.make_task_data(spec, a.size or a.res)
    budget = train.ChildBudget(cycles=a.cycles, samples_cap=n_train, batch_size=a.batch, remat=not a.before,
                               micro_batches=a.micro)
    if a.before:
        task = Padded(task, budget.eval_batch)
    root = vit.load_augreg(path, resolution=a.res)  # as evolve.py reads an "augreg" root
    comps = [jax.device_get(c) for n, c in root.items() if n != "head"] + [vit.init_head(cfg, classes)]
    del root
    mom = [train.zeros_like_bf16(c) for c in comps]
    hp = dict(methods.PLUS_DEFAULTS, resolution=a.res)
    job = train.Job(comps, mom, (True,) * len(comps), hp, jax.random.key(1), lambda q: q, -1.0, "child")
    plan = train.prepare(job, task, budget)
    rss["root in host memory"] = status("VmRSS")

    device = jax.devices()[0]
    with schedule.Programs() as cache:
        keys = train.programs([plan], task, budget, device)
        with Phase() as compile_:
            fs = [cache.ahead(k, b) for k, b in keys]
            augment_chunk, run_chunk, hits = (f.result() for f in fs)
        rss["compiled"] = status("VmRSS")
        print(f"  compile (3 programs, schedule.Programs): {compile_.seconds:.1f} s, "
              f"peak RSS {compile_.peak / GB:.2f} GB", flush=True)
        with Phase() as child:
            snap = train.train_group([plan], task, budget, cache, device)[0]
        assert snap is not None
        print(f"  child ({a.cycles} × {a.steps} steps + validation of {a.val} in batches of "
              f"{train.eval_batch(task, budget)}): {child.seconds:.1f} s, peak RSS {child.peak / GB:.2f} GB",
              flush=True)
        del snap
        rss["trained"] = status("VmRSS")

    steps, best_phase, validation = alone(a, plan, task, budget, run_chunk, hits, device)
    best = best_phase.seconds
    c = train.chunk_length(1, budget, task.image_size, a.res)

    peak = max(a.measured_peak, matmul_peak(a.peak_n))
    fwd = score.flops(cfg, cfg.depth, a.res, train.padded_classes(classes))
    blocks = cfg.depth * score._block(vit.grid(a.res, cfg.patch) ** 2 + 1, cfg.width, cfg.mlp_dim, cfg.heads)
    images_s = steps * a.batch / best
    P = nbytes(plan.diff)
    S = task.image_size
    model = dict(params=P, momentum=nbytes(plan.mom), gradients=P,
                 activations=activations(cfg, a.batch, a.res, budget.remat, a.micro),
                 data=c * a.batch * (S * S * 3 + a.res * a.res * 3 * 4) + a.val * S * S * 3)
    analyses = dict(chunk=run_chunk.memory_analysis(), validation=hits.memory_analysis())
    xla = {f"{k} temps": m.temp_size_in_bytes for k, m in analyses.items()}
    return Result(train.eval_batch(task, budget), peak, compile_, child, best_phase, validation, best / steps,
                  images_s, 3 * fwd * images_s, (3 * fwd + (blocks if budget.remat else 0)) * images_s, model, rss,
                  xla)


def report(r: Result, a: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    print(f"  matmul peak (float32, {a.peak_n}², the larger of two): {r.peak / 1e9:.1f} GFLOP/s; load {load:.1f}")
    print(f"  steps alone: {r.step_s:.2f} s/step, {r.images_s:.2f} images/s, {r.flops_s / 1e9:.1f} GFLOP/s = "
          f"{r.flops_s / r.peak:.2f} × the matmul peak (executed: {r.executed_s / 1e9:.1f} GFLOP/s = "
          f"{r.executed_s / r.peak:.2f} ×), peak RSS {r.steps.peak / GB:.2f} GB")
    print(f"  validation alone: {r.validation.seconds:.1f} s, peak RSS {r.validation.peak / GB:.2f} GB")
    print("  model: " + ", ".join(f"{k} {v / GB:.3g}" for k, v in r.model.items()) + f" = {r.state / GB:.3g} GB; "
          f"peak RSS training / model = {r.child.peak / r.state:.2f}; its growth over the RSS before training "
          f"({r.child.peak / GB:.2f} − {r.child.start / GB:.2f} GB) / model = "
          f"{(r.child.peak - r.child.start) / r.state:.2f}")
    print("  RSS after: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r.rss.items()) + " GB")
    print("  XLA memory analysis: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r.xla.items()) + " GB")


def main(argv: list[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vit", default="B/16", choices=sorted(vit.CONFIGS))
    ap.add_argument("--file-res", type=int, default=224, help="the root file's resolution")
    ap.add_argument("--res", type=int, default=384, help="the child's resolution")
    ap.add_argument("--size", type=int, default=0, help="the task's image size S (default: --res)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="steps per cycle")
    ap.add_argument("--cycles", type=int, default=1)
    ap.add_argument("--val", type=int, default=16, help="validation images")
    ap.add_argument("--micro", type=int, default=1, help="micro-batches")
    ap.add_argument("--before", action="store_true", help="remat off, validation padded to eval_batch (256)")
    ap.add_argument("--peak-n", type=int, default=4096, help="matrix size of the matmul peak")
    a = ap.parse_args(argv)
    a.measured_peak = matmul_peak(a.peak_n)
    name = f"{a.vit} {a.res} px, batch {a.batch}" + (" (before)" if a.before else "")
    print(f"{name}: jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="realsize-") as d:
        r = run(a, Path(d))
    report(r, a)
    return r


if __name__ == "__main__":
    main()
