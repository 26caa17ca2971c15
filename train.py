"""Training one child (Algorithm 1 lines 26–32; method-notes "Training one child").

SGD with momentum after clipping by global norm 1.0, the momentum accumulator kept in bfloat16, a linear warm-up
from lr/1000 (μ2Net+; lr/100 in μ2Net, muNet and the Section 4 baselines) then cosine decay to 0, softmax
cross-entropy, no weight decay or dropout. A child trains for #cycles cycles of min(1 epoch, samples cap) and is
validated after each; a snapshot is kept when its score reaches the running threshold of Algorithm 1 line 29 (≥;
muNet keeps it only on a strict improvement). This module knows components, hyperparameters and a task's batches,
nothing of the system or of sharing: the caller gives the score of a validation accuracy (eq. 1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

import augment
import vit

SCHEDULES = ("cosine", "constant", "restarts")  # muNet's learning-rate schedules (section4.md §5.7)
AUG_KEYS = ("crop_area_min", "crop_aspect_min", "flip", "brightness", "contrast", "saturation", "hue", "quality")
SPLITS = ("mask", "hybrid", "partition")


def _check(check: Callable[[Any], bool], expect: str, default: Any) -> Any:
    """A field whose valid values are stated once: the manifest parser and `Budget` both read `check`/`expect`."""
    return dataclasses.field(default=default, metadata={"check": check, "expect": expect})


def at_least_one(default: int) -> Any:
    return _check(lambda v: v >= 1, "an integer ≥ 1", default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """How long one child trains and how its trainable/frozen split compiles.

    trainable_split: "mask" differentiates every component and zeroes frozen gradients (one compile per
    architecture); "partition" differentiates only the trainable ones (one compile per cloning pattern); "hybrid"
    cuts off the frozen prefix below the lowest trainable component and masks the rest (bench/compile.py).
    """

    cycles: int = at_least_one(4)
    samples_cap: int = at_least_one(51_200)
    batch_size: int = at_least_one(16)
    eval_batch: int = at_least_one(256)
    # Validation reads the first min(n, validation_max) examples; data.VAL_MAX = 10,000 is the most it keeps
    # (method-notes; Section 4 used 5,120, and 2,560 for muNet and the baselines on VDDB: section4.md §3).
    validation_max: int = _check(lambda v: 1 <= v <= 10_000, "an integer in [1, 10000]", 10_000)
    trainable_split: str = _check(lambda v: v in SPLITS, "'mask', 'hybrid' or 'partition'", "mask")

    # The method's training rules (mu2net.Config reads them from its Method; properties, so no manifest field):
    @property
    def strict(self) -> bool:
        """Keep a cycle's snapshot only when its score beats the threshold (muNet: >), not when it equals it."""
        return False

    @property
    def warmup_floor(self) -> float:
        """The warm-up's first learning rate as a fraction of lr: 1/1000 (μ2Net+), 1/100 (μ2Net, muNet)."""
        return 1e-3

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None and not check(getattr(self, f.name)):
                raise ValueError(f"{type(self).__name__}.{f.name} = {getattr(self, f.name)!r}: expected "
                                 f"{f.metadata['expect']}")


class HParams(eqx.Module):
    """Optimizer and preprocessing hyperparameters as traced scalars, so a new value never recompiles. `floor`
    (the warm-up's start as a fraction of lr), `schedule` (an index of SCHEDULES) and `cycles` (restarts per
    run) shape the learning-rate schedule."""

    lr: Float[Array, ""]
    warmup: Float[Array, ""]
    momentum: Float[Array, ""]
    nesterov: Float[Array, ""]
    aug: augment.Aug
    floor: Float[Array, ""]
    schedule: Float[Array, ""]
    cycles: Float[Array, ""]

    @staticmethod
    def of(hp: Mapping[str, Any], floor: float = 1e-3, cycles: int = 1) -> HParams:
        f = lambda v: jnp.asarray(float(v), jnp.float32)  # noqa: E731
        return HParams(f(hp["lr"]), f(hp["warmup"]), f(hp["momentum"]), f(hp["nesterov"]),
                       augment.Aug.from_hparams({k: hp[k] for k in AUG_KEYS}), f(floor),
                       f(SCHEDULES.index(hp.get("schedule", "cosine"))), f(cycles))


