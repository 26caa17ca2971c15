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
import optax
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


# --- device memory settings: rematerialisation and micro-batches (docs/hardware.md) ------------------------------

def _run(setup, remat, micro, steps=1):
    (diff, frozen, mom, mask), x, y = setup
    hp, total, k = train.HParams.of(HP), jnp.asarray(100, jnp.int32), jnp.asarray(10, jnp.int32)
    for s in range(steps):
        diff, mom, loss, gnorm = train.train_step(diff, frozen, mom, mask, x, y, hp, jnp.asarray(s, jnp.int32), total,
                                                  k, remat, micro)
    return diff, mom, loss, gnorm


def _same(a, b):
    return all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                           strict=True))


def test_remat_is_the_plain_step_bit_for_bit(setup):
    """Rematerialisation recomputes each block's forward from its kept input with the same operations: XLA gives
    the same bits, here over steps that change the parameters and momentum."""
    assert _same(_run(setup, True, 1, steps=4), _run(setup, False, 1, steps=4))


def test_remat_in_the_fused_chunk_is_bit_for_bit():
    """The program a child runs (train_group's chunks, a block switched off by its flag) with and without remat."""
    task = data.make_task_data(data.load_catalog()["digits"], 16)
    init = list(vit.init(CFG, jax.random.key(0), 10, 16).values())
    init[4] = jax.tree.map(np.zeros_like, init[4])  # encoderblock_1, off
    on = tuple(i != 4 for i in range(len(init)))
    hp = dict(HP, crop_area_min=0.5, flip=True, resolution=16)
    out = []
    for remat in (False, True):
        budget = train.ChildBudget(cycles=1, samples_cap=96, batch_size=32, remat=remat)
        job = train.Job(init, [train.zeros_like_bf16(c) for c in init], on, hp, jax.random.key(3), lambda q: 0.0,
                        0.0, "c", on)
        out.append(train.train_group([train.prepare(job, task, budget)], task, budget, conftest.programs())[0])
    assert _same(out[0].params, out[1].params) and _same(out[0].momentum, out[1].momentum)
    assert out[0].quality == out[1].quality


def _per_token_magnitudes(comps, x, y, k):
    """Σ_j |t_j| for every parameter element, t_j the summands of its gradient, one per (example, token) the
    parameter acts on: vit.py's maths re-run with a copy of every parameter per (example, token), so that each
    copy's gradient is one summand. Returns the loss and the magnitudes (checked against train._grad)."""
    emb, cls, pe, *blocks, norm, head = comps
    b, p = x.shape[0], emb.kernel.shape[0]
    g = x.shape[1] // p
    T = g * g + 1
    copies = lambda t, m: jax.tree.map(lambda a: jnp.broadcast_to(a, (b, m) + a.shape), t)  # noqa: E731
    P = (copies(emb, g * g), copies(cls, 1), copies(pe, 1), [copies(c, T) for c in blocks], copies(norm, T),
         copies(head, 1))

    def ln(z, n):
        zc = z - z.mean(-1, keepdims=True)
        return zc * jax.lax.rsqrt(jnp.square(zc).mean(-1, keepdims=True) + vit.EPS) * n.scale + n.bias

    def dense(z, d, spec):
        return jnp.einsum(spec, z, d.kernel) + d.bias

    def loss(P):
        emb, cls, pe, blocks, norm, head = P
        xs = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p, p, 3)
        z = jnp.einsum("bnpqc,bnpqcd->bnd", xs, emb.kernel) + emb.bias
        z = jnp.concatenate([cls.cls[:, 0, 0], z], 1) + pe.pos_embedding[:, 0, 0]
        for c in blocks:
            a, m = c.MultiHeadDotProductAttention_1, c.MlpBlock_3
            h = ln(z, c.LayerNorm_0)
            q, kk, v = (dense(h, d, "bnd,bndhk->bnhk") for d in (a.query, a.key, a.value))
            s = jax.nn.softmax(jnp.einsum("bqhk,bnhk->bhqn", q, kk) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype)), -1)
            z = z + dense(jnp.einsum("bhqn,bnhk->bqhk", s, v), a.out, "bqhk,bqhkd->bqd")
            h = jax.nn.gelu(dense(ln(z, c.LayerNorm_2), m.Dense_0, "bnd,bndm->bnm"), approximate=True)
            z = z + dense(h, m.Dense_1, "bnm,bnmd->bnd")
        z = dense(ln(z, norm)[:, :1], head, "bnd,bndk->bnk")[:, 0]
        z = jnp.where(jnp.arange(z.shape[-1])[None, :] < k, z, -1e30)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    value, gP = jax.value_and_grad(loss)(P)
    emb, cls, pe, blocks, norm, head = jax.tree.map(lambda a: jnp.abs(a).sum((0, 1)), gP)
    return value, (emb, cls, pe, *blocks, norm, head)


