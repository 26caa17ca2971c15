"""The μ2Net+ multitask system and one active-task iteration (paper Section 3, Algorithm 1, Table 1).

A `System` holds components by id and one retained `Model` (path) per task. A model is an ordered tuple of
component ids; a component is shared or owned by *data* (which models list its id), never by object identity.
`task_iteration(system, task, config, key)` is a pure function returning the extended system; read it beside
Algorithm 1, whose line numbers it carries. μ2Net, μ2Net+, muNet and the Section 4 baselines are settings of the
same functions (`Method`, `METHODS`). Training one child lives in train.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

import score as sc
import train
import vit
from train import TaskData, zeros_like_bf16

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
PLUS_DEFAULTS: dict[str, Any] = dict(  # μ2Net+ (method-notes "Search space defaults"): every augmentation off
    lr=0.01, warmup=0.05, momentum=0.9, nesterov=False, crop_area_min=1.0, crop_aspect_min=1.0, flip=False,
    brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, quality=0.0, resolution=384, mu=0.2,
)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Valid values per tunable hyperparameter (order = neighbour order) and the defaults of a fresh model."""

    values: Mapping[str, tuple]
    defaults: Mapping[str, Any]


SPACES = ("plus", "mu2net", "munet")


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
    """How children are made: one complete setting per method, as big_vision's `decode_variant` gives a model's
    settings from its name. μ2Net+ is the default; the others are settings, not code paths.

    space: the Table 1 variant of `search_space` ("plus": μ2Net+, "mu2net", "munet").
    learned_mu: per-action μ table (μ2Net+ ext. 4) instead of the model's single μ for every action.
    clone: "mu" (Algorithm 1), "all" (full fine-tune), "top:K" (blocks ≥ K trained, below shared frozen),
      "none" (only the forced head / encoder_norm / adapters).
    adapter_dim: > 0 inserts `residual_adapter_{i}` before every block (Section 4 baseline).
    hp_moves: mutate hyperparameters; parents: "any" (Algorithm 1) or "root" (baselines start at the root).
    """

    space: str = "plus"
    learned_mu: bool = True
    clone: str = "mu"
    adapter_dim: int = 0
    hp_moves: bool = True
    parents: str = "any"

    def __post_init__(self):
        ok = self.clone in ("mu", "all", "none") or (self.clone.startswith("top:") and self.clone[4:].isdigit())
        if not ok:
            raise ValueError(f"Method.clone = {self.clone!r}: expected 'mu', 'all', 'none' or 'top:K'")
        if self.parents not in ("any", "root"):
            raise ValueError(f"Method.parents = {self.parents!r}: expected 'any' or 'root'")
        if self.space not in SPACES:
            raise ValueError(f"Method.space = {self.space!r}: expected one of {list(SPACES)}")
        if self.adapter_dim < 0:
            raise ValueError(f"Method.adapter_dim = {self.adapter_dim!r}: expected an integer ≥ 0")