def learning_rate(step: Int[Array, ""], total: Int[Array, ""], hp: HParams) -> Float[Array, ""]:
    """Cosine (Table 1's only schedule): a linear warm-up from lr·floor to lr over warmup·T steps, then cosine
    decay to 0 at T. muNet also searches "constant" (lr/2, the same mean) and "restarts" (the cosine schedule once
    per cycle), section4.md §5.7."""
    t, total = step.astype(jnp.float32), total.astype(jnp.float32)
    restarts = hp.schedule == SCHEDULES.index("restarts")
    period = jnp.where(restarts, total / hp.cycles, total)
    t = jnp.where(restarts, jnp.mod(t, period), t)
    w = hp.warmup * period
    start = hp.lr * hp.floor
    warm = start + (hp.lr - start) * t / jnp.maximum(w, 1.0)
    frac = jnp.clip((t - w) / jnp.maximum(period - w, 1.0), 0.0, 1.0)
    cosine = jnp.where(t < w, warm, 0.5 * hp.lr * (1 + jnp.cos(jnp.pi * frac)))
    return jnp.where(hp.schedule == SCHEDULES.index("constant"), 0.5 * hp.lr, cosine)


def zeros_like_bf16(tree: eqx.Module) -> eqx.Module:
    """A zero bfloat16 momentum for a component, in host memory (no compile per shape, no accelerator memory).
    Abstract parameters (`jax.eval_shape`'s ShapeDtypeStruct) get an abstract momentum, so a system's shapes cost no
    memory."""

    def zero(a):
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(a.shape, jnp.bfloat16)
        if isinstance(a, jax.core.Tracer):
            return jnp.zeros(a.shape, jnp.bfloat16)
        return np.zeros(a.shape, jnp.bfloat16)

    return jax.tree.map(zero, tree)


def padded_classes(k: int) -> int:
    """Heads are trained at a padded width so that tasks with different class counts share one compiled step."""
    return max(16, 1 << (k - 1).bit_length())


def pad_head(head: vit.Head, width: int) -> vit.Head:
    # On the host: eager jnp.pad would compile once per head shape.
    k = head.bias.shape[0]
    return vit.Head(np.pad(np.asarray(head.kernel), ((0, 0), (0, width - k))),
                    np.pad(np.asarray(head.bias), (0, width - k)))


def unpad_head(head: vit.Head, k: int) -> vit.Head:
    return vit.Head(np.asarray(head.kernel)[:, :k], np.asarray(head.bias)[:k])


def logits(components: Sequence[eqx.Module], images: Float[Array, "b h w 3"],
           num_classes: Int[Array, ""]) -> Float[Array, "b k"]:
    """Forward pass; the padded head columns (index ≥ num_classes) get −1e30, so their softmax weight and
    gradients are exactly zero and the padding never changes what is learned."""
    z = vit.forward(components, images)
    return jnp.where(jnp.arange(z.shape[-1])[None, :] < num_classes, z, -1e30)


# Compiled on its own (once per batch shape and resolution) rather than inside `train_step`: it costs as much to
# compile as a tiny ViT's forward and backward, and every architecture would otherwise pay for it again.
@functools.partial(jax.jit, static_argnums=4)
def preprocess(key: jax.Array, step: Int[Array, ""], x: Array, aug: augment.Aug, res: int) -> Float[Array, "b r r 3"]:
    return augment.train_preprocess(jax.random.fold_in(key, step), x, aug, res)


Components = tuple[eqx.Module | None, ...]  # one entry per component of the path; None where partitioned away


