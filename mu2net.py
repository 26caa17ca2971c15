"""The μ2Net+ multitask system and one active-task iteration (paper Section 3, Algorithm 1, Table 1).

A `System` holds components by id and one retained `Model` (path) per task. A model is an ordered tuple of
component ids; a component is shared or owned by *data* (which models list its id), never by object identity.
`task_iteration(system, task, config, key)` is a pure function returning the extended system; μ2Net, μ2Net+ and the
Section 4 baselines are settings of the same functions (`Method`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import augment
import score as sc
import vit

# --- Table 1: the search space as data -----------------------------------------------------------------------

MU_VALUES = tuple(round(0.02 * i, 2) for i in range(1, 16))  # Section 3: multiples of 0.02 in [0.02, 0.3]
_DELTAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)

TABLE1: dict[str, tuple] = {
    "lr": (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    "warmup": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3),
    "momentum": (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99),
    "nesterov": (False, True),
    "crop_area_min": (0.05, 0.5, 0.95, 1.0),
    "crop_aspect_min": (0.5, 0.75, 1.0),
    "flip": (False, True),
    "brightness": _DELTAS,
    "contrast": _DELTAS,
    "saturation": _DELTAS,
    "hue": _DELTAS,
    "quality": _DELTAS,
    "resolution": (224, 384),
}
AUG_KEYS = ("crop_area_min", "crop_aspect_min", "flip", "brightness", "contrast", "saturation", "hue", "quality")
PLUS_DEFAULTS: dict[str, Any] = dict(  # μ2Net+ (method-notes "Search space defaults"): every augmentation off
    lr=0.01, warmup=0.05, momentum=0.9, nesterov=False, crop_area_min=1.0, crop_aspect_min=1.0, flip=False,
    brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, quality=0.0, resolution=384, mu=0.2,
)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Valid values per tunable hyperparameter (order = neighbour order) and the defaults of a fresh model."""

    values: Mapping[str, tuple]
    defaults: Mapping[str, Any]


def search_space(depth: int, resolutions: Sequence[int] = (224, 384), method: str = "plus",
                 resolution: int | None = None) -> SearchSpace:
    """Table 1 for a root of `depth` blocks. `method="plus"`: μ2Net+ (layer removal, both resolutions, image
    quality, learned μ); `"mu2net"`: μ2Net's space (fixed largest resolution, global μ as a hyperparameter);
    `"munet"`: the same with μ constant."""
    values = dict(TABLE1, resolution=tuple(resolutions))
    defaults = dict(PLUS_DEFAULTS, resolution=resolution or max(resolutions), num_layers=depth)
    if method == "plus":
        values["num_layers"] = tuple(range(depth + 1))
    elif method in ("mu2net", "munet"):
        # What Section 3 says μ2Net+ changed: warm-up 0, aspect 1.0, 224 px and image quality are additions, μ
        # was a tuned hyperparameter, and μ2Net's defaults were the mild fine-tuning preprocessing of Steiner et
        # al. (2021) (inception crop and flip) where μ2Net+ turns every augmentation off.
        del values["quality"]
        values |= dict(warmup=values["warmup"][1:], crop_aspect_min=values["crop_aspect_min"][:-1],
                       resolution=(defaults["resolution"],), mu=MU_VALUES)
        defaults |= dict(crop_area_min=0.05, crop_aspect_min=0.75, flip=True)
        if method == "munet":  # muNet (Gesmundo & Dean, 2022a): one global, constant mutation probability
            del values["mu"]
    else:
        raise ValueError(f"search_space: method={method!r}; expected 'plus', 'mu2net' or 'munet'")
    return SearchSpace(values, defaults)


