"""Golden metrics of one child's training step (nanodo's train_test.py style): a change to the loss, the warm-up,
the clipping or the bfloat16 momentum moves a pinned number. Tolerances allow for XLA's CPU code differing
between machines (the numbers were measured on this project's 2-core x86-64 CPU)."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import data
import train
import vit

CFG = vit.CONFIGS["tiny"]
HP = dict(lr=0.1, warmup=0.1, momentum=0.9, nesterov=False, crop_area_min=1.0, crop_aspect_min=1.0, flip=False,
          brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, quality=0.0)


@pytest.fixture(scope="module")
def setup():
    comps = vit.init(CFG, jax.random.key(0), 10, 16)
    # A random head: the zero head of a new task would pin the loss at ln 10 whatever the body computes.
    comps["head"] = vit.Head(jax.random.normal(jax.random.key(1), (CFG.width, 10)) * 0.5, jnp.zeros(10))
    comps = tuple(comps.values())
    comps = comps[:-1] + (train.pad_head(comps[-1], train.padded_classes(10)),)
    mom = tuple(train.zeros_like_bf16(c) for c in comps)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(np.arange(8), jnp.int32)
    return train.partition_trainable(comps, mom, (True,) * len(comps), "mask"), x, y


def test_learning_rate_schedule():
    hp, total = train.HParams.of(HP), jnp.asarray(100, jnp.int32)
    lr = [float(train.learning_rate(jnp.asarray(s, jnp.int32), total, hp)) for s in (0, 10, 99)]
    # Warm-up from lr/1000 over 10 % of the steps, then cosine to 0 (docs/method.md, "Training one child").
    np.testing.assert_allclose(lr, [1.0e-4, 0.1, 3.0458e-5], rtol=1e-4)


def test_one_step_golden(setup):
    (diff, frozen, mom, mask), x, y = setup
    hp, total, k = train.HParams.of(HP), jnp.asarray(100, jnp.int32), jnp.asarray(10, jnp.int32)
    d, m, loss, gnorm = train.train_step(diff, frozen, mom, mask, x, y, hp, jnp.asarray(0, jnp.int32), total, k)
    np.testing.assert_allclose(float(loss), 4.16379, rtol=1e-4)
    np.testing.assert_allclose(float(gnorm), 98.8091, rtol=1e-3)  # before clipping
    # Clipped to norm 1 and no momentum yet: the first update is lr(0) = 1e-4 long, the momentum the clipped
    # gradient itself, stored in bfloat16.
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]  # noqa: E731
    np.testing.assert_allclose(float(jnp.linalg.norm(flat(d) - flat(diff))), 1e-4, rtol=1e-4)
    assert {a.dtype for a in jax.tree.leaves(m)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(float(jnp.linalg.norm(flat(m).astype(jnp.float32))), 1.0, rtol=4e-3)
    for s in range(1, 10):  # to the end of warm-up: the batch is memorised
        d, m, loss, gnorm = train.train_step(d, frozen, m, mask, x, y, hp, jnp.asarray(s, jnp.int32), total, k)
    np.testing.assert_allclose(float(loss), 0.0153651, rtol=2e-2)


def test_fused_chunk_equals_step_by_step():
    """Two cycles as padded chunks (one transfer, preprocessing per chunk, one scan each), with a block switched
    off by its flag, compute what `preprocess` and `train_step` do batch by batch on the path without that block."""
    task = data.make_task_data(data.load_catalog()["digits"], 16)
    budget = train.ChildBudget(cycles=2, samples_cap=480, batch_size=32)  # 15 steps a cycle, in chunks of 16
    assert train.chunk_length(1, budget, 16, 16) == 16
    init = vit.init(CFG, jax.random.key(0), 10, 16)
    init["head"] = vit.Head(jax.random.normal(jax.random.key(1), (CFG.width, 10)) * 0.5, jnp.zeros(10))
    names, comps = list(init), list(init.values())
    off = names.index("encoderblock_1")
    hp = dict(HP, crop_area_min=0.5, flip=True, resolution=16)
    key = jax.random.key(3)
    full = comps[:off] + [jax.tree.map(np.zeros_like, comps[off])] + comps[off + 1:]
    on = tuple(i != off for i in range(len(full)))
    # Every cycle scores 0 against a threshold of 0: the snapshot is the last cycle's.
    job = train.Job(full, [train.zeros_like_bf16(c) for c in full], on, hp, key, lambda q: 0.0, 0.0, "c", on)
    snap = train.train_group([train.prepare(job, task, budget)], task, budget, conftest.programs())[0]

    short = comps[:off] + comps[off + 1:]
    short = short[:-1] + [train.pad_head(short[-1], train.padded_classes(10))]
    diff, frozen, mom, mask = train.partition_trainable(tuple(short), tuple(map(train.zeros_like_bf16, short)),
                                                        (True,) * len(short), "mask")
    hps, k = train.HParams.of(hp), jnp.asarray(10, jnp.int32)
    k_data, k_aug = jax.random.split(key)
    seed = int(train.seed_of(k_data).integers(2**31 - 1))
    for t in range(30):
        x, y = task.train_batch(seed, t, 32)
        x = train.preprocess(k_aug, jnp.asarray(t, jnp.int32), jnp.asarray(x), hps.aug, 16)
        diff, mom, _, _ = train.train_step(diff, frozen, mom, mask, x, jnp.asarray(y), hps,
                                           jnp.asarray(t, jnp.int32), jnp.asarray(30, jnp.int32), k)
    ref = list(diff[:-1]) + [train.unpad_head(diff[-1], 10)]
    got = [p for i, p in enumerate(snap.params) if i != off]
    assert snap.params[off] is None  # the placeholder is not trained
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert snap.quality == train.accuracy(ref, task, "validation", 16, budget.eval_batch, conftest.programs())