@eqx.filter_jit
def train_step(diff: Components, frozen: Components, mom: Components, mask: Float[Array, " n"],
               x: Float[Array, "b r r 3"], y: Int[Array, " b"], hp: HParams, step: Int[Array, ""],
               total: Int[Array, ""], k: Int[Array, ""]
               ) -> tuple[Components, Components, Float[Array, ""], Float[Array, ""]]:
    """One SGD step on the trainable half: clip by global norm 1.0, momentum kept in bfloat16 (Nesterov traced).
    Returns the new trainable half and momentum, the loss and the gradient norm before clipping."""

    def loss_fn(d):
        z = logits(eqx.combine(d, frozen), x, k)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    loss, g = eqx.filter_value_and_grad(loss_fn)(diff)
    g = tuple(jax.tree.map(lambda a: a * mask[i], gi) for i, gi in enumerate(g))
    flat, unravel = jax.flatten_util.ravel_pytree(g)  # one flat norm compiles faster than a per-leaf tree of sums
    norm = jnp.linalg.norm(flat)
    g = unravel(flat * jnp.minimum(1.0, 1.0 / (norm + 1e-12)))
    m = jax.tree.map(lambda mi, gi: (hp.momentum * mi.astype(jnp.float32) + gi), mom, g)
    u = jax.tree.map(lambda mi, gi: jnp.where(hp.nesterov > 0, hp.momentum * mi + gi, mi), m, g)
    lr = learning_rate(step, total, hp)
    diff = jax.tree.map(lambda p, ui: p - lr * ui, diff, u)
    return diff, jax.tree.map(lambda a: a.astype(jnp.bfloat16), m), loss, norm


@eqx.filter_jit
def correct(components: Sequence[eqx.Module], x: Array, y: Int[Array, " b"], k: Int[Array, ""],
            res: int) -> Int[Array, ""]:
    """Number of correct predictions in a batch; padding rows (label −1) never count."""
    pred = jnp.argmax(logits(components, augment.eval_preprocess(x, res), k), axis=-1)
    return jnp.sum((pred == y) & (y >= 0))


