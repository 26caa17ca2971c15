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
ADAPTER_DIMS = (8, 16, 32, 64, 128)  # adapter_dim of muNet and of small-benchmark μ2Net+ (section4.md §5.5, §6)
SMALL_RESOLUTIONS = tuple(range(16, 113, 16))  # μ2Net+ on MCCB / VDDB: {16, …, 112} (section4.md §6, §10.4)
MILD = dict(crop_area_min=0.05, crop_aspect_min=0.75, flip=True)  # Steiner et al.'s fine-tuning preprocessing

# The augmentation ranges muNet and μ2Net's notebooks share (section4.md §5.5, §5.8).
_WIDE_AUG: dict[str, tuple] = {
    "crop_area_min": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    "crop_aspect_min": (0.25, 0.5, 0.75, 1.0),
    "flip": (False, True),
    "brightness": _DELTAS,
    "contrast": _DELTAS,
    "saturation": _DELTAS,
    "hue": _DELTAS,
}

# muNet (Gesmundo & Dean 2022a) as muNet.ipynb runs it with AUTO_TUNE (section4.md §5.5, §10.14). Its momentum list
# starts with None, which would crash the notebook's optimizer; 0.0 (plain SGD) stands for it (§10.16).
MUNET_VALUES: dict[str, tuple] = {
    "adapter_dim": ADAPTER_DIMS,
    "lr": (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
    "schedule": ("constant", "cosine", "restarts"),
    "warmup": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4),
    "momentum": (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "nesterov": (False, True),
    "resolution": tuple(range(16, 385, 16)),  # 16, 32, …, 384: 24 sizes
    **_WIDE_AUG,
}
MUNET_DEFAULTS: dict[str, Any] = dict(PLUS_DEFAULTS, **MILD, adapter_dim=32, schedule="cosine", warmup=0.1, mu=0.1)

# μ2Net (Gesmundo & Dean 2022b) large agent, the one Section 5.1 continues: mu2Net.ipynb's auto-tune v2 ranges with
# μ a tuned hyperparameter and the resolution fixed (section4.md §5.8; the table's non-underlined values).
MU2NET_VALUES: dict[str, tuple] = {
    "mu": tuple(round(0.1 + 0.02 * i, 2) for i in range(11)),  # 0.10, 0.12, …, 0.30
    "lr": TABLE1["lr"],
    "warmup": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4),
    "momentum": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99),
    "nesterov": (False, True),
    **_WIDE_AUG,
}
DATA_HP = ("resolution",) + train.AUG_KEYS  # muNet draws these once per generation (section4.md §5.4 step 4)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Valid values per tunable hyperparameter (order = neighbour order) and the defaults of a fresh model."""

    values: Mapping[str, tuple]
    defaults: Mapping[str, Any]


SPACES = ("plus", "plus-small", "mu2net", "munet")


def search_space(depth: int, resolutions: Sequence[int] = (224, 384), method: str = "plus",
                 resolution: int | None = None) -> SearchSpace:
    """The search space of a method for a root of `depth` blocks whose resolutions are `resolutions` (default
    `resolution`, else the largest).

    "plus": Table 1, μ2Net+ (layer removal 0…depth, the root's resolutions, image quality, learned μ from 0.2).
    "plus-small": μ2Net+ on the Section 4 benchmarks (section4.md §6, §10.4): Table 1 with image sizes
      {16, …, 112}, adapter insertion with its width, warm-up default 0.1, and the model's global μ tuned over
      MU_VALUES (the authors' small-benchmark agents tune it; it sets where unseen μ-table entries start and how
      often entries move, `query`).
    "mu2net": μ2Net's large agent (section4.md §5.8): its own lists, μ a tuned hyperparameter, the largest
      resolution fixed, the mild fine-tuning preprocessing by default.
    "munet": muNet (section4.md §5.5): `num_layers` 1…depth, 24 image sizes 16…384, its lists and schedules.
    """
    res = resolution or max(resolutions)
    if method in ("plus", "plus-small"):
        values = dict(TABLE1, resolution=tuple(resolutions), num_layers=tuple(range(depth + 1)))
        defaults = dict(PLUS_DEFAULTS, resolution=res, num_layers=depth)
        if method == "plus-small":
            values |= dict(resolution=SMALL_RESOLUTIONS, adapter_dim=ADAPTER_DIMS, mu=MU_VALUES)
            defaults |= dict(warmup=0.1, adapter_dim=32)
    elif method == "mu2net":
        values = dict(MU2NET_VALUES, resolution=(max(resolutions),))
        defaults = dict(PLUS_DEFAULTS, **MILD, resolution=max(resolutions), num_layers=depth)
    elif method == "munet":
        values = dict(MUNET_VALUES, num_layers=tuple(range(1, depth + 1)))
        defaults = dict(MUNET_DEFAULTS, resolution=res, num_layers=depth)
    else:
        raise ValueError(f"search_space: method={method!r}; expected one of {list(SPACES)}")
    return SearchSpace(values, defaults)


