"""Does the input pipeline feed the quickstart model faster than it trains? (aim: >= 5x)

    python bench/input.py [--task mnist5k --res 32 --batch 128 --steps 40 --aug on]

Measured in one run, on the same device:
  * pipeline: data.Task.train_batch (host: keyed shuffle, decoded cache) + train.preprocess (jitted, Table 1
    augmentations on: crop, flip, colour jitter, JPEG quality), images/s; the task's images are stored at S, their
    own size where they share one (data.native_size), else at --res;
  * train step: train.train_step (forward + backward + SGD update of the tiny ViT) on a ready batch, images/s;
and prints their ratio.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import augment  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402

AUG_ON = dict(crop_area_min=0.5, crop_aspect_min=0.75, flip=True, brightness=0.1, contrast=0.1, saturation=0.1,
              hue=0.05, quality=0.1)


def rate(fn, steps: int, batch: int) -> float:
    """images/s of fn(step) over `steps` calls after one warm-up call (compiles)."""
    jax.block_until_ready(fn(0))
    t = time.perf_counter()
    for s in range(1, steps + 1):
        out = fn(s)
    jax.block_until_ready(out)
    return steps * batch / (time.perf_counter() - t)


def train_step_fn(cfg: vit.Config, num_classes: int, res: int, total: int):
    """(x, y, step) -> loss: train.train_step on a fresh tiny ViT, every component trainable."""
    comps = tuple(vit.init(cfg, jax.random.key(0), num_classes, res).values())
    hp = train.HParams.of(dict(lr=0.01, warmup=0.05, momentum=0.9, nesterov=False, **AUG_ON))
    diff, frozen, mom, mask = train.partition_trainable(comps, tuple(train.zeros_like_bf16(c) for c in comps),
                                                        (True,) * len(comps), "mask")
    state = [diff, mom]
    total, k = jnp.asarray(total, jnp.int32), jnp.asarray(num_classes, jnp.int32)

    def step(x, y, s):
        state[0], state[1], loss, _ = train.train_step(state[0], frozen, state[1], mask, x, y, hp,
                                                    jnp.asarray(s, jnp.int32), total, k)
        return loss
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mnist5k")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--aug", choices=("on", "off"), default="on",
                    help="the augmentations of AUG_ON, or none (μ2Net+'s defaults)")
    a = ap.parse_args()

    spec = data.load_catalog()[a.task]
    task = data.make_task_data(spec, a.res)
    aug = augment.Aug.from_hparams(AUG_ON if a.aug == "on" else {})
    key = jax.random.key(0)
    pre = train.preprocess  # one batch of what a run's chunk preprocessing (train._augment_chunk) does
    t0 = time.perf_counter()
    task.train_batch(0, 0, a.batch)  # decode the split once (cached), as a run does on its first batch
    decode = time.perf_counter() - t0

    def pipeline(s):
        x, y = task.train_batch(0, s, a.batch)
        return pre(key, np.int32(s), jnp.asarray(x), aug, a.res), jnp.asarray(y)

    step = train_step_fn(vit.CONFIGS[a.config], task.num_classes, a.res, a.steps + 1)
    x0 = pre(key, np.int32(0), jnp.asarray(task.train_batch(0, 0, a.batch)[0]), aug, a.res)
    y0 = jnp.asarray(task.train_batch(0, 0, a.batch)[1])

    def step_only(s):  # the step alone, on a ready batch: what the pipeline has to keep up with
        return step(x0, y0, s)

    host = rate(lambda s: task.train_batch(0, s, a.batch), a.steps, a.batch)
    p = rate(pipeline, a.steps, a.batch)
    t = rate(step_only, a.steps, a.batch)
    print(f"task {a.task} (S={task.image_size}), ViT {a.config} at {a.res}px, batch {a.batch}, device "
          f"{jax.devices()[0]}")
    print(f"  first batch (decodes the split once)      {decode:12.3f} s")
    print(f"  host batches (train_batch only)          {host:12,.0f} images/s")
    print(f"  pipeline (train_batch + preprocess)       {p:12,.0f} images/s")
    print(f"  train step (train.train_step)             {t:12,.0f} images/s")
    print(f"  ratio pipeline / train step: {p / t:.1f}x (aim >= 5x)")


if __name__ == "__main__":
    main()
