"""Training one child (Algorithm 1 lines 26–32; docs/method.md, "Training one child").

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
import operator
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

SCHEDULES = ("cosine", "constant", "restarts")  # muNet's learning-rate schedules (docs/benchmarks.md §5.7)
AUG_KEYS = ("crop_area_min", "crop_aspect_min", "flip", "brightness", "contrast", "saturation", "hue", "quality")
SPLITS = ("mask", "hybrid", "partition")


def checked(check: Callable[[Any], bool], expect: str, default: Any) -> Any:
    """A field whose valid values are stated once: the manifest parser and the budgets both read `check`/`expect`."""
    return dataclasses.field(default=default, metadata={"check": check, "expect": expect})


def at_least_one(default: int, most: int) -> Any:
    """An integer in [1, most]: `most` bounds what a typo can ask for (memory, a 32-bit key) with a clear error."""
    return checked(lambda v: 1 <= v <= most, f"an integer in [1, {most:,}]", default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildBudget:
    """How long one child trains and how its trainable/frozen split compiles.

    trainable_split: "mask" differentiates every component and zeroes frozen gradients (one compile per
    architecture); "partition" differentiates only the trainable ones (one compile per cloning pattern); "hybrid"
    cuts off the frozen prefix below the lowest trainable component and masks the rest (bench/compile.py).
    """

    cycles: int = at_least_one(4, 10_000)
    samples_cap: int = at_least_one(51_200, 2**31 - 1)  # a 32-bit sample count
    batch_size: int = at_least_one(16, 65_536)  # and one batch of images in memory: manifest.MAX_BATCH_BYTES
    eval_batch: int = at_least_one(256, 65_536)
    # Validation reads the first min(n, validation_max) examples; data.VAL_MAX = 10,000 is the most it keeps
    # (docs/method.md; Section 4 used 5,120, and 2,560 for muNet and the baselines on VDDB: docs/benchmarks.md §3).
    validation_max: int = checked(lambda v: 1 <= v <= 10_000, "an integer in [1, 10000]", 10_000)
    trainable_split: str = checked(lambda v: v in SPLITS, "'mask', 'hybrid' or 'partition'", "mask")
    # A child's device memory (docs/hardware.md): `remat` recomputes each encoder block's activations in the
    # backward pass (the same values); `micro_batches` > 1 sums the gradient over that many equal slices of a batch
    # (the same update up to float32 summation order) at the activation memory of one slice.
    remat: bool = checked(lambda v: isinstance(v, bool), "true or false", True)
    micro_batches: int = at_least_one(1, 65_536)  # at most batch_size, which it divides

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None and not check(getattr(self, f.name)):
                raise ValueError(f"{type(self).__name__}.{f.name} = {getattr(self, f.name)!r}: expected "
                                 f"{f.metadata['expect']}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"{type(self).__name__}.micro_batches = {self.micro_batches!r}: expected a divisor of "
                             f"batch_size = {self.batch_size}")


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
    per cycle), docs/benchmarks.md §5.7."""
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


def logits(components: Sequence[eqx.Module], images: Float[Array, "b h w 3"], num_classes: Int[Array, ""],
           on: Float[Array, " n"] | None = None, remat: bool = False) -> Float[Array, "b k"]:
    """Forward pass (`on`, `remat`: vit.forward's); the padded head columns (index ≥ num_classes) get −1e30, so
    their softmax weight and gradients are exactly zero and the padding never changes what is learned."""
    z = vit.forward(components, images, on, remat)
    return jnp.where(jnp.arange(z.shape[-1])[None, :] < num_classes, z, -1e30)


# Compiled on its own (once per batch shape and resolution) rather than inside a training step: it costs as much to
# compile as a tiny ViT's forward and backward, and every architecture would otherwise pay for it again. A run
# preprocesses a whole chunk of steps at once (`_augment_chunk`); this one-batch form is its reference (bench/input.py).
@functools.partial(jax.jit, static_argnums=4)
def preprocess(key: jax.Array, step: Int[Array, ""], x: Array, aug: augment.Aug, res: int) -> Float[Array, "b r r 3"]:
    return augment.train_preprocess(jax.random.fold_in(key, step), x, aug, res)