@dataclasses.dataclass(frozen=True)
class Method:
    """How children are made. μ2Net+ is the default; the others are settings, not code paths.

    learned_mu: per-action μ table (μ2Net+ ext. 4) instead of the model's single μ for every action.
    clone: "mu" (Algorithm 1), "all" (full fine-tune), "top:K" (blocks ≥ K trained, below shared frozen),
      "none" (only the forced head / encoder_norm / adapters).
    adapter_dim: > 0 inserts `residual_adapter_{i}` before every block (Section 4 baseline).
    hp_moves: mutate hyperparameters; parents: "any" (Algorithm 1) or "root" (baselines start at the root).
    """

    learned_mu: bool = True
    clone: str = "mu"
    adapter_dim: int = 0
    hp_moves: bool = True
    parents: str = "any"

    def __post_init__(self):
        ok = self.clone in ("mu", "all", "none") or (self.clone.startswith("top:") and self.clone[4:].isdigit())
        if not ok:
            raise ValueError(f"Method.clone={self.clone!r}; expected 'mu', 'all', 'none' or 'top:K'")
        if self.parents not in ("any", "root"):
            raise ValueError(f"Method.parents={self.parents!r}; expected 'any' or 'root'")


METHODS: dict[str, Method] = {
    "mu2net+": Method(),
    "mu2net": Method(learned_mu=False),
    "munet": Method(learned_mu=False),
    "finetune": Method(clone="all", hp_moves=False, parents="root"),
    "adapters": Method(clone="none", adapter_dim=64, hp_moves=False, parents="root"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One task iteration's budget and scoring (Algorithm 1; Section 4 and 5 settings)."""

    space: SearchSpace
    method: Method = Method()
    generations: int = 4
    children: int = 8
    cycles: int = 4
    samples_cap: int = 51_200
    batch_size: int = 16
    s: float = 0.99
    P: float = math.inf
    F: float = math.inf
    eval_batch: int = 256
    split: str = "mask"  # how trainable/frozen is compiled: "mask" | "hybrid" | "partition" (bench/compile.py)


# --- the system --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    """A path: its task, ordered component ids, hyperparameters, μ table, parent and metrics."""

    id: str
    task: str
    components: tuple[str, ...]
    hp: Mapping[str, Any]
    mu: Mapping[str, float]
    parent: str | None
    metrics: Mapping[str, float]


ROOT = "root"


@dataclasses.dataclass(frozen=True)
class System:
    """Components by id (parameters and bfloat16 momentum), the retained model of every task, the root (pinned:
    its components are never trained or collected) and the lineage of retained models (for ancestor look-ups)."""

    cfg: vit.Config
    params: Mapping[str, eqx.Module]
    momentum: Mapping[str, eqx.Module]
    models: Mapping[str, Model]
    root: Model
    lineage: Mapping[str, tuple[str | None, tuple[str, ...]]]  # model id -> (parent id, component ids)
    counter: int = 0

    def component_ids(self) -> set[str]:
        return {c for m in (self.root, *self.models.values()) for c in m.components}


def kind(cid: str) -> str:
    """Component name of an id: 'encoderblock_3:17' -> 'encoderblock_3'."""
    return cid.rsplit(":", 1)[0]


def zeros_like_bf16(tree: eqx.Module) -> eqx.Module:
    """A zero bfloat16 momentum for a component (built on the host: no compile per shape)."""
    return jax.tree.map(lambda a: jnp.asarray(np.zeros(a.shape, jnp.bfloat16)), tree)


def new_system(cfg: vit.Config, root: Mapping[str, eqx.Module], hp: Mapping[str, Any]) -> System:
    """A system holding only the root model (e.g. an AugReg checkpoint or a random init), momentum zero."""
    ids = tuple(f"{name}:{i}" for i, name in enumerate(root))
    params = {cid: root[kind(cid)] for cid in ids}
    model = Model(ROOT, ROOT, ids, dict(hp), {}, None, {})
    return System(cfg, params, {c: zeros_like_bf16(p) for c, p in params.items()}, {}, model,
                  {ROOT: (None, ids)}, len(ids))


def sharers(system: System, task: str) -> dict[str, int]:
    """#models(p) of eq. 2: for each component, the retained models of tasks other than `task` using it."""
    n: dict[str, int] = {}
    for m in system.models.values():
        if m.task != task:
            for c in set(m.components):
                n[c] = n.get(c, 0) + 1
    return n


def model_size(params: Mapping[str, eqx.Module], model: Model, shares: Mapping[str, int]) -> float:
    """#accounted-params of eq. 2."""
    ids = model.components
    return sc.accounted_params([sc.param_count(params[c]) for c in ids], [shares.get(c, 0) for c in ids])


def model_flops(cfg: vit.Config, params: Mapping[str, eqx.Module], model: Model) -> int:
    """#flops of eq. 1: one image's forward pass at the model's depth, resolution, adapter and head widths."""
    ids = model.components
    depth = sum(kind(c).startswith("encoderblock_") for c in ids)
    adapter = next((params[c].Dense_0.kernel.shape[1] for c in ids if kind(c).startswith("residual_adapter_")), 0)
    classes = next(params[c].bias.shape[0] for c in ids if kind(c) == "head")
    return sc.flops(cfg, depth, int(model.hp["resolution"]), classes, adapter)


def accounted_params(system: System, model: Model) -> float:
    return model_size(system.params, model, sharers(system, model.task))


# --- mutations (Section 3, method-notes "Mutations") ---------------------------------------------------------


class Sampler:
    """The random decisions of one child (or one parent draw) in a fixed order, from a numpy generator seeded by
    the bits of an explicit jax key: host-side choices then cost no device round trip and no compile."""

    def __init__(self, key: jax.Array):
        self.base, self.n = key, 0
        self.rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def uniform(self) -> float:
        return float(self.rng.random())

    def key(self) -> jax.Array:
        """A fresh jax key, for parameter initialisation."""
        self.n += 1
        return jax.random.fold_in(self.base, self.n)


def neighbour(values: tuple, value: Any, rng: Sampler) -> Any:
    """One step ±1 (probability ½ each) in the list of valid values, clamped at the ends."""
    i = nearest(values, value)
    return values[min(max(i + (1 if rng.uniform() < 0.5 else -1), 0), len(values) - 1)]


def nearest(values: tuple, value: Any) -> int:
    if value in values:
        return values.index(value)
    return int(np.argmin([abs(float(v) - float(value)) for v in values]))


def query(action: str, hp: Mapping[str, Any], mu: dict[str, float], learned: bool, rng: Sampler) -> bool:
    """Whether mutation `action` fires (Algorithm 1 line 20). Learned μ (μ2Net+): the table entry starts at the
    model's μ, first moves ±1 step with probability μ, is stored in the child, then fires if it beats U(0,1)."""
    if not learned:
        return hp["mu"] > rng.uniform()
    value = mu.get(action, hp["mu"])
    if hp["mu"] > rng.uniform():
        value = neighbour(MU_VALUES, value, rng)
    mu[action] = value
    return value > rng.uniform()


@dataclasses.dataclass(frozen=True)
class Child:
    """An untrained child: its model (fresh id), which positions train, and the new components it owns."""

    model: Model
    trainable: tuple[bool, ...]
    new: Mapping[str, tuple[eqx.Module, eqx.Module]]  # id -> (params, momentum) of cloned / fresh components
    threshold: float


@dataclasses.dataclass(frozen=True)
class Pool:
    """What a task iteration can read: the system plus the active population's own components and lineage."""

    system: System
    params: Mapping[str, eqx.Module]
    momentum: Mapping[str, eqx.Module]
    lineage: Mapping[str, tuple[str | None, tuple[str, ...]]]

    def ancestors(self, model: Model) -> Iterator[tuple[str, ...]]:
        """The component ids of `model`, then of its parent, and so on up to the root."""
        yield model.components
        mid = model.parent
        while mid is not None and mid in self.lineage:
            mid, comps = self.lineage[mid]
            yield comps
        yield self.system.root.components

    def find(self, model: Model, name: str, ok: Callable[[eqx.Module], bool] = lambda p: True) -> str | None:
        """Nearest surviving component called `name` on the path from `model` up to the root."""
        for comps in self.ancestors(model):
            for c in comps:
                if kind(c) == name and c in self.params and ok(self.params[c]):
                    return c
        return None


def layers(pool: Pool, parent: Model, n: int) -> list[str]:
    """The child's n blocks: the parent's, cut from the top (layer removal), or extended with block i taken
    from the nearest ancestor that still has it, ultimately the root (re-adding)."""
    blocks = [c for c in parent.components if kind(c).startswith("encoderblock_")]
    blocks += [pool.find(parent, f"encoderblock_{i}") for i in range(len(blocks), n)]
    if None in blocks:
        raise ValueError(f"no ancestor of {parent.id!r} has encoderblock_{blocks.index(None)}")
    return blocks[:n]


def frozen_ids(system: System, task: str) -> set[str]:
    """Components locked by the root or by a retained model of another task: a child may only share them frozen.
    Everything else reachable was trained for `task` in progress and is always cloned (method-notes)."""
    return set(system.root.components) | set(sharers(system, task))


def mutate_hparams(parent: Model, space: SearchSpace, method: Method, rng: Sampler) -> tuple[dict, dict]:
    """Hyperparameter moves (Section 3): each hyperparameter moves to a neighbouring value when its action fires.
    μ goes first: in μ2Net it is itself a hyperparameter and sets the rate of the others."""
    hp = dict(space.defaults) | dict(parent.hp)
    mu = dict(parent.mu) if method.learned_mu else {}
    if method.hp_moves:
        for name in sorted(space.values, key=lambda n: n != "mu"):
            if query(f"hp:{name}", hp, mu, method.learned_mu, rng):
                hp[name] = neighbour(space.values[name], hp[name], rng)
    return hp, mu


def clones(name: str, cid: str, locked: set[str], method: Method, hp: Mapping[str, Any], mu: dict[str, float],
           rng: Sampler) -> bool:
    """Whether the child trains a copy of component `cid` rather than sharing it frozen."""
    if name == "head" or name.startswith("residual_adapter_") or cid not in locked:
        return True  # make-trainable-head, the adapters of the baseline, or being trained for this task
    if name == "encoder_norm":
        return method.clone != "none"  # forced in μ2Net+; the adapter baseline freezes all but adapters and head
    if method.clone == "mu":
        return query(f"clone:{name}", hp, mu, method.learned_mu, rng)
    if method.clone.startswith("top:"):
        i = vit.block_index(name)
        return i is not None and i >= int(method.clone[4:])
    return method.clone == "all"


def make_child(pool: Pool, parent: Model, task: str, num_classes: int, config: Config, key: jax.Array,
               child_id: str, counter: int, parent_score: float) -> tuple[Child, int]:
    """Algorithm 1 lines 17–24: sample the mutations Δ of `parent` and apply them. Returns the child and the
    advanced id counter (fresh component ids are `name:counter`)."""
    system, method, cfg = pool.system, config.method, pool.system.cfg
    rng = Sampler(key)
    hp, mu = mutate_hparams(parent, config.space, method, rng)
    have = {kind(c): c for c in parent.components}
    # Layer removal / re-adding: num_layers moves one step; a re-added block comes from the nearest ancestor.
    depth = sum(n.startswith("encoderblock_") for n in have)
    hp["num_layers"] = int(hp.get("num_layers", depth))
    blocks = layers(pool, parent, hp["num_layers"])
    # Resolution: the position embedding of the nearest ancestor with that size, else (None) the root's resampled.
    res = int(hp["resolution"])
    size = 1 + vit.grid(res, cfg.patch) ** 2
    pe = pool.find(parent, "posembed_input", lambda p: p.pos_embedding.shape[1] == size)

    # The child's components in order, each with the id it starts from (None: fresh parameters).
    slots: list[tuple[str, str | None]] = [("embedding", have["embedding"]), ("cls", have["cls"]),
                                           ("posembed_input", pe)]
    for i, b in enumerate(blocks):
        if method.adapter_dim:
            slots.append((f"residual_adapter_{i}", pool.find(parent, f"residual_adapter_{i}")))
        slots.append((f"encoderblock_{i}", b))
    slots += [("encoder_norm", have["encoder_norm"]), ("head", have["head"] if parent.task == task else None)]

    locked = frozen_ids(system, task)
    out, trainable, fresh = [], [], {}
    for name, src in slots:
        if src is not None and not clones(name, src, locked, method, hp, mu, rng):
            out.append(src), trainable.append(False)
            continue
        counter += 1
        cid = f"{name}:{counter}"
        if src is not None:  # a clone carries the parameters and their momentum
            mom = pool.momentum.get(src)
            fresh[cid] = (pool.params[src], zeros_like_bf16(pool.params[src]) if mom is None else mom)
        else:
            p = (vit.init_head(cfg, num_classes) if name == "head"
                 else vit.init_adapter(cfg, rng.key(), method.adapter_dim) if name.startswith("residual_adapter_")
                 else vit.resample_posembed(pool.params[pool.find(system.root, name)], res, cfg.patch))
            fresh[cid] = (p, zeros_like_bf16(p))
        out.append(cid), trainable.append(True)

    model = Model(child_id, task, tuple(out), hp, mu, parent.id, {})
    threshold = parent_score if parent.task == task else -math.inf
    return Child(model, tuple(trainable), fresh, threshold), counter


def sample_parent(active: Sequence[Model], scores: Mapping[str, float], others: Sequence[Model],
                  selections: Mapping[str, int], key: jax.Array) -> Model:
    """Algorithm 1 lines 7–16: walk the active population best-first, then the other models in random order;
    accept a candidate with probability 0.5^#selections; if none is accepted, pick uniformly from all."""
    rng = Sampler(key)
    ranked = sorted(active, key=lambda m: -scores[m.id])
    candidates = ranked + [others[i] for i in rng.rng.permutation(len(others))]
    for m in candidates:
        if 0.5 ** selections.get(m.id, 0) > rng.uniform():
            return m
    return candidates[int(rng.rng.integers(len(candidates)))]


# --- training one child (method-notes "Training one child") --------------------------------------------------


class HParams(eqx.Module):
    """Optimizer and preprocessing hyperparameters as traced scalars, so a new value never recompiles."""

    lr: jax.Array
    warmup: jax.Array
    momentum: jax.Array
    nesterov: jax.Array
    aug: augment.Aug

    @staticmethod
    def of(hp: Mapping[str, Any]) -> HParams:
        f = lambda v: jnp.asarray(float(v), jnp.float32)  # noqa: E731
        return HParams(f(hp["lr"]), f(hp["warmup"]), f(hp["momentum"]), f(hp["nesterov"]),
                       augment.Aug.from_hparams({k: hp[k] for k in AUG_KEYS}))


def learning_rate(step: jax.Array, total: jax.Array, hp: HParams) -> jax.Array:
    """Linear warm-up from lr/1000 to lr over warmup·T steps, then cosine decay to 0 at T."""
    t, total = step.astype(jnp.float32), total.astype(jnp.float32)
    w = hp.warmup * total
    warm = hp.lr / 1000 + (hp.lr - hp.lr / 1000) * t / jnp.maximum(w, 1.0)
    frac = jnp.clip((t - w) / jnp.maximum(total - w, 1.0), 0.0, 1.0)
    return jnp.where(t < w, warm, 0.5 * hp.lr * (1 + jnp.cos(jnp.pi * frac)))


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


def logits(components, images: jax.Array, num_classes: jax.Array) -> jax.Array:
    """Forward pass; the padded head columns (index ≥ num_classes) get −1e30, so their softmax weight and
    gradients are exactly zero and the padding never changes what is learned."""
    z = vit.forward(components, images)
    return jnp.where(jnp.arange(z.shape[-1])[None, :] < num_classes, z, -1e30)


# Compiled on its own (once per batch shape and resolution) rather than inside `train_step`: it costs as much to
# compile as a tiny ViT's forward and backward, and every architecture would otherwise pay for it again.
@functools.partial(jax.jit, static_argnums=4)
def preprocess(key: jax.Array, step: jax.Array, x: jax.Array, aug: augment.Aug, res: int) -> jax.Array:
    return augment.train_preprocess(jax.random.fold_in(key, step), x, aug, res)


@eqx.filter_jit
def train_step(diff, frozen, mom, mask, x, y, hp: HParams, step, total, k):
    """One SGD step on the trainable half: clip by global norm 1.0, momentum kept in bfloat16 (Nesterov traced)."""

    def loss_fn(d):
        z = logits(eqx.combine(d, frozen), x, k)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    loss, g = eqx.filter_value_and_grad(loss_fn)(diff)
    g = tuple(jax.tree.map(lambda a: a * mask[i], gi) for i, gi in enumerate(g))
    flat, unravel = jax.flatten_util.ravel_pytree(g)  # one flat norm compiles faster than a per-leaf tree of sums
    g = unravel(flat * jnp.minimum(1.0, 1.0 / (jnp.linalg.norm(flat) + 1e-12)))
    m = jax.tree.map(lambda mi, gi: (hp.momentum * mi.astype(jnp.float32) + gi), mom, g)
    u = jax.tree.map(lambda mi, gi: jnp.where(hp.nesterov > 0, hp.momentum * mi + gi, mi), m, g)
    lr = learning_rate(step, total, hp)
    diff = jax.tree.map(lambda p, ui: p - lr * ui, diff, u)
    return diff, jax.tree.map(lambda a: a.astype(jnp.bfloat16), m), loss


@eqx.filter_jit
def correct(components, x, y, k, res: int) -> jax.Array:
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

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def accuracy(components: Sequence[eqx.Module], task: TaskData, split: str, res: int, batch: int,
             device: jax.Device | None = None) -> float:
    """Top-1 accuracy on a split (validation: the fixed subset; test: the whole split)."""
    *body, head = components
    comps = jax.device_put((*body, pad_head(head, padded_classes(task.num_classes))), device)
    k = jax.device_put(jnp.asarray(task.num_classes, jnp.int32), device)
    n, hits = 0, jnp.zeros((), jnp.int32)
    for x, y in task.eval_batches(split, batch):
        hits = hits + correct(comps, jax.device_put(x, device), jax.device_put(y, device), k, res)  # no sync
        n += int((y >= 0).sum())
    return int(hits) / max(n, 1)


def split(components: tuple, momentum: tuple, trainable: tuple[bool, ...], how: str):
    """Trainable/frozen halves for `train_step`, the matching momentum and the per-component gradient mask.

    "partition": only trainable arrays are differentiated (one compile per trainable pattern); "mask": all are
    differentiated and frozen gradients zeroed (one compile per architecture); "hybrid": the frozen prefix below
    the lowest trainable component is cut off (no backward there), the rest is masked.
    """
    if how == "partition":
        spec = trainable
    elif how == "mask":
        spec = (True,) * len(trainable)
    elif how == "hybrid":
        first = trainable.index(True)
        spec = tuple(i >= first for i in range(len(trainable)))
    else:
        raise ValueError(f"Config.split={how!r}; expected 'mask', 'hybrid' or 'partition'")
    diff, frozen = eqx.partition(components, spec)
    mom, _ = eqx.partition(momentum, spec)
    return diff, frozen, mom, jnp.asarray(trainable, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A child's best kept snapshot (Algorithm 1 line 29), or None when no cycle reached its threshold."""

    model: Model
    params: Mapping[str, eqx.Module]
    momentum: Mapping[str, eqx.Module]
    score: float


def train_child(pool: Pool, child: Child, task: TaskData, config: Config, key: jax.Array,
                device: jax.Device | None = None, log: Callable[[dict], None] | None = None) -> Trained | None:
    """Algorithm 1 lines 26–32: #cycles cycles of min(1 epoch, samples cap), validate after each, keep the best
    snapshot whose score is at least the running threshold."""
    model, ids = child.model, child.model.components
    params = {**pool.params, **{c: p for c, (p, _) in child.new.items()}}
    kpad = padded_classes(task.num_classes)
    comps = tuple(params[c] for c in ids[:-1]) + (pad_head(params[ids[-1]], kpad),)
    mom = tuple(child.new[c][1] if c in child.new else zeros_like_bf16(p) for c, p in zip(ids, comps))
    mom = mom[:-1] + (pad_head(mom[-1], kpad),)
    diff, frozen, mom, mask = split(comps, mom, child.trainable, config.split)
    diff, frozen, mom, mask = jax.device_put((diff, frozen, mom, mask), device)
    hp = jax.device_put(HParams.of(model.hp), device)
    res = int(model.hp["resolution"])
    steps = max(1, min(task.num_train, config.samples_cap) // config.batch_size)
    total, ncls = jax.device_put((jnp.asarray(config.cycles * steps, jnp.int32),
                                  jnp.asarray(task.num_classes, jnp.int32)), device)
    k_data, key = jax.device_put(jax.random.split(key), device)  # data order's seed; augmentation keys' base
    seed = int(Sampler(k_data).rng.integers(2**31 - 1))
    shares = sharers(pool.system, task.name)
    size = model_size(params, model, shares)
    flops = model_flops(pool.system.cfg, params, model)
    threshold, best = child.threshold, None
    t = 0
    for cycle in range(config.cycles):
        for _ in range(steps):
            x, y = task.train_batch(seed, t, config.batch_size)
            x, y, step = jax.device_put((x, y, np.int32(t)), device)
            x = preprocess(key, step, x, hp.aug, res)
            diff, mom, loss = train_step(diff, frozen, mom, mask, x, y, hp, step, total, ncls)
            t += 1
        trained = eqx.combine(diff, frozen)
        trained = trained[:-1] + (unpad_head(trained[-1], task.num_classes),)
        q = accuracy(trained, task, "validation", res, config.eval_batch, device)
        s = sc.score(q, size, flops, config.s, config.P, config.F)
        if log:
            log(dict(event="cycle", child=model.id, cycle=cycle, loss=float(loss), quality=q, score=s))
        if s >= threshold:
            threshold = s
            m = mom[:-1] + (unpad_head(mom[-1], task.num_classes),)
            snap = {c: (trained[i], m[i]) for i, c in enumerate(ids) if child.trainable[i]}
            best = (snap, q, s)
    if best is None:
        return None
    snap, q, s = best
    on_host = jax.device_put(snap, jax.devices("cpu")[0])
    metrics = dict(quality=q, score=s, params=size, flops=flops)
    return Trained(dataclasses.replace(model, metrics=metrics), {c: p for c, (p, _) in on_host.items()},
                   {c: m for c, (_, m) in on_host.items()}, s)


# --- one task iteration (Algorithm 1) ------------------------------------------------------------------------


def model_score(system: System, model: Model, config: Config) -> float:
    """Eq. 1 for a retained model in the current system (sharing may have changed since it was trained)."""
    q = model.metrics.get("quality", 0.0)
    return sc.score(q, accounted_params(system, model), model_flops(system.cfg, system.params, model),
                    config.s, config.P, config.F)


def task_iteration(system: System, task: TaskData, config: Config, key: jax.Array,
                   log: Callable[[dict], None] | None = None, devices: Sequence[jax.Device] | None = None) -> System:
    """One active-task iteration (Algorithm 1) as a pure function: #generations × #children children, each
    trained on its own device when several exist; only the task's best model is kept, and every component no
    retained model (nor the root) uses is dropped. Children of one generation are sampled from the population at
    the generation's start, so the result does not depend on how many devices train them."""
    t = task.name
    devices = list(devices or jax.local_devices())
    incumbent = system.models.get(t)
    if incumbent is not None and incumbent.hp.get("resolution") is None:
        raise ValueError(f"model of task {t!r} has no resolution hyperparameter")
    active: list[Model] = [incumbent] if incumbent else []
    scores = {m.id: model_score(system, m, config) for m in active}
    others = sorted((m for m in system.models.values() if m.task != t), key=lambda m: m.task) + [system.root]
    pool_params, pool_mom = dict(system.params), dict(system.momentum)
    lineage = dict(system.lineage)
    counter, selections = system.counter, {}
    for gen in range(config.generations):
        kg = jax.random.fold_in(key, gen)
        pool = Pool(system, pool_params, pool_mom, lineage)
        children = []
        for i in range(config.children):
            kp, kc, kt = jax.random.split(jax.random.fold_in(kg, i), 3)
            parent = (system.root if config.method.parents == "root"
                      else sample_parent(active, scores, others, selections, kp))
            selections[parent.id] = selections.get(parent.id, 0) + 1
            child_id = f"{t}/{counter}"
            child, counter = make_child(pool, parent, t, task.num_classes, config, kc, child_id, counter,
                                        scores.get(parent.id, -math.inf))
            counter += 1
            children.append((child, kt))
            if log:
                log(dict(event="child", task=t, generation=gen, child=child_id, parent=parent.id,
                         trainable=sum(child.trainable), hp=dict(child.model.hp)))
        results = _train_all(pool, children, task, config, devices, log)
        for r in results:
            if r is None:
                continue
            active.append(r.model)
            scores[r.model.id] = r.score
            pool_params.update(r.params)
            pool_mom.update(r.momentum)
            lineage[r.model.id] = (r.model.parent, r.model.components)
        if log:
            log(dict(event="generation", task=t, generation=gen, retained=sum(r is not None for r in results),
                     best=max(scores.values(), default=None)))
    if not active:
        return dataclasses.replace(system, counter=counter)
    best = max(active, key=lambda m: scores[m.id])
    test = accuracy([pool_params[c] for c in best.components], task, "test", int(best.hp["resolution"]),
                    config.eval_batch, devices[0])  # placed like validation's inputs: the same compiled function
    best = dataclasses.replace(best, metrics={**best.metrics, "score": scores[best.id], "test": test})
    models = {**system.models, t: best}
    return collect(dataclasses.replace(system, models=models, counter=counter), pool_params, pool_mom, lineage)


def _train_all(pool: Pool, children: list[tuple[Child, jax.Array]], task: TaskData, config: Config,
               devices: Sequence[jax.Device], log) -> list[Trained | None]:
    """Trains a generation's children, one per local device at a time (the paper's one child per TPU core): one
    thread per device trains children d, d + n, d + 2n, ... in turn, so no device ever holds two children."""
    n = len(devices)

    def worker(d: int) -> list[Trained | None]:
        return [train_child(pool, c, task, config, k, devices[d], log) for c, k in children[d::n]]

    if n == 1:
        return worker(0)
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        done = list(ex.map(worker, range(n)))
    return [done[i % n][i // n] for i in range(len(children))]


def collect(system: System, params: Mapping[str, eqx.Module], momentum: Mapping[str, eqx.Module],
            lineage: Mapping[str, tuple[str | None, tuple[str, ...]]]) -> System:
    """Keeps the components some retained model or the root uses, and the lineage of retained models."""
    used = system.component_ids()
    keep_lineage = {}
    for m in (system.root, *system.models.values()):
        mid = m.id
        while mid is not None and mid in lineage and mid not in keep_lineage:
            keep_lineage[mid] = lineage[mid]
            mid = lineage[mid][0]
    return dataclasses.replace(
        system,
        params={c: params[c] for c in sorted(used, key=_order)},
        momentum={c: momentum[c] for c in sorted(used, key=_order)},
        lineage=dict(sorted(keep_lineage.items())),
    )


def _order(cid: str) -> tuple[int, str]:
    return int(cid.rsplit(":", 1)[1]), cid


def identical(a: System, b: System) -> bool:
    """Bit-for-bit equality of two systems: models, lineage, counter, and every parameter and momentum array."""
    if (a.cfg, a.models, a.root, a.lineage, a.counter) != (b.cfg, b.models, b.root, b.lineage, b.counter):
        return False
    if list(a.params) != list(b.params) or list(a.momentum) != list(b.momentum):
        return False
    same = lambda x, y: (x.dtype, x.shape) == (y.dtype, y.shape) and (  # noqa: E731
        np.asarray(x).tobytes() == np.asarray(y).tobytes())
    trees = [(a.params, b.params), (a.momentum, b.momentum)]
    return all(jax.tree.structure(x[k]) == jax.tree.structure(y[k]) and
               all(map(same, jax.tree.leaves(x[k]), jax.tree.leaves(y[k]))) for x, y in trees for k in x)


def assemble(system: System, model: Model) -> list[eqx.Module]:
    """A model's components by id lookup, in order, ready for `vit.forward`."""
    return [system.params[c] for c in model.components]


class Compiles:
    """Counts XLA compiles and their seconds while active (`with Compiles() as c: ...; c.count, c.seconds`)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds, self.names = 0, 0.0, []

    def _on(self, event: str, duration: float, **kw) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration
            self.names.append(kw.get("fun_name", "?"))

    def __enter__(self) -> Compiles:
        jax.monitoring.register_event_duration_secs_listener(self._on)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on)
