"""The μ2Net+ multitask system and one active-task iteration (paper Section 3, Algorithm 1, whose line numbers it
carries). A `System` holds components by id and one retained `Model` (path) per task: a component is shared or owned
by *data* (which models list its id), never by object identity. A task iteration is pure: `start`, then
`generations` (a generator: the runner commits every state it yields), then `finish`. μ2Net, μ2Net+, muNet and the
Section 4 baselines are settings of the same functions (methods.py); a `Trainer` trains the children (schedule.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import equinox as eqx
import jax
import numpy as np

import score as sc
import vit
from methods import DATA_HP, MU_VALUES, Config, Method, SearchSpace
from train import Sampler, TaskData, zeros_like_bf16


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


def component_id(name: str, n: int) -> str:
    """Ids: a component is `<name>:<n>` and a model `<task>/<n>`, n from the system's one counter."""
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
    components live in host memory (numpy): only the children in flight occupy accelerators."""
    ids = tuple(component_id(name, i) for i, name in enumerate(root))
    params = {cid: jax.device_get(root[kind(cid)]) for cid in ids}
    model = Model(ROOT, ROOT, ids, dict(hp), {}, None, {})
    return System(cfg, params, {c: zeros_like_bf16(p) for c, p in params.items()}, {}, model,
                  {ROOT: (None, ids)}, len(ids))


def sharers(system: System, task: str) -> dict[str, int]:
    """#models(p) of eq. 2: for each component, the retained models of tasks other than `task` using it."""
    return dict(collections.Counter(c for m in system.models.values() if m.task != task for c in set(m.components)))


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
    if (a.cfg, a.models, a.root, a.lineage, a.counter, list(a.params), list(a.momentum)) != (
            b.cfg, b.models, b.root, b.lineage, b.counter, list(b.params), list(b.momentum)):
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


# --- sampling a parent and mutating it (Section 3; docs/method.md, "Parent sampling", "Mutations") ---------


def sample_parent(active: Sequence[Model], scores: Mapping[str, float], others: Sequence[Model],
                  selections: Mapping[str, int], key: jax.Array, walk_others: bool = True) -> Model:
    """Algorithm 1 lines 7–16: walk the active population best-first, then the other models in random order;
    accept a candidate with probability 0.5^#selections; if none is accepted, pick uniformly from all.
    `walk_others=False` (muNet, docs/benchmarks.md §5.3): only the active population is walked."""
    rng = Sampler(key)
    ranked = sorted(active, key=lambda m: -scores[m.id])
    candidates = ranked + [others[i] for i in rng.rng.permutation(len(others))]
    for m in candidates if walk_others else ranked:
        if 0.5 ** selections.get(m.id, 0) > rng.uniform():
            return m
    return candidates[int(rng.rng.integers(len(candidates)))]


def neighbour(values: tuple, value: Any, rng: Sampler) -> Any:
    """One step ±1 (probability ½ each) in the list of valid values, clamped at the ends; from the nearest valid
    value when `value` is not one."""
    i = values.index(value) if value in values else int(np.argmin([abs(float(v) - float(value)) for v in values]))
    return values[min(max(i + (1 if rng.uniform() < 0.5 else -1), 0), len(values) - 1)]


def query(action: str, hp: Mapping[str, Any], mu: dict[str, float], learned: bool, rng: Sampler) -> bool:
    """Whether mutation `action` fires (Algorithm 1 line 20). Learned μ (μ2Net+): the table entry starts at the
    model's μ (0.2 in a μ2Net+ system, Section 3; μ2Net's tuned μ in a model descended from one: see
    docs/deviations.md), first moves ±1 step with probability μ, is stored in the child, then fires if it beats
    U(0,1)."""
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
    Everything else reachable was trained for `task` in progress and is always cloned (docs/method.md)."""
    return set(system.root.components) | set(sharers(system, task))


def clones(name: str, cid: str, locked: set[str], method: Method, hp: Mapping[str, Any], mu: dict[str, float],
           rng: Sampler) -> bool:
    """Whether the child trains a copy of component `cid` rather than sharing it frozen."""
    if name == "head" or cid not in locked:
        return True  # make-trainable-head, or being trained for this task
    if name == "encoder_norm":
        return True  # the forced clone of every method, the baselines included (docs/benchmarks.md §7.2, §7.3)
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
    """Algorithm 1 lines 17–24: sample the mutations Δ of `parent` and apply them; the child's model id and every
    fresh component id come from `counter` (returned advanced). `seed`: muNet's seed clone (docs/benchmarks.md
    §5.2), no mutation, so only what is already trainable for `task` and a new head train. `fixed`:
    hyperparameters the generation fixed (muNet's data hyperparameters)."""
    system, method, cfg = pool.system, config.method, pool.system.cfg
    child_id = model_id(task, counter)
    rng = Sampler(key)
    hp, mu = mutate_hparams(parent, config.space, method, rng, fixed, moves=not seed)
    slots, dim = _slots(pool, parent, task, hp, mu, method, seed, rng)
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
                 else vit.resample_posembed(pool.params[pool.find(system.root, name)], int(hp["resolution"]),
                                            cfg.patch))
            fresh[cid] = (p, zeros_like_bf16(p))
        out.append(cid), trainable.append(True)
    model = Model(child_id, task, tuple(out), hp, mu, parent.id, {})
    return Child(model, tuple(trainable), fresh), counter + 1


