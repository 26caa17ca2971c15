"""Golden metrics of one child's training step (nanodo's train_test.py style): a change to the loss, the warm-up,
the clipping or the bfloat16 momentum moves a pinned number. The numbers were measured on this project's 2-core
x86-64 CPU; XLA's CPU code differs between machines (instruction set, cores), so each tolerance is the error the
compared computations can accumulate in float32 (unit roundoff U) or bfloat16 (BF16): a first-order bound where one
exists, else measured in the test itself as the spread between mathematically identical computations that round
differently (the same batch in another order). test_numerics.py reruns these tests on AVX2 and on one core."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import data
import train
import vit
from conftest import U32 as U
from conftest import UBF16 as BF16

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


@pytest.mark.numeric
def test_learning_rate_schedule():
    hp, total = train.HParams.of(HP), jnp.asarray(100, jnp.int32)
    lr = [float(train.learning_rate(jnp.asarray(s, jnp.int32), total, hp)) for s in (0, 10, 99)]
    # Warm-up from lr/1000 over 10 % of the steps, then cosine to 0 (docs/method.md, "Training one child"). The pinned
    # values have 5 significant digits (rtol 2e-5); near the end 0.5·lr·(1 + cos πf) cancels: the float32 cos
    # and its argument are off by a few U absolute, so the value by lr/2 · 4U absolute.
    np.testing.assert_allclose(lr, [1.0e-4, 0.1, 3.0458e-5], rtol=2e-5, atol=0.1 / 2 * 4 * U)


# A first-order bound of the forward pass's relative error: its ~10 stages (patch embedding, 2 × (attention,
# MLP, 2 LayerNorms), head) each sum at most 64 products (the MLP width), each sum off by ≤ 64·U relative.
FORWARD = 10 * 64 * U  # ≈ 3.8e-5


def _ten_steps(state, x, y, order=None):
    """Losses of the first 10 steps on one batch, its examples in `order` (the same maths, other roundings)."""
    (d, frozen, m, mask), hp = state, train.HParams.of(HP)
    total, k = jnp.asarray(100, jnp.int32), jnp.asarray(10, jnp.int32)
    if order is not None:
        x, y = x[order], y[order]
    out = []
    for s in range(10):
        d, m, loss, _ = train.train_step(d, frozen, m, mask, x, y, hp, jnp.asarray(s, jnp.int32), total, k)
        out.append(float(loss))
    return out


@pytest.mark.numeric
def test_one_step_golden(setup):
    (diff, frozen, mom, mask), x, y = setup
    hp, total, k = train.HParams.of(HP), jnp.asarray(100, jnp.int32), jnp.asarray(10, jnp.int32)
    d, m, loss, gnorm = train.train_step(diff, frozen, mom, mask, x, y, hp, jnp.asarray(0, jnp.int32), total, k)
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]  # noqa: E731
    n = flat(diff).size
    np.testing.assert_allclose(float(loss), 4.16379, rtol=FORWARD + 2e-6)  # + the pinned value's 6 digits
    # Backward: twice the forward's stages; the norm then sums n squares (≤ n·U relative, halved by the sqrt).
    g_tol = 2 * FORWARD + n * U / 2  # ≈ 6e-4 for n = 19,824
    np.testing.assert_allclose(float(gnorm), 98.8091, rtol=g_tol + 1e-6)  # before clipping
    # Clipped to norm 1 and no momentum yet: the first update is lr(0) = 1e-4 long, the momentum the clipped
    # gradient itself, stored in bfloat16. Rounding each new parameter to float32 moves it by ≤ U·|p|, so the
    # update's measured length is within U·‖p‖ of 1e-4 (times the clip's own error); bfloat16 rounds each
    # momentum entry by ≤ BF16 relative.
    np.testing.assert_allclose(float(jnp.linalg.norm(flat(d) - flat(diff))), 1e-4,
                               atol=U * float(jnp.linalg.norm(flat(diff))) + 1e-4 * g_tol)
    assert {a.dtype for a in jax.tree.leaves(m)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(float(jnp.linalg.norm(flat(m).astype(jnp.float32))), 1.0, rtol=BF16 + g_tol)
    # To the end of warm-up: the batch is memorised. Ten steps amplify rounding (bfloat16 momentum can round
    # either way): the tolerance is 4× the spread of the same steps on the batch in two other orders, and no
    # less than one forward pass's error.
    losses = _ten_steps(setup[0], x, y)
    spread = max(abs(a - b) for o in (1, 2) for a, b in
                 zip(_ten_steps(setup[0], x, y, np.random.default_rng(o).permutation(8)), losses))
    np.testing.assert_allclose(losses[-1], 0.0153651, atol=max(4 * spread, FORWARD * losses[-1]) + 5e-8)


@pytest.mark.numeric
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

    def steps(order: int | None) -> list:
        """The 30 steps batch by batch; with `order`, each batch's examples permuted after preprocessing (the
        loss is their mean: the same maths, rounded otherwise)."""
        d, m = diff, mom
        for t in range(30):
            x, y = task.train_batch(seed, t, 32)
            x = train.preprocess(k_aug, jnp.asarray(t, jnp.int32), jnp.asarray(x), hps.aug, 16)
            if order is not None:
                o = np.random.default_rng([order, t]).permutation(32)
                x, y = x[o], y[o]
            d, m, _, _ = train.train_step(d, frozen, m, mask, x, jnp.asarray(y), hps, jnp.asarray(t, jnp.int32),
                                          jnp.asarray(30, jnp.int32), k)
        return jax.tree.leaves(list(d[:-1]) + [train.unpad_head(d[-1], 10)])

    ref = steps(None)
    got = jax.tree.leaves([p for i, p in enumerate(snap.params) if i != off])
    assert snap.params[off] is None  # the placeholder is not trained
    # The chunk and the reference are two compilations of the same maths, so they round differently; over 30 steps
    # a float32 difference can flip a bfloat16 momentum rounding (2^-9 relative), which lr carries into the
    # parameters and later steps amplify: no useful a-priori bound. The tolerance is 4× the largest difference
    # between the reference and itself on each batch in two other orders (≈ 8e-5 here, on any ISA), far below
    # what a wrong step, mask, schedule or augmentation moves (lr·|m| ≈ 1e-2 per step).
    spread = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for o in (1, 2)
                 for a, b in zip(steps(o), ref, strict=True))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=4 * spread)
    # The stored quality is the accuracy of the stored parameters (same values: no rounding in between).
    assert snap.quality == train.accuracy([p for i, p in enumerate(snap.params) if i != off], task, "validation", 16,
                                          budget.eval_batch, conftest.programs())