@dataclasses.dataclass(frozen=True)
class Method:
    """How children are made and trained: one complete setting per method, as big_vision's `decode_variant`
    gives a model's settings from its name. μ2Net+ is the default; the others are settings, not code paths.

    space: the `search_space` variant ("plus": μ2Net+, "plus-small", "mu2net", "munet").
    learned_mu: per-action μ table (μ2Net+ ext. 4) instead of the model's single μ for every action.
    mu: > 0: one constant μ for every decision, whatever a model carries (muNet: 0.1).
    clone: "mu" (Algorithm 1), "all" (full fine-tune), "top:K" (blocks ≥ K trained, below shared frozen),
      "none" (only the forced encoder_norm, the head and the adapters train).
    adapter_dim: > 0 inserts `residual_adapter_{i}` of this width before every block (Section 4 baseline).
    insert_adapters: adapter insertion as a mutation: before each block without one, with probability μ, of the
      child's `adapter_dim` (muNet, μ2Net+ on the small benchmarks).
    hp_moves: mutate hyperparameters; parents: "any" (Algorithm 1), "root" (baselines start at the root) or
      "active" (muNet §5.3: only the active population is walked, fallback uniform over it and the seeds).
      Every method's #selections persist across task iterations (`selections`).
    seeds: muNet's seed phase (§5.2): an iteration's first children are unmutated clones of every other task's
      retained model and of the root, newest first.
    generation_hp: the data hyperparameters (DATA_HP) are drawn once per generation (muNet §5.4 step 4).
    clone_momentum: a clone carries its momentum (Section 3); muNet copies parameters only.
    strict, warmup_floor: train.Budget's training rules (muNet: keep only strict improvements, ties to the
      earliest model; warm-up from lr/100).
    compute: eq. 1's compute factor; muNet's score has none (§5.6).
    """

    space: str = "plus"
    learned_mu: bool = True
    mu: float = 0.0
    clone: str = "mu"
    adapter_dim: int = 0
    insert_adapters: bool = False
    hp_moves: bool = True
    parents: str = "any"
    seeds: bool = False
    generation_hp: bool = False
    clone_momentum: bool = True
    strict: bool = False
    warmup_floor: float = 1e-3
    compute: bool = True

    def __post_init__(self):
        ok = self.clone in ("mu", "all", "none") or (self.clone.startswith("top:") and self.clone[4:].isdigit())
        if not ok:
            raise ValueError(f"Method.clone = {self.clone!r}: expected 'mu', 'all', 'none' or 'top:K'")
        if self.parents not in ("any", "root", "active"):
            raise ValueError(f"Method.parents = {self.parents!r}: expected 'any', 'root' or 'active'")
        if self.space not in SPACES:
            raise ValueError(f"Method.space = {self.space!r}: expected one of {list(SPACES)}")
        if self.adapter_dim < 0:
            raise ValueError(f"Method.adapter_dim = {self.adapter_dim!r}: expected an integer ≥ 0")
        if not 0 <= self.mu <= 1:
            raise ValueError(f"Method.mu = {self.mu!r}: expected a probability (0 = the model's own μ)")
        if not 0 < self.warmup_floor <= 1:
            raise ValueError(f"Method.warmup_floor = {self.warmup_floor!r}: expected a fraction of lr in (0, 1]")


# The Section 4 baselines as muNet.ipynb / mu2Net.ipynb run them (section4.md §7.1): one child of the root, the
# benchmark defaults never tuned (lr 0.01, cosine warm-up 0.1 from lr/100, crop ≥ 0.05 / aspect 0.75, flip), no
# optimizer state, snapshots on strict improvement.
_BASELINE = dict(space="munet", learned_mu=False, hp_moves=False, parents="root", clone_momentum=False,
                 strict=True, warmup_floor=0.01)