Components = tuple[eqx.Module | None, ...]  # one entry per component of the path; None where partitioned away


def _grad(diff: Components, frozen: Components, on: Float[Array, " n"] | None, x: Float[Array, "b r r 3"],
          y: Int[Array, " b"], k: Int[Array, ""], remat: bool, micro: int
          ) -> tuple[Float[Array, ""], Components]:
    """The batch's mean cross-entropy and its gradient. With `micro` > 1 the batch is cut into `micro` slices in
    order, the summed loss and its gradient are accumulated over them (a scan: one slice's activations live at a
    time) and divided by the batch size: the mean's gradient, summed in another order."""

    def loss_fn(d, x, y, reduce):
        z = logits(eqx.combine(d, frozen), x, k, on, remat)
        return reduce(optax.softmax_cross_entropy_with_integer_labels(z, y))

    if micro == 1:
        return eqx.filter_value_and_grad(loss_fn)(diff, x, y, jnp.mean)
    b = y.shape[0]

    def body(acc, xy):
        loss, g = eqx.filter_value_and_grad(loss_fn)(diff, *xy, jnp.sum)
        return jax.tree.map(jnp.add, acc, (loss, g)), None

    zero = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), diff))
    slices = (x.reshape((micro, b // micro) + x.shape[1:]), y.reshape(micro, b // micro))
    acc, _ = jax.lax.scan(body, zero, slices)
    return jax.tree.map(lambda a: a / b, acc)


def _step(diff: Components, frozen: Components, mom: Components, mask: Float[Array, " n"],
          on: Float[Array, " n"] | None, x: Float[Array, "b r r 3"], y: Int[Array, " b"], hp: HParams,
          step: Int[Array, ""], total: Int[Array, ""], k: Int[Array, ""], remat: bool = False, micro: int = 1
          ) -> tuple[Components, Components, Float[Array, ""], Float[Array, ""]]:
    """One SGD step on the trainable half: clip by global norm 1.0, momentum kept in bfloat16 (Nesterov traced),
    the gradients of frozen components (mask 0) zeroed; components whose `on` flag is 0 are skipped
    (vit.forward); `remat`, `micro`: ChildBudget.remat, ChildBudget.micro_batches. Returns the new trainable half and
    momentum, the loss and the gradient norm before clipping."""
    loss, g = _grad(diff, frozen, on, x, y, k, remat, micro)
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
def train_step(diff: Components, frozen: Components, mom: Components, mask: Float[Array, " n"],
               x: Float[Array, "b r r 3"], y: Int[Array, " b"], hp: HParams, step: Int[Array, ""],
               total: Int[Array, ""], k: Int[Array, ""], remat: bool = False, micro: int = 1
               ) -> tuple[Components, Components, Float[Array, ""], Float[Array, ""]]:
    """`_step` with every component on, compiled on its own: the single-step reference (test_train.py's golden
    metrics) of what a chunk of fused steps runs."""
    return _step(diff, frozen, mom, mask, None, x, y, hp, step, total, k, remat, micro)


# --- one compiled program per chunk of steps -------------------------------------------------------------------
# A child's cycle runs as chunks of steps: the host assembles a chunk's batches of every child of a group and moves
# them in one transfer, one call preprocesses them, one call runs the steps as a lax.scan. Step i of a chunk runs
# only when i < valid (a cycle's last chunk is padded), so one compile per (architecture, group size) serves every
# cycle and every task of a budget. All inputs carry a leading axis of n children (see `_per_child`).

CHUNK = 64  # steps per compiled call at most: the per-step host dispatch of a small child costs as much as the step
CHUNK_BYTES = 1 << 28  # ... and at most this much input per call, so a chunk of large images fits a device


def chunk_length(n: int, budget: ChildBudget, size: int, res: int) -> int:
    """Steps per chunk: the power of two that holds the budget's longest cycle (samples cap / batch), at most CHUNK
    and at most what fits CHUNK_BYTES (uint8 input and float32 preprocessed batches of n children). It depends on
    no task, so the tasks of a budget share the compiled chunk; a task with fewer steps pads its last chunk."""
    per_step = n * budget.batch_size * 3 * (size * size + 4 * res * res)
    longest = -(-budget.samples_cap // budget.batch_size)
    c = max(1, min(CHUNK, CHUNK_BYTES // per_step, 1 << (longest - 1).bit_length()))
    return 1 << (c.bit_length() - 1)


def _augment_chunk(kd: Array, xs: Array, aug: augment.Aug, t0: Int[Array, ""], valid: Int[Array, ""],
                   res: int) -> Float[Array, "n c b r r 3"]:
    """uint8 [n, C, B, S, S, 3] -> float32 [n, C, B, res, res, 3]: child j's step t0 + i is preprocessed with
    fold_in(its augmentation key kd[j], t0 + i), as `preprocess` does. One batch at a time (lax.map) with that
    child's unbatched hyperparameters, so the lax.cond in `augment` still skips what is off."""
    n, c = xs.shape[:2]
    ii = jnp.tile(jnp.arange(c, dtype=jnp.int32), n)
    jj = jnp.repeat(jnp.arange(n, dtype=jnp.int32), c)

    def one(a):
        x, i, j = a
        key = jax.random.fold_in(jax.random.wrap_key_data(kd[j]), t0 + i)
        out = lambda: augment.train_preprocess(key, x, jax.tree.map(lambda v: v[j], aug), res)  # noqa: E731
        return jax.lax.cond(i < valid, out, lambda: jnp.zeros((x.shape[0], res, res, 3), jnp.float32))

    out = jax.lax.map(one, (xs.reshape((n * c,) + xs.shape[2:]), ii, jj))
    return out.reshape((n, c) + out.shape[1:])


def _chunk(diff: Components, mom: Components, mask: Array, on: Array, frozen: Components, hp: HParams, xs: Array,
           ys: Array, t0: Int[Array, ""], valid: Int[Array, ""], total: Int[Array, ""], k: Int[Array, ""],
           remat: bool = False, micro: int = 1) -> tuple[Components, Components, Float[Array, " c"]]:
    """One child's steps t0 .. t0 + valid - 1 of `_step` as one scan over a chunk; returns the trainable half,
    its momentum and the losses."""

    def body(carry, a):
        x, y, i = a

        def run(c):
            d, m, loss, _ = _step(c[0], frozen, c[1], mask, on, x, y, hp, t0 + i, total, k, remat, micro)
            return (d, m), loss

        return jax.lax.cond(i < valid, run, lambda c: (c, jnp.zeros((), jnp.float32)), carry)

    (diff, mom), loss = jax.lax.scan(body, (diff, mom), (xs, ys, jnp.arange(xs.shape[0], dtype=jnp.int32)))
    return diff, mom, loss


def _hits(diff: Components, on: Array, frozen: Components, x: Array, y: Int[Array, " b"], k: Int[Array, ""],
          res: int) -> Int[Array, ""]:
    """Number of correct predictions in an evaluation batch; padding rows (label −1) never count."""
    z = logits(eqx.combine(diff, frozen), augment.eval_preprocess(x, res), k, on)
    pred = jnp.argmax(z, axis=-1)
    return jnp.sum((pred == y) & (y >= 0))


def _per_child(f: Callable, n: int, axes: tuple[int | None, ...]) -> Callable:
    """`f` over a leading axis of n children (arguments with axis None are shared): vectorised (vmap) for n > 1;
    for n = 1 the unbatched program, so a child trained alone computes exactly what it always did."""
    batched = jax.vmap(f, in_axes=axes)

    def g(*args):
        if n > 1:
            return batched(*args)
        args = [jax.tree.map(lambda v: v[0], a) if ax == 0 else a for a, ax in zip(args, axes)]
        return jax.tree.map(lambda v: v[None], f(*args))
    g.__name__ = getattr(f, "__name__", None) or f.func.__name__  # compiles are counted by name (bench/)
    return g


# --- the programs a group needs ------------------------------------------------------------------------------
# A program is named by a key (kind, shapes, device) and built by a `Build`: its function and abstract arguments.
# Who compiles them, when, and where they are kept is the caller's (schedule.Programs: a run's cache, compiled ahead
# in worker threads); this module only says which programs training and evaluation need.

Build = Callable[[], tuple[Callable, Sequence[Any]]]
Compiled = Callable[[tuple, Build], Callable]  # the compiled program of a key, once it is ready


def compile_now(key: tuple, build: Build) -> Callable:
    """A `Compiled` without a cache: every call compiles (a one-off evaluation, a single-child benchmark)."""
    fn, specs = build()
    return jax.jit(fn).lower(*specs).compile()


def _layout(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(a), np.dtype(a.dtype)) for a in leaves)


def _specs(tree: Any, n: int | None, device: jax.Device) -> Any:
    """Abstract arguments on `device` for `tree`'s arrays, with a leading axis of n children unless n is None."""
    s = jax.sharding.SingleDeviceSharding(device)
    lead = () if n is None else (n,)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(lead + np.shape(a), np.dtype(a.dtype), sharding=s), tree)


def _hits_program(diff: Components, frozen: Components, n: int, batch: int, size: int, res: int,
                  device: jax.Device) -> tuple[tuple, Build]:
    def build():
        x, y, k = np.zeros((batch, size, size, 3), np.uint8), np.zeros(batch, np.int32), np.int32(0)
        on = np.zeros(len(diff), np.float32)
        return (_per_child(functools.partial(_hits, res=res), n, (0, 0, 0, None, None, None)),
                (*_specs((diff, on, frozen), n, device), *_specs((x, y, k), None, device)))
    return ("hits", _layout(diff), _layout(frozen), n, batch, size, res, device), build


# --- training children -------------------------------------------------------------------------------------------


class TaskData(Protocol):
    """What a task iteration reads (implemented by data.py; see its docs)."""

    name: str
    num_classes: int
    num_train: int
    num_validation: int  # at most data.VAL_MAX
    image_size: int

    def train_batch(self, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]: ...

    def eval_batches(self, split: str, batch_size: int,
                     limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def _evaluate(program: Callable, diff: Components, on: Array, frozen: Components,
              batches: Sequence[tuple[Array, Array]], k: Array) -> list[Array]:
    return [program(diff, on, frozen, x, y, k) for x, y in batches]  # no sync: the caller reads the hits later


def accuracy(components: Sequence[eqx.Module], task: TaskData, split: str, res: int, batch: int,
             compiled: Compiled, device: jax.Device | None = None, limit: int | None = None,
             on: Sequence[bool] | None = None) -> float:
    """Top-1 accuracy on a split (validation: the fixed subset of the first `limit` examples; test: the whole
    split), with the program that validates a child trained alone under the "mask" split (`on`: vit.forward's
    flags, default all on)."""
    device = device or jax.local_devices()[0]
    *body, head = components
    comps = (*body, pad_head(head, padded_classes(task.num_classes)))
    diff, frozen, _, _ = partition_trainable(comps, comps, (True,) * len(comps), "mask")
    host = list(task.eval_batches(split, batch, limit))
    if len(host) == 1:  # a split smaller than the batch: cut the padding as `eval_batch` does
        b = _holding(int((host[0][1] >= 0).sum()), batch)
        host = [(x[:b], y[:b]) for x, y in host]
        batch = b
    program = compiled(*_hits_program(diff, frozen, 1, batch, task.image_size, res, device))
    on = np.asarray([True] * len(comps) if on is None else on, np.float32)
    one = jax.tree.map(lambda a: np.asarray(a)[None], (diff, on, frozen))
    (diff, on, frozen), k = jax.device_put((one, np.int32(task.num_classes)), device)
    hits = _evaluate(program, diff, on, frozen, jax.device_put(host, device), k)
    return int(sum(np.asarray(h)[0] for h in hits)) / max(sum(int((y >= 0).sum()) for _, y in host), 1)


def partition_trainable(components: Components, momentum: Components, trainable: tuple[bool, ...], how: str):
    """Trainable/frozen halves for `train_step`, the matching momentum and the per-component gradient mask
    (`ChildBudget.trainable_split` says how)."""
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


@dataclasses.dataclass(frozen=True)
class Job:
    """One child to train: its components, momentum, which of them train, hyperparameters and key; vit.forward's
    flags (`on`, default all on); and how its cycles are judged, as the method says: `score` is eq. 1 of a
    validation accuracy, `threshold` line 29's running threshold at the start, `strict` line 29's rule (`retains`)
    and `floor` the warm-up's first learning rate as a fraction of lr (1/1000 in μ2Net+, 1/100 in μ2Net, muNet
    and the baselines)."""

    components: Sequence[eqx.Module]
    momentum: Sequence[eqx.Module]
    trainable: tuple[bool, ...]
    hp: Mapping[str, Any]
    key: jax.Array
    score: Callable[[float], float]
    threshold: float
    name: str = ""
    on: tuple[bool, ...] | None = None
    strict: bool = False
    floor: float = 1e-3


def retains(score: float, threshold: float, strict: bool) -> bool:
    """Algorithm 1 line 29: a cycle's snapshot is kept when its score reaches the running threshold (≥); muNet
    keeps it only on a strict improvement (>, docs/benchmarks.md §5.7)."""
    return score > threshold or (score == threshold and not strict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A job made ready on the host (`prepare`): its trainable and frozen halves and momentum (head padded), the
    gradient mask and on flags, hyperparameters, the augmentation key's data and the data order's seed."""

    job: Job
    diff: Components
    frozen: Components
    mom: Components
    mask: np.ndarray
    on: np.ndarray
    hp: HParams
    kd: np.ndarray
    seed: int
    res: int

    @property
    def group(self) -> tuple:
        """Jobs with equal groups may train as one vectorised program: equal shapes, and the same layers on (a
        layer that is on for some children of a vectorised group is computed for all)."""
        return _layout(self.diff), _layout(self.frozen), self.res, self.on.tobytes()


def prepare(job: Job, task: TaskData, budget: ChildBudget) -> Plan:
    kpad = padded_classes(task.num_classes)
    comps = tuple(job.components[:-1]) + (pad_head(job.components[-1], kpad),)
    mom = tuple(job.momentum[:-1]) + (pad_head(job.momentum[-1], kpad),)
    diff, frozen, mom, mask = partition_trainable(comps, mom, job.trainable, budget.trainable_split)
    k_data, k_aug = jax.random.split(job.key)  # the data order's seed; the augmentation keys' base
    host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return Plan(job, host(diff), host(frozen), host(mom), np.asarray(mask),
                np.asarray(job.on or (True,) * len(comps), np.float32),
                host(HParams.of(job.hp, job.floor, budget.cycles)),
                np.asarray(jax.random.key_data(k_aug)), int(seed_of(k_data).integers(2**31 - 1)),
                int(job.hp["resolution"]))


def _holding(n: int, batch: int) -> int:
    """An evaluation batch for n examples: `batch`, or the power of two that holds fewer, so that 16 images are
    not padded to 256 (each padding row costs a forward pass and its activations)."""
    return min(batch, 1 << max(n - 1, 0).bit_length())


def eval_batch(task: TaskData, budget: ChildBudget) -> int:
    """Validation's batch (`_holding` the validation set)."""
    return _holding(min(task.num_validation, budget.validation_max), budget.eval_batch)


def steps_per_cycle(task: TaskData, budget: ChildBudget) -> int:
    """⌈min(#train, samples cap) / batch⌉: an epoch, capped, as the notebooks count it (a part batch is a step,
    docs/benchmarks.md §4)."""
    return -(-min(task.num_train, budget.samples_cap) // budget.batch_size)


def programs(plans: Sequence[Plan], task: TaskData, budget: ChildBudget,
             device: jax.Device) -> list[tuple[tuple, Build]]:
    """The three programs that train `plans` (one group) on `device`, by key: a chunk's preprocessing, its steps
    and validation."""
    q, n = plans[0], len(plans)
    B, S, res = budget.batch_size, task.image_size, q.res
    c = chunk_length(n, budget, S, res)
    x8, x = np.zeros((c, B, S, S, 3), np.uint8), np.zeros((c, B, res, res, 3), np.float32)
    y, i32 = np.zeros((c, B), np.int32), _specs(np.int32(0), None, device)
    pre = (("augment", n, c, B, S, res, device), lambda: (
        functools.partial(_augment_chunk, res=res), (*_specs((q.kd, x8, q.hp.aug), n, device), i32, i32)))
    step = functools.partial(_chunk, remat=budget.remat, micro=budget.micro_batches)
    run = (("chunk", _layout(q.diff), _layout(q.frozen), n, c, B, res, budget.remat, budget.micro_batches, device),
           lambda: (_per_child(step, n, (0,) * 8 + (None,) * 4),
                    (*_specs((q.diff, q.mom, q.mask, q.on, q.frozen, q.hp, x, y), n, device), i32, i32, i32, i32)))
    return [pre, run, _hits_program(q.diff, q.frozen, n, eval_batch(task, budget), S, res, device)]


class _Loss:
    """A step record's loss, read from the device (a sync) only when a receiver reports it."""

    def __init__(self, losses: Array, child: int, step: int):
        self.losses, self.child, self.step = losses, child, step

    def __float__(self) -> float:
        return float(np.asarray(self.losses)[self.child, self.step])


def train_group(plans: Sequence[Plan], task: TaskData, budget: ChildBudget, compiled: Compiled,
                device: jax.Device | None = None, log: Callable[[dict], None] | None = None) -> list[Snapshot | None]:
    """Algorithm 1 lines 26–32 for one group, trained as one program (vectorised when n > 1, `_per_child`), each
    child with its own data, keys, hyperparameters, mask, score and threshold: #cycles cycles, validation after each,
    the best snapshot that reaches the running threshold (line 29, `retains`); None when none did or the child
    diverged (a non-finite loss after a cycle, or non-finite kept parameters: discarded and logged)."""
    device = device or jax.local_devices()[0]
    n, B, S = len(plans), budget.batch_size, task.image_size
    augment_chunk, run_chunk, hits = (compiled(k, b) for k, b in programs(plans, task, budget, device))
    stack = lambda *a: np.asarray(a[0])[None] if n == 1 else np.stack(a)  # noqa: E731  (one child: a view, no copy)
    diff, mom, mask, on, frozen, hp, kd = jax.device_put(
        jax.tree.map(stack, *[(q.diff, q.mom, q.mask, q.on, q.frozen, q.hp, q.kd) for q in plans]), device)
    steps = steps_per_cycle(task, budget)
    c = chunk_length(n, budget, S, plans[0].res)
    T = budget.cycles * steps
    total, k = jax.device_put((np.int32(T), np.int32(task.num_classes)), device)
    val, nval = None, 1  # the validation set goes to the device once the first chunk is under way
    best: list[tuple | None] = [None] * n
    dead: list[str | None] = [None] * n  # why a child was discarded
    threshold = [q.job.threshold for q in plans]

    def decide(cycle, diff, mom, hit, losses, last, t):  # reads a cycle's results once the next one is under way
        qs = sum(np.asarray(h) for h in hit) / nval
        loss = np.asarray(losses)[:, last]
        for i, q in enumerate(plans):
            if dead[i]:
                continue
            if not np.isfinite(loss[i]):
                dead[i] = _discard(log, q.job.name, f"loss {float(loss[i])} after step {t}")
                continue
            s = q.job.score(float(qs[i]))
            if log:
                log(dict(event="cycle", child=q.job.name, cycle=cycle, loss=float(loss[i]), quality=float(qs[i]),
                         score=s))
            if retains(s, threshold[i], q.job.strict):  # Alg. 1 line 29: the threshold rises
                threshold[i] = s
                best[i] = (diff, mom, float(qs[i]), s)

    t, pending = 0, None
    for q in plans if log else ():  # a progress receiver's clock starts here: rates then span whole chunks
        log(dict(event="step", child=q.job.name, step=0, steps=T, batch=B, loss=None))
    for cycle in range(budget.cycles):
        for a in range(0, steps, c):
            valid = min(c, steps - a)
            xs, ys = _host_chunk(plans, task, t, valid, c, B)
            xs, ys, t0, v = jax.device_put((xs, ys, np.int32(t), np.int32(valid)), device)  # one transfer
            diff, mom, losses = run_chunk(diff, mom, mask, on, frozen, hp, augment_chunk(kd, xs, hp.aug, t0, v), ys,
                                          t0, v, total, k)
            t += valid
            for j, q in enumerate(plans) if log else ():
                log(dict(event="step", child=q.job.name, step=t, steps=T, batch=B, loss=_Loss(losses, j, valid - 1)))
        if val is None:
            host = list(task.eval_batches("validation", eval_batch(task, budget), budget.validation_max))
            val, nval = jax.device_put(host, device), max(sum(int((y >= 0).sum()) for _, y in host), 1)
        if pending:
            decide(*pending)
        pending = (cycle, diff, mom, _evaluate(hits, diff, on, frozen, val, k), losses, valid - 1, t)
    decide(*pending)

    return _snapshots(plans, best, dead, task, log)


def _host_chunk(plans: Sequence[Plan], task: TaskData, t: int, valid: int, c: int, B: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's uint8 batches of every child (its own data order), steps t .. t + valid - 1; the rest is padding."""
    S = task.image_size
    xs, ys = np.zeros((len(plans), c, B, S, S, 3), np.uint8), np.zeros((len(plans), c, B), np.int32)
    for j, q in enumerate(plans):
        for i in range(valid):
            xs[j, i], ys[j, i] = task.train_batch(q.seed, t + i, B)
    return xs, ys


def _snapshots(plans: Sequence[Plan], best: Sequence[tuple | None], dead: Sequence[str | None], task: TaskData,
               log: Callable[[dict], None] | None) -> list[Snapshot | None]:
    """Each child's kept cycle brought to host memory (devices hold only the children in flight), its trainable
    components only; None where nothing was kept or the child diverged."""
    fetched: dict[int, tuple] = {}
    out: list[Snapshot | None] = []
    for i, (q, b) in enumerate(zip(plans, best)):
        if b is None or dead[i]:
            out.append(None)
            continue
        d, m, quality, s = b
        if id(d) not in fetched:  # children whose best cycle is the same share one transfer
            fetched[id(d)] = jax.device_get((d, m))
        row = jax.tree.map(operator.itemgetter(i), fetched[id(d)])
        d, m = (_trained_only(r, q.job.trainable, task.num_classes) for r in row)
        if bad := [j for j, c in enumerate(d) if c is not None and not _finite(c)]:
            _discard(log, q.job.name, f"non-finite parameters in component {bad[0]} of the kept snapshot")
            out.append(None)
            continue
        out.append(Snapshot(d, m, quality, s))
    return out


def _finite(tree: Any) -> bool:
    return all(np.isfinite(a).all() for a in jax.tree.leaves(tree))


def _discard(log: Callable[[dict], None] | None, name: str, reason: str) -> str:
    """A child whose training diverged (NaN or Inf) is not retained: logged with its reason."""
    if log:
        log(dict(event="discarded", child=name, reason=reason))
    return reason


def _trained_only(t: Components, trainable: tuple[bool, ...], k: int) -> Components:
    """The trainable entries of a child's components (None elsewhere), the head cut back to k classes."""
    t = t[:-1] + (unpad_head(t[-1], k),)
    return tuple(a if tr else None for a, tr in zip(t, trainable))


def seed_of(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by the bits of an explicit jax key: host-side random choices then cost no device
    round trip and no compile, and stay a pure function of the key (computed eagerly even under a trace, e.g. when
    `jax.eval_shape` builds a system's shapes)."""
    with jax.ensure_compile_time_eval():
        bits = np.asarray(jax.random.key_data(key))
    return np.random.default_rng(bits.ravel().tolist())


class Sampler:
    """Host-side random decisions in a fixed order (a child's mutations, a parent draw), from a numpy generator
    seeded by the bits of an explicit jax key (`seed_of`); `key` gives fresh jax keys for initialisation."""

    def __init__(self, key: jax.Array):
        self.base, self.n = key, 0
        self.rng = seed_of(key)

    def uniform(self) -> float:
        return float(self.rng.random())

    def key(self) -> jax.Array:
        """A fresh jax key, for parameter initialisation."""
        self.n += 1
        return jax.random.fold_in(self.base, self.n)
