"""One child of a real-size root on this machine: compile time, training speed against the machine's matmul peak,
and peak memory against an analytic model of the child's training state.

    python bench/realsize.py                                   # B/16 root (a 224 px file), child at 384 px, batch 4
    python bench/realsize.py --vit L/16 --res 224
    python bench/realsize.py --before                          # as the code was: no remat, validation padded to 256
    python bench/realsize.py --vit tiny --file-res 16 --res 16 --peak-n 256   # (tests)

In one process: (1) the float32 matmul peak, the best of a few `jnp.dot` of two n × n matrices, measured again
after (6) and the larger taken (the machine may be shared: the less disturbed measurement); (2) a random root
of the ViT written as an AugReg `.npz` (vit.save_augreg) at --file-res, and an image-folder task (random PNGs at
the child's resolution, train/validation/test folders); (3) the root read back as an AugReg root is
(vit.load_augreg, the position embedding resampled to --res), every component trainable under the "mask" split,
μ2Net+'s default hyperparameters; (4) its programs compiled ahead (train.compile_ahead, timed); (5) one child
trained by train.train_group (a cycle of --steps steps and its validation, timed, peak RSS reset before it);
(6) the chunk of steps alone, run again on the same arguments and timed (steady-state images/s, FLOP/s).

FLOP/s count the model's work: 3 forward passes per training image (forward, and a backward of twice its cost;
score.flops counts a forward as XLA does), whatever remat recomputes (+1 forward of the blocks). The model of the
memory: parameters (float32) + momentum (bfloat16) + gradients (float32) + activations (what the backward keeps:
per block b·n·(7·d + 3·m) + 2·b·h·n² floats, each block's with no remat; with remat each block's input b·n·d and
one block's activations) + data (the uint8 and float32 chunk, the validation set).
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
import mu2net  # noqa: E402
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


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


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
    """The task as the code before the fix saw it: validation padded to budget.eval_batch, whatever its size."""

    def __init__(self, task, n: int):
        self.task, self.num_validation = task, n

    def __getattr__(self, name):
        return getattr(self.task, name)


def activations(cfg: vit.Config, b: int, res: int, remat: bool, micro: int) -> int:
    """Bytes the backward pass keeps (the docstring's model), for one micro-batch."""
    b = b // micro
    n, d, m, h = (res // cfg.patch) ** 2 + 1, cfg.width, cfg.mlp_dim, cfg.heads
    block = 4 * (b * n * (7 * d + 3 * m) + 2 * b * h * n * n)
    return cfg.depth * 4 * b * n * d + block if remat else cfg.depth * block


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


@dataclasses.dataclass
class Result:
    name: str
    compile_s: float
    child_s: float
    step_s: float
    images_s: float
    flops_s: float
    peak: float
    rss_compile: int
    rss_train: int
    model: dict[str, int]
    stages: dict[str, int]  # RSS after each stage
    xla: dict[str, int]  # the chunk program's memory analysis


def run(a: argparse.Namespace, work: Path, peak: float) -> Result:
    cfg = vit.CONFIGS[a.vit]
    stages = dict(start=status("VmRSS"))
    path = work / "root.npz"
    vit.save_augreg(path, vit.init(cfg, jax.random.key(0), 1000, a.file_res))
    classes = 2
    spec = write_folder(work / "task", classes, {"train": a.batch * a.steps, "validation": a.val, "test": classes},
                        a.res)
    task = data.make_task_data(spec, a.res)
    budget = train.Budget(cycles=1, samples_cap=a.batch * a.steps, batch_size=a.batch, remat=not a.before,
                          micro_batches=a.micro)
    if a.before:
        task = Padded(task, budget.eval_batch)
    root = vit.load_augreg(path)  # as an "augreg" root: the file's head is replaced by the task's
    comps = [vit.resample_posembed(c, a.res, cfg.patch) if isinstance(c, vit.PosEmbed) else c
             for n, c in root.items() if n != "head"] + [vit.init_head(cfg, classes)]
    del root
    comps = [jax.tree.map(np.asarray, c) for c in comps]  # components live in host memory (mu2net.System)
    mom = [train.zeros_like_bf16(c) for c in comps]
    hp = dict(mu2net.PLUS_DEFAULTS, resolution=a.res)
    job = train.Job(comps, mom, (True,) * len(comps), hp, jax.random.key(1), lambda q: q, -1.0, "child")
    plan = train.prepare(job, task, budget)
    stages["root in host memory"] = status("VmRSS")

    t = time.perf_counter()
    reset_peak()
    futures = train.compile_ahead([plan], task, budget)
    pre, chunk, hits = (f.result() for f in futures)
    compile_s, rss_compile = time.perf_counter() - t, status("VmHWM")
    stages["compiled"] = status("VmRSS")

    reset_peak()
    t = time.perf_counter()
    snap = train.train_group([plan], task, budget)[0]
    child_s, rss_train = time.perf_counter() - t, status("VmHWM")
    assert snap is not None
    del snap  # its parameters (device buffers on a CPU) before the steps alone put another copy there
    stages["trained"] = status("VmRSS")
    m = chunk.memory_analysis()
    xla = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, temps=m.temp_size_in_bytes,
               validation=hits.memory_analysis().temp_size_in_bytes)

    # The chunk of steps alone, on the arguments train_group gives it (its last chunk: `steps` valid steps).
    c = train.chunk_length(1, budget, task.image_size, a.res)
    xs = jnp.zeros((1, c, a.batch, a.res, a.res, 3), jnp.float32)
    ys = jnp.zeros((1, c, a.batch), jnp.int32)
    args = jax.device_put(jax.tree.map(lambda v: np.asarray(v)[None],
                                       (plan.diff, plan.mom, plan.mask, plan.on, plan.frozen, plan.hp)))
    steps = min(c, a.steps)
    ints = [jnp.int32(0), jnp.int32(steps), jnp.int32(steps), jnp.int32(classes)]
    best = math.inf
    for _ in range(2):
        t = time.perf_counter()
        jax.block_until_ready(chunk(*args, xs, ys, *ints))
        best = min(best, time.perf_counter() - t)
    del args
    peak = max(peak, matmul_peak(a.peak_n))  # the load varies: the less disturbed of two measurements
    fwd = score.flops(cfg, cfg.depth, a.res, train.padded_classes(classes))
    images_s = steps * a.batch / best
    P = nbytes(plan.diff)
    model = dict(params=P, momentum=nbytes(plan.mom), gradients=P,
                 activations=activations(cfg, a.batch, a.res, budget.remat, a.micro),
                 data=c * a.batch * task.image_size ** 2 * 3 * 5 + a.val * task.image_size ** 2 * 3)
    return Result(f"{a.vit} {a.res} px b{a.batch}" + (" before" if a.before else ""), compile_s, child_s,
                  best / steps, images_s, 3 * fwd * images_s, peak, rss_compile, rss_train, model, stages, xla)


def main(argv: list[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vit", default="B/16")
    ap.add_argument("--file-res", type=int, default=224, help="the root file's resolution")
    ap.add_argument("--res", type=int, default=384, help="the child's resolution")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--val", type=int, default=16, help="validation images")
    ap.add_argument("--micro", type=int, default=1, help="micro-batches")
    ap.add_argument("--before", action="store_true", help="remat off, validation padded to eval_batch (256)")
    ap.add_argument("--peak-n", type=int, default=4096, help="matrix size of the matmul peak")
    a = ap.parse_args(argv)
    peak = matmul_peak(a.peak_n)
    with tempfile.TemporaryDirectory(prefix="realsize-") as d:
        r = run(a, Path(d), peak)
    total = sum(r.model.values())
    load = os.getloadavg()[0]
    print(f"{r.name}: jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, load {load:.1f}")
    print(f"  matmul peak (float32, {a.peak_n}²): {r.peak / 1e9:.1f} GFLOP/s")
    print(f"  compile (3 programs, in parallel): {r.compile_s:.1f} s, peak RSS {r.rss_compile / GB:.2f} GB")
    print(f"  child ({a.steps} steps + validation of {a.val}): {r.child_s:.1f} s, peak RSS {r.rss_train / GB:.2f} GB")
    print(f"  steps alone: {r.step_s:.2f} s/step, {r.images_s:.2f} images/s, {r.flops_s / 1e9:.1f} GFLOP/s = "
          f"{r.flops_s / r.peak:.2f} × the matmul peak")
    print("  model: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r.model.items()) + f" = {total / GB:.2f} GB; "
          f"peak RSS in training / model = {r.rss_train / total:.2f}")
    print("  RSS after: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r.stages.items()) + " GB")
    print("  XLA, the chunk of steps: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r.xla.items()) + " GB (validation: "
          "its temps)")
    return r


if __name__ == "__main__":
    main()
