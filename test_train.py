"""Golden metrics of one child's training step (nanodo's train_test.py style): a change to the loss, the warm-up,
the clipping or the bfloat16 momentum moves a pinned number. Tolerances allow for XLA's CPU code differing
between machines (the numbers were measured on this project's 2-core x86-64 CPU)."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

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
    # Warm-up from lr/1000 over 10 % of the steps, then cosine to 0 (method-notes "Training one child").
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