def _slots(pool: Pool, parent: Model, task: str, hp: dict, mu: dict[str, float], method: Method, seed: bool,
           rng: Sampler) -> tuple[list[tuple[str, str | None]], int]:
    """The child's components in order, each with the id it starts from (None: fresh parameters), after the
    mutations of its depth, adapters and resolution; and its adapters' width."""
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
    size = 1 + vit.grid(int(hp["resolution"]), pool.system.cfg.patch) ** 2
    pe = pool.find(parent, "posembed_input", lambda p: p.pos_embedding.shape[1] == size)
    # Line 17: the head of another task is never reused (make-trainable-head).
    slots: list[tuple[str, str | None]] = [("embedding", have["embedding"]), ("cls", have["cls"]),
                                           ("posembed_input", pe)]
    for i, b in enumerate(blocks):
        if i in where:
            slots.append((vit.adapter(i), pool.find(parent, vit.adapter(i), fits)))
        slots.append((vit.block(i), b))
    slots += [("encoder_norm", have["encoder_norm"]), ("head", have["head"] if parent.task == task else None)]
    return slots, dim


# --- training children (Algorithm 1 lines 26–32): a trainer's job --------------------------------------


class Planned(NamedTuple):
    """A child sampled for training: its index in the generation, the child, line 29's threshold at c = none
    (its parent's score if the parent is of the task, else −∞) and its training key."""

    index: int
    child: Child
    threshold: float
    key: jax.Array


Log = Callable[[dict], None]


class Trainer(Protocol):
    """Where children train (lines 26–32): this process's devices (schedule.Local) or every process's
    (exchange.Spread). A call trains `todo` (`more`: a generation follows) and returns the retained children by
    index, None where nothing was kept; a child left out was not trained (a stop request). `accuracy`: top-1."""

    def __call__(self, pool: Pool, todo: Sequence[Planned], task_data: TaskData, config: Config, log: Log | None,
                 more: bool) -> Mapping[int, Trained | None]: ...

    def accuracy(self, pool: Pool, model: Model, task_data: TaskData, split: str, batch: int) -> float: ...


# --- one task iteration (Algorithm 1) ------------------------------------------------------------------------


def best_model(pool: Pool, strict: bool) -> Model | None:
    """Line 39's argmax of the active population's scores; a tie goes to the most recent model (μ2Net, μ2Net+),
    or to the earliest under `strict` (muNet's Python `max`, docs/benchmarks.md §5.1, §10.13)."""
    order = pool.models if strict else pool.models[::-1]
    return max(order, key=lambda m: pool.scores[m.id], default=None)


def outside(system: System, task: str, method: Method) -> tuple[list[Model], list[Model]]:
    """ℳ ∖ 𝒜 of line 8: every other task's retained model, by task, then the root; and muNet's seeds (the same
    newest first, each the parent of one of the iteration's first children, and its fallback pool; §5.2–5.3 of
    docs/benchmarks.md)."""
    rest = [m for m in system.models.values() if m.task != task]
    newest = sorted(rest, key=lambda m: -int(m.id.rsplit("/", 1)[1])) + [system.root]
    others = newest if method.active_only else sorted(rest, key=lambda m: m.task) + [system.root]
    return others, newest if method.seeds else []


def choose_parent(pool: Pool, others: Sequence[Model], selections: Mapping[str, int], method: Method,
                  key: jax.Array) -> Model:
    """Algorithm 1 lines 7–16 (`sample_parent`); the baselines' parent is always the root."""
    if method.parents == "root":
        return pool.system.root
    return sample_parent(pool.models, pool.scores, others, selections, key, not method.active_only)


def generation_data(pool: Pool, config: Config, frozen: bool, key: jax.Array) -> dict[str, Any] | None:
    """muNet's data hyperparameters of one generation (docs/benchmarks.md §5.4 step 4): the defaults, overwritten by
    the active task's best model, then each tunable one moved with probability μ, unless `frozen` (seeds
    remain). None for the other methods: each child draws its own."""
    if not config.method.generation_hp:
        return None
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