def test_micro_batches_give_the_plain_gradient_and_update(setup):
    """Micro-batching computes the same sum of per-token gradient terms t_j (one per token of the batch a
    parameter acts on, N = batch × tokens) in another order, and XLA may round the terms themselves differently
    in programs of other batch shapes. First-order forward error (Higham, Accuracy and Stability, §3.1, §4.2):
    a sum or inner product of n terms is within γ_n = n·u/(1 − n·u) of exact, relative to the sum of magnitudes,
    and along a chain of them the lengths add. A term passes the backward of every layer above its parameter
    (inner products over the head's classes, the width, the MLP width, the head width and the tokens of the
    softmax, per block), then the sum over the batch's tokens: K = N + those lengths, and each program's gradient
    lies within γ_K·Σ_j|t_j| of the exact one, so the two differ by at most E = 2·γ_K·Σ_j|t_j| (Σ_j|t_j| computed
    token by token by `_per_token_magnitudes`). The update follows: clipping by the global norm (‖g‖ > 1 here)
    moves by at most E/‖g‖ + |g|·‖E‖/‖g‖², the step by lr times that plus one float32 rounding of the parameter,
    the bfloat16 momentum by that plus one bfloat16 rounding."""
    (diff, frozen, mom, mask), x, y = setup
    b, k = y.shape[0], jnp.asarray(10, jnp.int32)
    T = (x.shape[1] // CFG.patch) ** 2 + 1
    K = b * T + CFG.depth * (2 * CFG.width + CFG.mlp_dim + CFG.width // CFG.heads + T) + CFG.width + 16
    gamma = lambda n: n * U / (1 - n * U)  # noqa: E731
    grad = jax.jit(train._grad, static_argnums=(6, 7))
    loss1, g1 = grad(diff, frozen, None, x, y, k, False, 1)
    value, mag = jax.jit(_per_token_magnitudes)(diff, x, y, k)
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]  # noqa: E731
    g, e = flat(g1), 2 * gamma(K) * flat(mag)
    assert abs(float(value - loss1)) <= 2 * gamma(K) * float(loss1)  # the re-run is vit.py's maths
    norm, enorm = float(jnp.linalg.norm(g)), float(jnp.linalg.norm(e))
    du = e / norm + jnp.abs(g) * enorm / norm ** 2  # |Δ(g·min(1, 1/‖g‖))|
    d1, m1, _, n1 = _run(setup, False, 1)
    p1, u1 = flat(d1), flat(m1).astype(jnp.float32)  # the momentum after step 0 is the clipped gradient
    lr0 = HP["lr"] * 1e-3  # step 0 of the warm-up
    for micro in (2, 8):
        loss, gm = grad(diff, frozen, None, x, y, k, True, micro)
        assert abs(float(loss - loss1)) <= 2 * gamma(b) * float(loss1)  # b positive terms
        assert bool(jnp.all(jnp.abs(flat(gm) - g) <= e)), micro
    dm, mm, _, nm = _run(setup, True, 4)  # the whole step, with remat
    assert norm > 1 and abs(float(nm - n1)) <= enorm + 2 * gamma(g.size) * norm  # the norm's own rounding
    assert bool(jnp.all(jnp.abs(flat(dm) - p1) <= lr0 * du + jnp.abs(jnp.spacing(p1))))
    ulp16 = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(jnp.abs(u1), 1e-30))) - 7)
    assert bool(jnp.all(jnp.abs(flat(mm).astype(jnp.float32) - u1) <= du + ulp16))


def test_micro_batches_preprocess_the_same_images():
    """The augmentation runs before the step, one program per chunk whatever the micro-batches: the same
    compiled program, so the same keys give the same images."""
    task = data.make_task_data(data.load_catalog()["digits"], 16)
    comps = list(vit.init(CFG, jax.random.key(0), 10, 16).values())
    job = train.Job(comps, [train.zeros_like_bf16(c) for c in comps], (True,) * len(comps), dict(HP, resolution=16),
                    jax.random.key(3), lambda q: 0.0, 0.0, "c")
    b1, b4 = (train.ChildBudget(cycles=1, samples_cap=64, batch_size=32, micro_batches=m) for m in (1, 4))
    cache = conftest.programs()
    f1, f4 = ([cache(*p) for p in train.programs([train.prepare(job, task, b)], task, b, jax.devices()[0])]
              for b in (b1, b4))
    assert f1[0] is f4[0] and f1[1] is not f4[1]  # augment shared, the steps differ
    snap = train.train_group([train.prepare(job, task, b4)], task, b4, cache)[0]
    assert snap is not None and all(np.isfinite(a).all() for a in jax.tree.leaves(snap.params))


def test_micro_batches_must_divide_the_batch():
    with pytest.raises(ValueError, match=r"^ChildBudget.micro_batches = 3: expected a divisor of batch_size = 16$"):
        train.ChildBudget(batch_size=16, micro_batches=3)
    assert train.ChildBudget().remat and train.ChildBudget().micro_batches == 1  # the defaults (docs/hardware.md)