METHODS: dict[str, Method] = {
    "mu2net+": Method(),
    "mu2net+small": Method(space="plus-small", insert_adapters=True),  # μ2Net+ in Section 4 (section4.md §6)
    "mu2net": Method(space="mu2net", learned_mu=False, warmup_floor=0.01),
    "munet": Method(space="munet", learned_mu=False, mu=0.1, insert_adapters=True, parents="active", seeds=True,
                    generation_hp=True, clone_momentum=False, strict=True, warmup_floor=0.01, compute=False),
    "finetune": Method(clone="all", **_BASELINE),  # with clone = "top:K": Freeze bottom layers:K
    "adapters": Method(clone="none", adapter_dim=64, **_BASELINE),  # Adapters:D with adapter_dim = D
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

    @property
    def strict(self) -> bool:
        return self.method.strict

    @property
    def warmup_floor(self) -> float:
        return self.method.warmup_floor

    def score(self, q: float, A: float, Fm: float) -> float:
        """Eq. 1 with this budget's s, P, F (no compute factor when the method has none)."""
        return sc.score(q, A, Fm, self.s, self.P, self.F if self.method.compute else math.inf)

    def resolutions(self) -> tuple[int, ...]:
        """Every resolution a child can reach (what the input pipeline must provide)."""
        r = self.space.defaults["resolution"]
        return tuple(sorted({r, *self.space.values.get("resolution", ())} if self.method.hp_moves else {r}))


def config(method: str | Method, depth: int, resolutions: Sequence[int], resolution: int | None = None,
           values: Mapping[str, Sequence] | None = None, defaults: Mapping[str, Any] | None = None,
           **budget: Any) -> Config:
    """A complete `Config` from a method name (or `Method`), the root's depth and resolutions, search-space
    overrides and budget fields (`Budget`'s names)."""
    m = METHODS[method] if isinstance(method, str) else method
    space = search_space(depth, resolutions, m.space, resolution)
    space = SearchSpace(dict(space.values) | {k: tuple(v) for k, v in (values or {}).items()},
                        dict(space.defaults) | dict(defaults or {}))
    if m.insert_adapters and not space.defaults.get("adapter_dim"):
        raise ValueError(f"Method.insert_adapters needs an adapter_dim default in the {m.space!r} search space")
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
    """A system holding only the root model (e.g. an AugReg checkpoint or a random init), momentum zero. A system's
    components live in host memory (numpy): only the children in flight occupy accelerators (issue 13)."""
    ids = tuple(component_id(name, i) for i, name in enumerate(root))
    params = {cid: jax.device_get(root[kind(cid)]) for cid in ids}
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
    adapters = [params[c].Dense_0.kernel.shape[1] for c in ids if vit.is_adapter(kind(c))]
    classes = next(params[c].bias.shape[0] for c in ids if kind(c) == "head")
    return sc.flops(cfg, depth, int(model.hp["resolution"]), classes, adapters)


def accounted_params(system: System, model: Model) -> float:
    return model_size(system.params, model, sharers(system, model.task))


def model_score(system: System, model: Model, config: Config) -> float:
    """Eq. 1 for a retained model in the current system (sharing may have changed since it was trained)."""
    q = model.metrics.get("quality", 0.0)
    return config.score(q, accounted_params(system, model), model_flops(system.cfg, system.params, model))


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
                  selections: Mapping[str, int], key: jax.Array, walk_others: bool = True) -> Model:
    """Algorithm 1 lines 7–16: walk the active population best-first, then the other models in random order;
    accept a candidate with probability 0.5^#selections; if none is accepted, pick uniformly from all.
    `walk_others=False` (muNet, section4.md §5.3): only the active population is walked."""
    rng = Sampler(key)
    ranked = sorted(active, key=lambda m: -scores[m.id])
    candidates = ranked + [others[i] for i in rng.rng.permutation(len(others))]
    for m in candidates if walk_others else ranked:
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
    model's μ, first moves ±1 step with probability μ, is stored in the child, then fires if it beats U(0,1).
    The model's μ is 0.2 for a model of a μ2Net+ system (Section 3: "All the values in the lookup table are
    initialized to 0.2"), but a model descended from a μ2Net model carries the μ that μ2Net tuned, and its unseen
    entries start there, as the authors' μ2Net+ notebook starts them (README, differences from the paper)."""
    if not learned:
        return hp["mu"] > rng.uniform()
    value = mu.get(action, hp["mu"])
    if hp["mu"] > rng.uniform():
        value = neighbour(MU_VALUES, value, rng)
    mu[action] = value
    return value > rng.uniform()