def selections_key(task: str) -> str:
    """The metrics key of #selections(p, t) (line 9), kept on a model across task iterations (docs/deviations.md)."""
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


@dataclasses.dataclass(frozen=True)
class Iteration:
    """A task iteration between two generations, as a value a runner commits and resumes from bit-identically: what
    Algorithm 1's loop carries (line 4's generation, 𝒜 in `pool`, the id counter, line 9's #selections by model
    id), and the children of a generation stopped part-way (`done`, by index; None while it has not started)."""

    task: str
    generation: int
    pool: Pool
    counter: int
    selections: Mapping[str, int]
    done: Mapping[int, Trained | None] | None = None


def start(system: System, task: str, config: Config) -> Iteration:
    """Algorithm 1 lines 1–3: ℳ is the system, 𝒜 the task's models; #selections continue (`selections`)."""
    return Iteration(task, 0, Pool.of(system, task, config), system.counter, selections(system, task))


def generation(state: Iteration, task_data: TaskData, config: Config, key: jax.Array, trainer: Trainer,
               log: Log | None = None) -> Iteration:
    """One generation (Algorithm 1 lines 5–35): sample #children children from the population as it stands at the
    generation's start, train them (`trainer`), and add the retained ones to 𝒜 in child order. A trainer stopped
    part-way leaves the generation's start and its finished children in the state, to resume from."""
    pool, t, n, method = state.pool, state.task, config.budget.children, config.method
    others, seeds = outside(pool.system, t, method)
    counter, selections, done = state.counter, dict(state.selections), state.done or {}
    kg = jax.random.fold_in(key, state.generation)
    first = state.generation * n  # index of the generation's first child in the iteration
    fixed = generation_data(pool, config, first < len(seeds), jax.random.fold_in(kg, n))
    children: list[Planned] = []
    for i in range(n):  # line 5
        kp, kc, kt = jax.random.split(jax.random.fold_in(kg, i), 3)
        seed = first + i < len(seeds)
        parent = seeds[first + i] if seed else choose_parent(pool, others, selections, method, kp)  # lines 7–16
        selections[parent.id] = selections.get(parent.id, 0) + 1
        child, counter = make_child(pool, parent, t, task_data.num_classes, config, kc, counter, seed, fixed)  # 17–24
        threshold = pool.scores[parent.id] if parent.task == t else -math.inf  # line 29's max at c = none
        children.append(Planned(i, child, threshold, kt))
        if log and state.done is None:  # a resumed generation logged its children before it stopped
            log(dict(event="child", task=t, generation=state.generation, child=child.model.id, parent=parent.id,
                     seed=seed, trainable=sum(child.trainable), hp=dict(child.model.hp)))
    more = state.generation + 1 < config.budget.generations
    results = {**done, **trainer(pool, [c for c in children if c.index not in done], task_data, config, log, more)}
    if len(results) < n:  # lines 26–32 stopped part-way
        return dataclasses.replace(state, done=results)
    for i in range(n):
        if results[i] is not None:  # lines 33–35
            pool = pool.add(results[i])
    if log:
        log(dict(event="generation", task=t, generation=state.generation,
                 retained=sum(r is not None for r in results.values()), best=max(pool.scores.values(), default=None)))
    return Iteration(t, state.generation + 1, pool, counter, selections)


def generations(state: Iteration, task_data: TaskData, config: Config, key: jax.Array, trainer: Trainer,
                log: Log | None = None) -> Iterator[Iteration]:
    """Algorithm 1 line 4 from `state` (`start`'s, or a committed one): yields the state after each generation; one
    the trainer stopped part-way is yielded as it stands and ends them (a runner commits it and resumes from it)."""
    while state.generation < config.budget.generations:
        state = generation(state, task_data, config, key, trainer, log)
        yield state
        if state.done is not None:
            return


def finish(state: Iteration, task_data: TaskData, config: Config, trainer: Trainer) -> System:
    """Algorithm 1 line 39: the task keeps its best model, with its accuracy on the task's test split; components
    no retained model uses are dropped."""
    pool, system = state.pool, dataclasses.replace(state.pool.system, counter=state.counter)
    best = best_model(pool, config.method.strict)
    if best is None:
        return counted(system, state.task, state.selections)
    test = trainer.accuracy(pool, best, task_data, "test", config.budget.eval_batch)
    best = dataclasses.replace(best, metrics={**best.metrics, "score": pool.scores[best.id], "test": test})
    system = dataclasses.replace(system, models={**system.models, state.task: best})
    return collect(counted(system, state.task, state.selections), pool)  # the counts go on with the models