class TaskData(Protocol):
    """What a task iteration reads (implemented by data.py; see its docs)."""

    name: str
    num_classes: int
    num_train: int
    image_size: int

    def train_batch(self, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]: ...

    def eval_batches(self, split: str, batch_size: int,
                     limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def accuracy(components: Sequence[eqx.Module], task: TaskData, split: str, res: int, batch: int,
             device: jax.Device | None = None, limit: int | None = None) -> float:
    """Top-1 accuracy on a split (validation: the fixed subset of the first `limit` examples; test: the whole
    split)."""
    *body, head = components
    comps = jax.device_put((*body, pad_head(head, padded_classes(task.num_classes))), device)
    k = jax.device_put(jnp.asarray(task.num_classes, jnp.int32), device)
    n, hits = 0, jnp.zeros((), jnp.int32)
    for x, y in task.eval_batches(split, batch, limit):
        hits = hits + correct(comps, jax.device_put(x, device), jax.device_put(y, device), k, res)  # no sync
        n += int((y >= 0).sum())
    return int(hits) / max(n, 1)


def partition_trainable(components: Components, momentum: Components, trainable: tuple[bool, ...], how: str):
    """Trainable/frozen halves for `train_step`, the matching momentum and the per-component gradient mask
    (`Budget.trainable_split` says how)."""
    spec = {"partition": lambda: trainable, "mask": lambda: (True,) * len(trainable),
            "hybrid": lambda: tuple(i >= trainable.index(True) for i in range(len(trainable)))}[how]()
    diff, frozen = eqx.partition(components, spec)
    mom, _ = eqx.partition(momentum, spec)
    return diff, frozen, mom, jnp.asarray(trainable, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A child's best kept cycle (Algorithm 1 line 29): the trained components and their momentum (host arrays,
    only where `trainable`), its validation accuracy and score."""

    params: tuple[eqx.Module | None, ...]
    momentum: tuple[eqx.Module | None, ...]
    quality: float
    score: float


def train_child(components: Sequence[eqx.Module], momentum: Sequence[eqx.Module], trainable: tuple[bool, ...],
                hp: Mapping[str, Any], task: TaskData, budget: Budget, key: jax.Array,
                score: Callable[[float], float], threshold: float, device: jax.Device | None = None,
                log: Callable[[dict], None] | None = None, name: str = "") -> Snapshot | None:
    """Algorithm 1 lines 26–32: #cycles cycles of ⌈min(#train, samples cap) / batch⌉ steps (an epoch, capped, as
    the notebooks count it: section4.md §4), validate after each, keep the best snapshot whose score(quality)
    reaches the running threshold (line 29; strictly beats it under `budget.strict`). None when no cycle did."""
    kpad = padded_classes(task.num_classes)
    comps = tuple(components[:-1]) + (pad_head(components[-1], kpad),)
    mom = tuple(momentum[:-1]) + (pad_head(momentum[-1], kpad),)
    diff, frozen, mom, mask = partition_trainable(comps, mom, trainable, budget.trainable_split)
    diff, frozen, mom, mask = jax.device_put((diff, frozen, mom, mask), device)
    hps = jax.device_put(HParams.of(hp, budget.warmup_floor, budget.cycles), device)
    res = int(hp["resolution"])
    steps = -(-min(task.num_train, budget.samples_cap) // budget.batch_size)  # ceil: a part batch is a step
    total, ncls = jax.device_put((jnp.asarray(budget.cycles * steps, jnp.int32),
                                  jnp.asarray(task.num_classes, jnp.int32)), device)
    k_data, key = jax.device_put(jax.random.split(key), device)  # data order's seed; augmentation keys' base
    seed = int(seed_of(k_data).integers(2**31 - 1))
    best, t = None, 0
    for cycle in range(budget.cycles):
        for _ in range(steps):
            x, y = task.train_batch(seed, t, budget.batch_size)
            x, y, step = jax.device_put((x, y, np.int32(t)), device)
            x = preprocess(key, step, x, hps.aug, res)
            diff, mom, loss, _ = train_step(diff, frozen, mom, mask, x, y, hps, step, total, ncls)
            t += 1
            if log:  # the loss stays on device: the receiver reads it (a sync) only when it reports
                log(dict(event="step", child=name, step=t, steps=budget.cycles * steps, batch=budget.batch_size,
                         loss=loss))
        if not np.isfinite(float(loss)):
            return _discard(log, name, f"loss {float(loss)} after step {t}")
        trained = eqx.combine(diff, frozen)
        trained = trained[:-1] + (unpad_head(trained[-1], task.num_classes),)
        q = accuracy(trained, task, "validation", res, budget.eval_batch, device, budget.validation_max)
        s = score(q)
        if log:
            log(dict(event="cycle", child=name, cycle=cycle, loss=float(loss), quality=q, score=s))
        if s > threshold or (s == threshold and not budget.strict):  # Alg. 1 line 29: the threshold rises
            threshold = s
            m = mom[:-1] + (unpad_head(mom[-1], task.num_classes),)
            best = ([p if tr else None for p, tr in zip(trained, trainable)],
                    [mi if tr else None for mi, tr in zip(m, trainable)], q, s)
    if best is None:
        return None
    p, m, q, s = best
    p, m = jax.device_get((p, m))  # components live in host memory; the device holds only children in flight
    finite = lambda c: c is None or all(np.isfinite(a).all() for a in jax.tree.leaves(c))  # noqa: E731
    if bad := [i for i, c in enumerate(p) if not finite(c)]:
        return _discard(log, name, f"non-finite parameters in component {bad[0]} of the kept snapshot")
    return Snapshot(tuple(p), tuple(m), q, s)


def _discard(log: Callable[[dict], None] | None, name: str, reason: str) -> None:
    """A child whose training diverged (NaN or Inf) is not retained (issue 13): logged with its reason."""
    if log:
        log(dict(event="discarded", child=name, reason=reason))
    return None


def seed_of(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by the bits of an explicit jax key: host-side random choices then cost no device
    round trip and no compile, and stay a pure function of the key (computed eagerly even under a trace, e.g. when
    `jax.eval_shape` builds a system's shapes)."""
    with jax.ensure_compile_time_eval():
        bits = np.asarray(jax.random.key_data(key))
    return np.random.default_rng(bits.ravel().tolist())