def mutate_hparams(parent: Model, space: SearchSpace, method: Method, rng: Sampler,
                   fixed: Mapping[str, Any] | None = None, moves: bool = True) -> tuple[dict, dict]:
    """Hyperparameter moves (Section 3): each hyperparameter moves to a neighbouring value when its action fires.
    μ goes first: in μ2Net it is itself a hyperparameter and sets the rate of the others. `fixed` values (muNet's
    generation-level data hyperparameters) replace the parent's and never move; `moves=False`: no move at all."""
    fixed = dict(fixed or {})
    hp = dict(space.defaults) | dict(parent.hp) | fixed
    if method.mu:
        hp["mu"] = method.mu
    mu = dict(parent.mu) if method.learned_mu else {}
    if method.hp_moves and moves:
        for name in sorted(space.values, key=lambda n: n != "mu"):
            if name not in fixed and query(f"hp:{name}", hp, mu, method.learned_mu, rng):
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
    if name == "head" or cid not in locked:
        return True  # make-trainable-head, or being trained for this task
    if name == "encoder_norm":
        return True  # the forced clone of every method, the baselines included (section4.md §7.2, §7.3)
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
               counter: int, seed: bool = False, fixed: Mapping[str, Any] | None = None) -> tuple[Child, int]:
    """Algorithm 1 lines 17–24: sample the mutations Δ of `parent` and apply them. The child's model id and
    every fresh component id are drawn from `counter`; returns the child and the advanced counter.

    `seed`: muNet's seed clone (section4.md §5.2): no mutation at all, so only what is already trainable for
    `task` (nothing, for another task's model or the root) and a new head train. `fixed`: hyperparameters the
    generation fixed (muNet's data hyperparameters)."""
    system, method, cfg = pool.system, config.method, pool.system.cfg
    child_id = model_id(task, counter)
    rng = Sampler(key)
    hp, mu = mutate_hparams(parent, config.space, method, rng, fixed, moves=not seed)
    have = {kind(c): c for c in parent.components}
    # Layer removal / re-adding: num_layers moves one step; a re-added block comes from the nearest ancestor.
    hp["num_layers"] = int(hp.get("num_layers", sum(vit.is_block(n) for n in have)))
    blocks = layers(pool, parent, hp["num_layers"])
    # Residual adapters: the baseline's before every block; otherwise the parent's below num_layers, plus one
    # inserted before each other block with probability μ (muNet §5.4 step 2), of the child's adapter_dim.
    dim = method.adapter_dim or int(hp.get("adapter_dim", 0))
    if method.adapter_dim:
        where = set(range(len(blocks)))
    else:
        where = {vit.block_index(n) for n in have if vit.is_adapter(n)} & set(range(len(blocks)))
        if method.insert_adapters and not seed:
            where |= {i for i in range(len(blocks))
                      if i not in where and query(f"add:{vit.adapter(i)}", hp, mu, method.learned_mu, rng)}
    fits = (lambda p: p.Dense_0.kernel.shape[1] == dim) if dim else (lambda p: True)  # a new width: search on
    # Resolution: the position embedding of the nearest ancestor with that size, else (None) the root's resampled.
    res = int(hp["resolution"])
    size = 1 + vit.grid(res, cfg.patch) ** 2
    pe = pool.find(parent, "posembed_input", lambda p: p.pos_embedding.shape[1] == size)

    # The child's components in order, each with the id it starts from (None: fresh parameters). Line 17: the
    # head of another task is never reused (make-trainable-head).
    slots: list[tuple[str, str | None]] = [("embedding", have["embedding"]), ("cls", have["cls"]),
                                           ("posembed_input", pe)]
    for i, b in enumerate(blocks):
        if i in where:
            slots.append((vit.adapter(i), pool.find(parent, vit.adapter(i), fits)))
        slots.append((vit.block(i), b))
    slots += [("encoder_norm", have["encoder_norm"]), ("head", have["head"] if parent.task == task else None)]

    locked = frozen_ids(system, task)
    out, trainable, fresh = [], [], {}
    for name, src in slots:  # lines 18–24: each clone decision is a mutation δ drawn with probability μ(δ|p)
        if src is not None and (src in locked if seed else not clones(name, src, locked, method, hp, mu, rng)):
            out.append(src), trainable.append(False)
            continue
        counter += 1
        cid = component_id(name, counter)
        if src is not None:  # a clone carries the parameters, and their momentum unless the method drops it
            mom = pool.momentum.get(src) if method.clone_momentum else None
            fresh[cid] = (pool.params[src], zeros_like_bf16(pool.params[src]) if mom is None else mom)
        else:
            p = (vit.init_head(cfg, num_classes) if name == "head"
                 else vit.init_adapter(cfg, rng.key(), dim) if vit.is_adapter(name)
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
    return train.accuracy(comps, task, split, int(model.hp["resolution"]), batch, device, on=on)


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
    score = lambda q: config.score(q, size, flops)  # noqa: E731
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


Planned = tuple[int, Child, float, jax.Array]  # a child's index in its generation, the child, line 29's threshold, key
Train = Callable[..., Mapping[int, "Trained | None"]]  # (pool, todo, task, config, log, more) -> trained by index


def train_local(devices: Sequence[jax.Device], stop: Callable[[], bool] = lambda: False) -> Train:
    """Trains a generation's children (lines 26–32): children of one architecture in groups (`groups`, of one
    unless `Budget.vectorise`), group g on local device g mod n (the paper's one child per TPU core), so no device
    ever holds two groups. Every group's programs start compiling at once, in worker threads
    (train.compile_ahead), and each device trains first its groups whose programs are ready, so a new architecture
    compiles while other children train. With `more` (a generation follows), the programs it may need at the
    other resolutions (`_elsewhere`) compile after ours. A group not yet started when `stop()` turns true is left
    out of the result (a stopped generation resumes from the others)."""
    devices = list(devices)
    n = len(devices)

    def run(pool: Pool, todo: Sequence[Planned], task: TaskData, config: Config, log,
            more: bool = False) -> dict[int, Trained | None]:
        jobs = [_job(pool, c, task, config, k, thr) for _, c, thr, k in todo]
        plans = [train.prepare(j[0], task, config) for j in jobs]
        units = groups([q.group for q in plans], config.vectorise)
        ahead = [train.compile_ahead([plans[i] for i in u], task, config, devices[g % n])
                 for g, u in enumerate(units)]
        for job in _elsewhere(jobs[0][0], pool.system.cfg, config) if more and jobs else ():
            train.compile_ahead([train.prepare(job, task, config)], task, config, devices[0])
        snaps: dict[int, train.Snapshot | None] = {}

        def worker(d: int) -> None:
            mine = list(range(d, len(units), n))
            while mine and not stop():
                ready = [g for g in mine if all(f.done() for f in ahead[g])]
                if not ready:
                    train.wait_first([f for g in mine for f in ahead[g] if not f.done()])
                    continue
                mine.remove(g := ready[0])
                snaps.update(zip(units[g], train.train_group([plans[i] for i in units[g]], task, config,
                                                             devices[d], log)))

        if n == 1:
            worker(0)
        else:
            with concurrent.futures.ThreadPoolExecutor(n) as ex:
                list(ex.map(worker, range(n)))
        return {todo[i][0]: _trained(todo[i][1], slots, snaps[i], size, flops)
                for i, (_, slots, size, flops) in enumerate(jobs) if i in snaps}

    return run


# --- one task iteration (Algorithm 1) ------------------------------------------------------------------------


def best_model(pool: Pool, strict: bool) -> Model | None:
    """Line 39's argmax of the active population's scores; a tie goes to the most recent model (μ2Net, μ2Net+),
    or to the earliest under `strict` (muNet's Python `max`, section4.md §5.1, §10.13)."""
    order = pool.models if strict else pool.models[::-1]
    return max(order, key=lambda m: pool.scores[m.id], default=None)


def seed_models(system: System, task: str) -> list[Model]:
    """muNet's seeds (section4.md §5.2): every other task's retained model and the root, newest first."""
    others = [m for m in system.models.values() if m.task != task]
    return sorted(others, key=lambda m: -int(m.id.rsplit("/", 1)[1])) + [system.root]


def generation_data(pool: Pool, config: Config, frozen: bool, key: jax.Array) -> dict[str, Any]:
    """muNet's data hyperparameters of one generation (section4.md §5.4 step 4): the defaults, overwritten by the
    active task's best model, then each tunable one moved with probability μ, unless `frozen` (seeds remain)."""
    best = best_model(pool, config.method.strict)
    hp = {k: v for k, v in config.space.defaults.items() if k in DATA_HP}
    hp |= {k: v for k, v in (best.hp if best else {}).items() if k in DATA_HP}
    if frozen or not config.method.hp_moves:
        return hp
    rng, mu = Sampler(key), config.method.mu or config.space.defaults["mu"]
    for name in DATA_HP:
        if name in config.space.values and mu > rng.uniform():
            hp[name] = neighbour(config.space.values[name], hp[name], rng)
    return hp


@dataclasses.dataclass(frozen=True)
class Iteration:
    """A task iteration between two generations: everything Algorithm 1's loop carries (line 4's generation, the
    active population 𝒜 in `pool`, the id counter, the #selections of line 9 by model id), plus the children of
    the current generation already trained when it was stopped part-way (`done`, by index in the generation; None
    while the generation has not started). It is a value, so a runner can commit it after every generation and
    resume from it bit-identically."""

    task: str
    generation: int
    pool: Pool
    counter: int
    selections: Mapping[str, int]
    done: Mapping[int, Trained | None] | None = None


class Stopped(Exception):
    """A task iteration stopped at a safe point (a stop request); `state` resumes it."""

    def __init__(self, state: Iteration):
        super().__init__(f"task iteration on {state.task!r} stopped in generation {state.generation}")
        self.state = state


def selections_key(task: str) -> str:
    """The metrics key of #selections(p, t) (Algorithm 1 line 9): how many children of task t were sampled from
    model p. A model keeps its counts, one per task, across task iterations, as both of the authors' notebooks keep
    theirs on the model (README, differences from the paper)."""
    return f"selections:{task}"


def selections(system: System, task: str) -> dict[str, int]:
    """#selections(p, task) of every model p of the system, the root included, as earlier iterations left them."""
    key = selections_key(task)
    return {m.id: int(m.metrics[key]) for m in (system.root, *system.models.values()) if key in m.metrics}


def counted(system: System, task: str, n: Mapping[str, int]) -> System:
    """`system` with #selections(p, task) = n[p.id] kept on the root and the retained models that `n` names."""
    key = selections_key(task)

    def keep(m: Model) -> Model:
        return dataclasses.replace(m, metrics={**m.metrics, key: n[m.id]}) if n.get(m.id) else m

    models = {t: keep(m) for t, m in system.models.items()}
    return dataclasses.replace(system, root=keep(system.root), models=models)


def start(system: System, task: str, config: Config) -> Iteration:
    """Algorithm 1 lines 1–3: ℳ is the system, 𝒜 the task's models; #selections(p, t) continue from the counts
    the models keep (`selections`)."""
    return Iteration(task, 0, Pool.of(system, task, config), system.counter, selections(system, task))


def generation(state: Iteration, task: TaskData, config: Config, key: jax.Array, train: Train,
               log: Callable[[dict], None] | None = None) -> Iteration:
    """One generation (Algorithm 1 lines 5–35): sample #children children from the population as it stands at the
    generation's start, train them (`train`: on this process's devices, or spread over several processes), and
    add the retained ones to 𝒜 in child order. If `train` stopped before every child was trained, the state keeps
    the generation's start and the finished children, so the generation resumes where it stopped."""
    pool, t, gen, method = state.pool, state.task, state.generation, config.method
    system = pool.system  # the system at the iteration's start: seeds and others are the same every generation
    seeds = seed_models(system, t) if method.seeds else []
    active_only = method.parents == "active"
    if active_only:  # muNet: the uniform fallback draws from the seeds (= the other models)
        others = seed_models(system, t)
    else:
        others = sorted((m for m in system.models.values() if m.task != t), key=lambda m: m.task) + [system.root]
    counter, selections, done = state.counter, dict(state.selections), state.done or {}
    kg = jax.random.fold_in(key, gen)
    first = gen * config.children  # index of the generation's first child in the iteration
    fixed = (generation_data(pool, config, first < len(seeds), jax.random.fold_in(kg, config.children))
             if method.generation_hp else None)
    children: list[Planned] = []
    for i in range(config.children):  # line 5
        kp, kc, kt = jax.random.split(jax.random.fold_in(kg, i), 3)
        seed = first + i < len(seeds)
        parent = (seeds[first + i] if seed else system.root if method.parents == "root"  # lines 7–16
                  else sample_parent(pool.models, pool.scores, others, selections, kp, not active_only))
        selections[parent.id] = selections.get(parent.id, 0) + 1
        child, counter = make_child(pool, parent, t, task.num_classes, config, kc, counter,  # lines 17–24
                                    seed, fixed)
        threshold = pool.scores[parent.id] if parent.task == t else -math.inf  # line 29's max at c = none
        children.append((i, child, threshold, kt))
        if log and state.done is None:  # a resumed generation logged its children before it stopped
            log(dict(event="child", task=t, generation=gen, child=child.model.id, parent=parent.id,
                     seed=seed, trainable=sum(child.trainable), hp=dict(child.model.hp)))
    todo = [c for c in children if c[0] not in done]
    more = gen + 1 < config.generations
    results = {**done, **train(pool, todo, task, config, log, more)}  # lines 26–32, one group per device
    if len(results) < len(children):
        return dataclasses.replace(state, done=results)
    for i in range(len(children)):
        if results[i] is not None:  # lines 33–35
            pool = pool.add(results[i])
    if log:
        log(dict(event="generation", task=t, generation=gen, retained=sum(r is not None for r in results.values()),
                 best=max(pool.scores.values(), default=None)))
    return Iteration(t, gen + 1, pool, counter, selections)


def finish(state: Iteration, task: TaskData, config: Config, device: jax.Device | None = None) -> System:
    """Algorithm 1 line 39: the task keeps its best model; components no retained model uses are dropped."""
    pool, n = state.pool, state.selections
    system = counted(dataclasses.replace(pool.system, counter=state.counter), state.task, n)
    best = best_model(pool, config.method.strict)  # line 39: the task's argmax score
    if best is None:
        return system
    # Placed and laid out like validation's inputs: the same compiled program.
    test = accuracy(system, best, task, "test", config.eval_batch, device, pool.params)
    metrics = {**best.metrics, "score": pool.scores[best.id], "test": test}
    if n.get(best.id):
        metrics[selections_key(state.task)] = n[best.id]
    best = dataclasses.replace(best, metrics=metrics)
    return collect(dataclasses.replace(system, models={**system.models, state.task: best}), pool)


def task_iteration(system: System, task: TaskData, config: Config, key: jax.Array,
                   log: Callable[[dict], None] | None = None, devices: Sequence[jax.Device] | None = None,
                   train: Train | None = None, state: Iteration | None = None,
                   after: Callable[[Iteration], None] | None = None) -> System:
    """One active-task iteration (Algorithm 1) as a pure function: #generations × #children children, each
    trained on its own device when several exist; only the task's best model is kept, and every component no
    retained model (nor the root) uses is dropped. Children of one generation are sampled from the population at
    the generation's start, so the result does not depend on how many devices (or processes) train them. The
    #selections of every model continue from the counts it keeps (`selections`) and are kept again at the end.
    muNet's settings add its seed phase and generation-level data hyperparameters (`Method`).

    `train` trains a generation's children (default: `train_local` on `devices`, this process's devices by
    default); `after` sees the state after every generation (a runner commits it there); `state` resumes from such
    a state. A generation that `train` stopped part-way raises `Stopped` after `after` has seen it."""
    devices = list(devices or jax.local_devices())
    train = train or train_local(devices)
    it = state or start(system, task.name, config)  # lines 1–3
    while it.generation < config.generations:  # line 4
        it = generation(it, task, config, key, train, log)  # lines 5–35
        if after:
            after(it)
        if it.done is not None:
            raise Stopped(it)
    return finish(it, task, config, devices[0])  # line 39
