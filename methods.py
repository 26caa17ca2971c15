"""The methods as settings (paper Table 1, Sections 4 and 5): search spaces, `Method`, `METHODS`, budgets.

μ2Net+, μ2Net, muNet and the Section 4 baselines are settings of the same Algorithm 1 (mu2net.py), not code paths.
A task iteration reads a `Config`: its search space, its method and its budget, three fields. The constants the
paper leaves implicit come from the authors' notebooks (docs/method.md, docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import score as sc
import train

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
PLUS_DEFAULTS: dict[str, Any] = dict(  # μ2Net+ (docs/method.md, "Search space defaults"): every augmentation off
    lr=0.01, warmup=0.05, momentum=0.9, nesterov=False, crop_area_min=1.0, crop_aspect_min=1.0, flip=False,
    brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, quality=0.0, resolution=384, mu=0.2,
)
ADAPTER_DIMS = (8, 16, 32, 64, 128)  # adapter_dim of muNet and of small-benchmark μ2Net+ (docs/benchmarks.md §5.5, §6)
SMALL_RESOLUTIONS = tuple(range(16, 113, 16))  # μ2Net+ on MCCB / VDDB: {16, …, 112} (docs/benchmarks.md §6, §10.4)
MILD = dict(crop_area_min=0.05, crop_aspect_min=0.75, flip=True)  # Steiner et al.'s fine-tuning preprocessing

# The augmentation ranges muNet and μ2Net's notebooks share (docs/benchmarks.md §5.5, §5.8).
_WIDE_AUG: dict[str, tuple] = {
    "crop_area_min": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    "crop_aspect_min": (0.25, 0.5, 0.75, 1.0),
    "flip": (False, True),
    "brightness": _DELTAS,
    "contrast": _DELTAS,
    "saturation": _DELTAS,
    "hue": _DELTAS,
}

# muNet (Gesmundo & Dean 2022a) as muNet.ipynb runs it with AUTO_TUNE (docs/benchmarks.md §5.5, §10.14). Its momentum
# list starts with None, which would crash the notebook's optimizer; 0.0 (plain SGD) stands for it (§10.16).
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
# μ a tuned hyperparameter and the resolution fixed (docs/benchmarks.md §5.8; the table's non-underlined values).
MU2NET_VALUES: dict[str, tuple] = {
    "mu": tuple(round(0.1 + 0.02 * i, 2) for i in range(11)),  # 0.10, 0.12, …, 0.30
    "lr": TABLE1["lr"],
    "warmup": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4),
    "momentum": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99),
    "nesterov": (False, True),
    **_WIDE_AUG,
}
DATA_HP = ("resolution",) + train.AUG_KEYS  # muNet draws these once per generation (docs/benchmarks.md §5.4 step 4)


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
    "plus-small": μ2Net+ on the Section 4 benchmarks (docs/benchmarks.md §6, §10.4): Table 1 with image sizes
      {16, …, 112}, adapter insertion with its width, warm-up default 0.1, and the model's global μ tuned over
      MU_VALUES (the authors' small-benchmark agents tune it; it sets where unseen μ-table entries start and how
      often entries move, `mu2net.query`).
    "mu2net": μ2Net's large agent (docs/benchmarks.md §5.8): its own lists, μ a tuned hyperparameter, the largest
      resolution fixed, the mild fine-tuning preprocessing by default.
    "munet": muNet (docs/benchmarks.md §5.5): `num_layers` 1…depth, 24 image sizes 16…384, its lists and schedules.
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
      Every method's #selections persist across task iterations (mu2net.selections).
    seeds: muNet's seed phase (§5.2): an iteration's first children are unmutated clones of every other task's
      retained model and of the root, newest first.
    generation_hp: the data hyperparameters (DATA_HP) are drawn once per generation (muNet §5.4 step 4).
    clone_momentum: a clone carries its momentum (Section 3); muNet copies parameters only.
    strict, warmup_floor: how a child trains (train.Job): muNet keeps only strict improvements (line 29's ≥
      becomes >) and line 39's ties go to the earliest model; warm-up from lr/100.
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

    @property
    def active_only(self) -> bool:
        """muNet (docs/benchmarks.md §5.3): only the active population is walked (the other models are the
        fallback's). Every method's #selections persist across task iterations (mu2net.selections)."""
        return self.parents == "active"


# The Section 4 baselines as muNet.ipynb / mu2Net.ipynb run them (docs/benchmarks.md §7.1): one child of the root,
# the benchmark defaults never tuned (lr 0.01, cosine warm-up 0.1 from lr/100, crop ≥ 0.05 / aspect 0.75, flip), no
# optimizer state, snapshots on strict improvement.
_BASELINE = dict(space="munet", learned_mu=False, hp_moves=False, parents="root", clone_momentum=False,
                 strict=True, warmup_floor=0.01)

METHODS: dict[str, Method] = {
    "mu2net+": Method(),
    "mu2net+small": Method(space="plus-small", insert_adapters=True),  # μ2Net+ in Section 4 (docs/benchmarks.md §6)
    "mu2net": Method(space="mu2net", learned_mu=False, warmup_floor=0.01),
    "munet": Method(space="munet", learned_mu=False, mu=0.1, insert_adapters=True, parents="active", seeds=True,
                    generation_hp=True, clone_momentum=False, strict=True, warmup_floor=0.01, compute=False),
    "finetune": Method(clone="all", **_BASELINE),  # with clone = "top:K": Freeze bottom layers:K
    "adapters": Method(clone="none", adapter_dim=64, **_BASELINE),  # Adapters:D with adapter_dim = D
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget(train.ChildBudget):
    """Algorithm 1's meta-parameters (#generations, #child-models) and eq. 1's s, P, F, over one child's budget;
    and how many alike children of a generation train as one vectorised program."""

    generations: int = train.at_least_one(4, 10_000)
    children: int = train.at_least_one(8, 4_096)  # a generation's children are sampled and held together
    s: float = train.checked(lambda v: 0 < v <= 1, "a number in (0, 1]", 0.99)
    P: float = train.checked(lambda v: v > 0, "a number > 0 (inf = no penalty)", math.inf)
    F: float = train.checked(lambda v: v > 0, "a number > 0 (inf = no penalty)", math.inf)
    # Children of a generation that share an architecture train as one vectorised program, at most this many
    # together (a power of two; 1: one by one). Not bit-identical to one by one, but a pure function of the key
    # for any device count. bench/child.py measures whether it pays on a device: on a CPU it does not (bench/).
    vectorise: int = train.checked(lambda v: v >= 1 and v & (v - 1) == 0, "a power of two ≥ 1", 1)


@dataclasses.dataclass(frozen=True)
class Config:
    """One task iteration's settings (Sections 4 and 5): the search space, the method and the budget."""

    space: SearchSpace
    method: Method = Method()
    budget: Budget = Budget()

    def score(self, q: float, A: float, Fm: float) -> float:
        """Eq. 1 with the budget's s, P, F (no compute factor when the method has none)."""
        b = self.budget
        return sc.score(q, A, Fm, b.s, b.P, b.F if self.method.compute else math.inf)

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
    return Config(space, m, Budget(**budget))