METHODS: dict[str, Method] = {
    "mu2net+": Method(),
    "mu2net": Method(space="mu2net", learned_mu=False),
    "munet": Method(space="munet", learned_mu=False),
    "finetune": Method(clone="all", hp_moves=False, parents="root"),
    "adapters": Method(clone="none", adapter_dim=64, hp_moves=False, parents="root"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget(train.Budget):
    """Algorithm 1's meta-parameters (#generations, #child-models) and eq. 1's s, P, F, over one child's budget;
    and how many alike children of a generation train as one vectorised program."""

    generations: int = train.at_least_one(4)
    children: int = train.at_least_one(8)
    s: float = train._check(lambda v: 0 < v <= 1, "a number in (0, 1]", 0.99)
    P: float = train._check(lambda v: v > 0, "a number > 0 (inf = no penalty)", math.inf)
    F: float = train._check(lambda v: v > 0, "a number > 0 (inf = no penalty)", math.inf)
    # Children of a generation that share an architecture train as one vectorised program, at most this many
    # together (a power of two; 1: one by one). Not bit-identical to one by one, but a pure function of the key
    # for any device count. bench/child.py measures whether it pays on a device: on a CPU it does not (README).
    vectorise: int = train._check(lambda v: v >= 1 and v & (v - 1) == 0, "a power of two ≥ 1", 1)


@dataclasses.dataclass(frozen=True)
class Config(Budget):
    """One task iteration's settings: the search space, the method and the budget (Sections 4 and 5)."""

    space: SearchSpace
    method: Method = Method()


def config(method: str | Method, depth: int, resolutions: Sequence[int], resolution: int | None = None,
           values: Mapping[str, Sequence] | None = None, defaults: Mapping[str, Any] | None = None,
           **budget: Any) -> Config:
    """A complete `Config` from a method name (or `Method`), the root's depth and resolutions, search-space
    overrides and budget fields (`Budget`'s names)."""
    m = METHODS[method] if isinstance(method, str) else method
    space = search_space(depth, resolutions, m.space, resolution)
    space = SearchSpace(dict(space.values) | {k: tuple(v) for k, v in (values or {}).items()},
                        dict(space.defaults) | dict(defaults or {}))
    return Config(space, m, **budget)


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


# Ids: a component is `<name>:<n>` and a model `<task>/<n>`, n from the system's one counter.


def component_id(name: str, n: int) -> str:
    return f"{name}:{n}"


def kind(cid: str) -> str:
    """Component name of an id: 'encoderblock_3:17' -> 'encoderblock_3'."""
    return cid.rsplit(":", 1)[0]


def id_number(cid: str) -> int:
    return int(cid.rsplit(":", 1)[1])


def model_id(task: str, n: int) -> str:
    return f"{task}/{n}"


def task_of(mid: str) -> str:
    """Task of a model id: 'mnist5k/parity/238' -> 'mnist5k/parity' (task names may contain '/')."""
    return mid if mid == ROOT else mid.rsplit("/", 1)[0]


def new_system(cfg: vit.Config, root: Mapping[str, eqx.Module], hp: Mapping[str, Any]) -> System:
    """A system holding only the root model (e.g. an AugReg checkpoint or a random init), momentum zero."""
    ids = tuple(component_id(name, i) for i, name in enumerate(root))
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
    depth = sum(vit.is_block(kind(c)) for c in ids)
    adapter = next((params[c].Dense_0.kernel.shape[1] for c in ids if vit.is_adapter(kind(c))), 0)
    classes = next(params[c].bias.shape[0] for c in ids if kind(c) == "head")
    return sc.flops(cfg, depth, int(model.hp["resolution"]), classes, adapter)


def accounted_params(system: System, model: Model) -> float:
    return model_size(system.params, model, sharers(system, model.task))


def model_score(system: System, model: Model, config: Config) -> float:
    """Eq. 1 for a retained model in the current system (sharing may have changed since it was trained)."""
    q = model.metrics.get("quality", 0.0)
    return sc.score(q, accounted_params(system, model), model_flops(system.cfg, system.params, model),
                    config.s, config.P, config.F)


def assemble(system: System, model: Model) -> list[eqx.Module]:
    """A model's components by id lookup, in order, ready for `vit.forward`."""
    return [system.params[c] for c in model.components]


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


# --- the active population ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trained:
    """A retained child (Algorithm 1 line 30): its model with metrics, the components it trained and its score."""

    model: Model
    params: Mapping[str, eqx.Module]
    momentum: Mapping[str, eqx.Module]
    score: float


@dataclasses.dataclass(frozen=True)
class Pool:
    """What a task iteration reads: the system, and the active population 𝒜 of Algorithm 1 (the task's models,
    their scores, and the components and lineage they add to the system's)."""

    system: System
    params: Mapping[str, eqx.Module]
    momentum: Mapping[str, eqx.Module]
    lineage: Mapping[str, tuple[str | None, tuple[str, ...]]]
    models: tuple[Model, ...] = ()
    scores: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @staticmethod
    def of(system: System, task: str, config: Config) -> Pool:
        """Alg. 1 line 3: 𝒜 ← the models trained on the task, i.e. its retained model, scored in today's system."""
        m = system.models.get(task)
        if m is not None and m.hp.get("resolution") is None:
            raise ValueError(f"model of task {task!r} has no resolution hyperparameter")
        active = (m,) if m else ()
        return Pool(system, system.params, system.momentum, system.lineage, active,
                    {a.id: model_score(system, a, config) for a in active})

    def add(self, t: Trained) -> Pool:
        """Alg. 1 line 34: 𝒜 ← 𝒜 ∪ {c}."""
        return dataclasses.replace(
            self, models=self.models + (t.model,), scores={**self.scores, t.model.id: t.score},
            params={**self.params, **t.params}, momentum={**self.momentum, **t.momentum},
            lineage={**self.lineage, t.model.id: (t.model.parent, t.model.components)})

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


def collect(system: System, pool: Pool) -> System:
    """Keeps the components some retained model or the root uses, and the lineage of retained models."""
    used = system.component_ids()
    keep_lineage = {}
    for m in (system.root, *system.models.values()):
        mid = m.id
        while mid is not None and mid in pool.lineage and mid not in keep_lineage:
            keep_lineage[mid] = pool.lineage[mid]
            mid = pool.lineage[mid][0]
    order = sorted(used, key=lambda c: (id_number(c), c))
    return dataclasses.replace(system, params={c: pool.params[c] for c in order},
                               momentum={c: pool.momentum[c] for c in order},
                               lineage=dict(sorted(keep_lineage.items())))


# --- sampling a parent and mutating it (Section 3, method-notes "Parent sampling", "Mutations") -------------


class Sampler:
    """The random decisions of one child (or one parent draw) in a fixed order, from a numpy generator seeded by
    the bits of an explicit jax key (`train.seed_of`)."""

    def __init__(self, key: jax.Array):
        self.base, self.n = key, 0
        self.rng = train.seed_of(key)

    def uniform(self) -> float:
        return float(self.rng.random())

    def key(self) -> jax.Array:
        """A fresh jax key, for parameter initialisation."""
        self.n += 1
        return jax.random.fold_in(self.base, self.n)


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


def layers(pool: Pool, parent: Model, n: int) -> list[str]:
    """The child's n blocks: the parent's, cut from the top (layer removal), or extended with block i taken
    from the nearest ancestor that still has it, ultimately the root (re-adding)."""
    blocks = [c for c in parent.components if vit.is_block(kind(c))]
    blocks += [pool.find(parent, vit.block(i)) for i in range(len(blocks), n)]
    if None in blocks:
        raise ValueError(f"no ancestor of {parent.id!r} has {vit.block(blocks.index(None))}")
    return blocks[:n]


def frozen_ids(system: System, task: str) -> set[str]:
    """Components locked by the root or by a retained model of another task: a child may only share them frozen.
    Everything else reachable was trained for `task` in progress and is always cloned (method-notes)."""
    return set(system.root.components) | set(sharers(system, task))


def clones(name: str, cid: str, locked: set[str], method: Method, hp: Mapping[str, Any], mu: dict[str, float],
           rng: Sampler) -> bool:
    """Whether the child trains a copy of component `cid` rather than sharing it frozen."""
    if name == "head" or vit.is_adapter(name) or cid not in locked:
        return True  # make-trainable-head, the adapters of the baseline, or being trained for this task
    if name == "encoder_norm":
        return method.clone != "none"  # forced in μ2Net+; the adapter baseline freezes all but adapters and head
    if method.clone == "mu":
        return query(f"clone:{name}", hp, mu, method.learned_mu, rng)
    if method.clone.startswith("top:"):
        i = vit.block_index(name)
        return i is not None and i >= int(method.clone[4:])
    return method.clone == "all"


@dataclasses.dataclass(frozen=True)
class Child:
    """An untrained child c₀: its model (fresh id), which positions train, and the new components it owns."""

    model: Model
    trainable: tuple[bool, ...]
    new: Mapping[str, tuple[eqx.Module, eqx.Module]]  # id -> (params, momentum) of cloned / fresh components


def make_child(pool: Pool, parent: Model, task: str, num_classes: int, config: Config, key: jax.Array,
               counter: int) -> tuple[Child, int]:
    """Algorithm 1 lines 17–24: sample the mutations Δ of `parent` and apply them. The child's model id and
    every fresh component id are drawn from `counter`; returns the child and the advanced counter."""
    system, method, cfg = pool.system, config.method, pool.system.cfg
    child_id = model_id(task, counter)
    rng = Sampler(key)
    hp, mu = mutate_hparams(parent, config.space, method, rng)
    have = {kind(c): c for c in parent.components}
    # Layer removal / re-adding: num_layers moves one step; a re-added block comes from the nearest ancestor.
    hp["num_layers"] = int(hp.get("num_layers", sum(vit.is_block(n) for n in have)))
    blocks = layers(pool, parent, hp["num_layers"])
    # Resolution: the position embedding of the nearest ancestor with that size, else (None) the root's resampled.
    res = int(hp["resolution"])
    size = 1 + vit.grid(res, cfg.patch) ** 2
    pe = pool.find(parent, "posembed_input", lambda p: p.pos_embedding.shape[1] == size)

    # The child's components in order, each with the id it starts from (None: fresh parameters). Line 17: the
    # head of another task is never reused (make-trainable-head).
    slots: list[tuple[str, str | None]] = [("embedding", have["embedding"]), ("cls", have["cls"]),
                                           ("posembed_input", pe)]
    for i, b in enumerate(blocks):
        if method.adapter_dim:
            slots.append((vit.adapter(i), pool.find(parent, vit.adapter(i))))
        slots.append((vit.block(i), b))
    slots += [("encoder_norm", have["encoder_norm"]), ("head", have["head"] if parent.task == task else None)]

    locked = frozen_ids(system, task)
    out, trainable, fresh = [], [], {}
    for name, src in slots:  # lines 18–24: each clone decision is a mutation δ drawn with probability μ(δ|p)
        if src is not None and not clones(name, src, locked, method, hp, mu, rng):
            out.append(src), trainable.append(False)
            continue
        counter += 1
        cid = component_id(name, counter)
        if src is not None:  # a clone carries the parameters and their momentum
            mom = pool.momentum.get(src)
            fresh[cid] = (pool.params[src], zeros_like_bf16(pool.params[src]) if mom is None else mom)
        else:
            p = (vit.init_head(cfg, num_classes) if name == "head"
                 else vit.init_adapter(cfg, rng.key(), method.adapter_dim) if vit.is_adapter(name)
                 else vit.resample_posembed(pool.params[pool.find(system.root, name)], res, cfg.patch))
            fresh[cid] = (p, zeros_like_bf16(p))
        out.append(cid), trainable.append(True)
    model = Model(child_id, task, tuple(out), hp, mu, parent.id, {})
    return Child(model, tuple(trainable), fresh), counter + 1


# --- training a child (Algorithm 1 lines 26–32) ---------------------------------------------------------------


def full_depth(system: System, params: Mapping[str, eqx.Module], ids: Sequence[str]
               ) -> tuple[list[str | None], list[eqx.Module], tuple[bool, ...]]:
    """A path laid out at the root's depth, for training and evaluation: a block it lacks (layer removal), with
    its adapter, becomes a zero placeholder whose on flag is 0, so that it is skipped (vit.forward) and paths of
    every depth share one compiled program (train.py). Returns the slots' ids (None: a placeholder), their
    components and their on flags; a path of full depth is its own layout."""
    by = {kind(c): c for c in ids}
    root = [kind(c) for c in system.root.components]
    adapter = next((c for c in ids if vit.is_adapter(kind(c))), None)
    slots: list[tuple[str | None, str]] = [(by[n], by[n]) for n in ("embedding", "cls", "posembed_input")]
    for i in range(sum(map(vit.is_block, root))):
        if adapter:
            slots.append((by.get(vit.adapter(i)), adapter))
        slots.append((by.get(vit.block(i)), system.root.components[root.index(vit.block(i))]))
    slots += [(by["encoder_norm"], by["encoder_norm"]), (by["head"], by["head"])]
    comps = [params[c] if c else jax.tree.map(np.zeros_like, params[like]) for c, like in slots]
    return [c for c, _ in slots], comps, tuple(c is not None for c, _ in slots)


def accuracy(system: System, model: Model, task: TaskData, split: str, batch: int = 256,
             device: jax.Device | None = None, params: Mapping[str, eqx.Module] | None = None) -> float:
    """Top-1 accuracy of `model` on a split, laid out as it was validated (`full_depth`)."""
    _, comps, on = full_depth(system, params or system.params, model.components)
    return train.accuracy(comps, task, split, int(model.hp["resolution"]), batch, device, on)


def _job(pool: Pool, child: Child, task: TaskData, config: Config, key: jax.Array, threshold: float
         ) -> tuple[train.Job, list[str | None], float, int]:
    """What train.py needs to train `child` (`full_depth`), scored by eq. 1 in the system as it stands; the
    slots' ids, its size and FLOPs."""
    model = child.model
    params = {**pool.params, **{c: p for c, (p, _) in child.new.items()}}
    slots, comps, on = full_depth(pool.system, params, model.components)
    mom = [child.new[c][1] if c in child.new else zeros_like_bf16(p) for c, p in zip(slots, comps)]
    trains = dict(zip(model.components, child.trainable))
    size = model_size(params, model, sharers(pool.system, task.name))
    flops = model_flops(pool.system.cfg, params, model)
    score = lambda q: sc.score(q, size, flops, config.s, config.P, config.F)  # noqa: E731
    job = train.Job(comps, mom, tuple(c is not None and trains[c] for c in slots), model.hp, key, score,
                    threshold, model.id, on)
    return job, slots, size, flops


def _trained(child: Child, slots: Sequence[str | None], snap: train.Snapshot | None, size: float,
             flops: int) -> Trained | None:
    if snap is None:
        return None
    metrics = dict(quality=snap.quality, score=snap.score, params=size, flops=flops)
    return Trained(dataclasses.replace(child.model, metrics=metrics),
                   {c: p for c, p in zip(slots, snap.params) if p is not None},
                   {c: m for c, m in zip(slots, snap.momentum) if m is not None}, snap.score)


def train_child(pool: Pool, child: Child, task: TaskData, config: Config, key: jax.Array,
                threshold: float = -math.inf, device: jax.Device | None = None,
                log: Callable[[dict], None] | None = None) -> Trained | None:
    """Trains `child` (train.train_group of one) scored by eq. 1 in the system as it stands; None if no cycle
    reached `threshold` (line 29)."""
    job, slots, size, flops = _job(pool, child, task, config, key, threshold)
    snap = train.train_group([train.prepare(job, task, config)], task, config, device, log)[0]
    return _trained(child, slots, snap, size, flops)


def groups(alike: Sequence[Any], most: int) -> list[list[int]]:
    """Children (indices, in order) that train together: those with equal `alike` keys (train.Plan.group), in
    groups of powers of two up to `most` (7 alike at most 8 -> 4, 2, 1), so an architecture compiles for a few
    group sizes only. A function of the children alone, never of the devices, so the result does not depend on
    how many there are."""
    by: dict[Any, list[int]] = {}
    for i, a in enumerate(alike):
        by.setdefault(a, []).append(i)
    out = []
    for idx in by.values():
        while idx:
            k = 1 << (min(most, len(idx)).bit_length() - 1)
            out.append(idx[:k])
            idx = idx[k:]
    return sorted(out)


def _elsewhere(job: train.Job, cfg: vit.Config, config: Config) -> Iterator[train.Job]:
    """`job` at the search space's other resolutions (its position embedding resampled): with `full_depth`,
    the programs of these cover every child the next generation can make from this layout. Only under the "mask"
    split, whose programs do not depend on the cloning pattern, and when the resolution can move."""
    if config.trainable_split != "mask" or not config.method.hp_moves:
        return
    for r in config.space.values.get("resolution", ()):
        if r != job.hp["resolution"]:
            comps = [vit.resample_posembed(c, r, cfg.patch) if isinstance(c, vit.PosEmbed) else c
                     for c in job.components]
            yield dataclasses.replace(job, components=comps, momentum=[zeros_like_bf16(c) for c in comps],
                                      hp={**job.hp, "resolution": r})


def _train_all(pool: Pool, children: Sequence[tuple[Child, float, jax.Array]], task: TaskData, config: Config,
               devices: Sequence[jax.Device], log, more: bool = False) -> list[Trained | None]:
    """Trains a generation's children (lines 26–32): children of one architecture in groups (`groups`), group g
    on local device g mod n (the paper's one child per TPU core when groups are single children). Every group's
    programs start compiling at once, in worker threads (train.compile_ahead), and each device trains its groups
    whose programs are ready first, so a new architecture compiles while other children train. With `more` (a
    generation follows), the programs it may need at the other resolutions (`_elsewhere`) compile after ours."""
    jobs = [_job(pool, c, task, config, k, thr) for c, thr, k in children]
    plans = [train.prepare(j[0], task, config) for j in jobs]
    units = groups([q.group for q in plans], config.vectorise)
    n = len(devices)
    ahead = [train.compile_ahead([plans[i] for i in u], task, config, devices[g % n]) for g, u in enumerate(units)]
    for job in _elsewhere(jobs[0][0], pool.system.cfg, config) if more else ():  # the next generation's, after ours
        train.compile_ahead([train.prepare(job, task, config)], task, config, devices[0])
    snaps: dict[int, train.Snapshot | None] = {}

    def worker(d: int) -> None:
        todo = list(range(d, len(units), n))
        while todo:
            ready = [g for g in todo if all(f.done() for f in ahead[g])]
            if not ready:
                train.wait_first([f for g in todo for f in ahead[g] if not f.done()])
                continue
            g = ready[0]
            todo.remove(g)
            out = train.train_group([plans[i] for i in units[g]], task, config, devices[d], log)
            snaps.update(zip(units[g], out))

    if n == 1:
        worker(0)
    else:
        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            list(ex.map(worker, range(n)))
    return [_trained(c, slots, snaps[i], size, flops)
            for i, ((c, _, _), (_, slots, size, flops)) in enumerate(zip(children, jobs))]


# --- one task iteration (Algorithm 1) ------------------------------------------------------------------------


def task_iteration(system: System, task: TaskData, config: Config, key: jax.Array,
                   log: Callable[[dict], None] | None = None, devices: Sequence[jax.Device] | None = None) -> System:
    """One active-task iteration (Algorithm 1) as a pure function: #generations × #children children, each
    trained on its own device when several exist; only the task's best model is kept, and every component no
    retained model (nor the root) uses is dropped. Children of one generation are sampled from the population at
    the generation's start, so the result does not depend on how many devices train them."""
    t = task.name  # Alg. 1 line 1
    devices = list(devices or jax.local_devices())
    pool = Pool.of(system, t, config)  # lines 2–3: ℳ is the system, 𝒜 the task's models
    others = sorted((m for m in system.models.values() if m.task != t), key=lambda m: m.task) + [system.root]
    counter, selections = system.counter, {}
    for gen in range(config.generations):  # line 4
        kg = jax.random.fold_in(key, gen)
        children = []
        for i in range(config.children):  # line 5
            kp, kc, kt = jax.random.split(jax.random.fold_in(kg, i), 3)
            parent = (system.root if config.method.parents == "root"  # lines 7–16
                      else sample_parent(pool.models, pool.scores, others, selections, kp))
            selections[parent.id] = selections.get(parent.id, 0) + 1
            child, counter = make_child(pool, parent, t, task.num_classes, config, kc, counter)  # lines 17–24
            threshold = pool.scores[parent.id] if parent.task == t else -math.inf  # line 29's max at c = none
            children.append((child, threshold, kt))
            if log:
                log(dict(event="child", task=t, generation=gen, child=child.model.id, parent=parent.id,
                         trainable=sum(child.trainable), hp=dict(child.model.hp)))
        more = gen + 1 < config.generations
        results = _train_all(pool, children, task, config, devices, log, more)  # lines 26–32, by groups
        for r in results:
            if r is not None:  # lines 33–35
                pool = pool.add(r)
        if log:
            log(dict(event="generation", task=t, generation=gen, retained=sum(r is not None for r in results),
                     best=max(pool.scores.values(), default=None)))
    if not pool.models:
        return dataclasses.replace(system, counter=counter)
    best = max(pool.models, key=lambda m: pool.scores[m.id])  # line 39: the task's argmax score
    # Placed and laid out like validation's inputs: the same compiled program.
    test = accuracy(system, best, task, "test", config.eval_batch, devices[0], pool.params)
    best = dataclasses.replace(best, metrics={**best.metrics, "score": pool.scores[best.id], "test": test})
    return collect(dataclasses.replace(system, models={**system.models, t: best}, counter=counter), pool)
