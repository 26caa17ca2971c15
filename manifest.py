"""The manifest: a whole continual sequence of experiment segments as TOML (paper Section 5), its schema and its
validation. Every check runs before any work, and a bad field gives one line naming the file, the field path, the
value and what was expected, e.g. `m.toml: segments[0].generations = -2: expected an integer ≥ 1`.

A segment's budget fields are `methods.Budget`'s own (one definition, one check); `segment_config` turns a segment into
the `methods.Config` of its task iterations.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import checkpoint
import data
import methods
import published
import train
import vit

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = "manifests/quickstart.toml"


class ManifestError(ValueError):
    """A manifest is invalid: the message names the file, the field path, the value and what was expected."""


# --- the manifest schema -------------------------------------------------------------------------------------


def _f(default: Any = dataclasses.MISSING, check: Callable[[Any], bool] | None = None, expect: str = "",
       factory: Callable[[], Any] | None = None) -> Any:
    meta = {"check": check, "expect": expect}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _budget(name: str, default: Any) -> Any:
    """A `methods.Budget` field with another default (its check stays the one `Budget` states)."""
    f = {f.name: f for f in dataclasses.fields(methods.Budget)}[name]
    return dataclasses.field(default=default, metadata=f.metadata)


_POS = (lambda v: v >= 1, "an integer ≥ 1")
_ITERATIONS = (lambda v: 1 <= v <= 2**32, "an integer in [1, 2^32] (an iteration index is folded into its key as 32 "
               "bits)")
MAX_RESOLUTION = 4096  # data.MAX_PIXELS's side: no image is read larger
MAX_BATCH_BYTES = 16 << 30  # one batch of float32 images at a segment's largest resolution (Section 5's: 0.9 GB)
# Where each hyperparameter's values must lie (a value off the search space's list moves to its nearest entry;
# one outside these ranges cannot train: a NaN loss, a negative crop, an image larger than any read).
HP_RANGE: dict[str, tuple[float, float]] = {
    "lr": (1e-8, 10.0), "warmup": (0.0, 1.0), "momentum": (0.0, 1.0), "crop_area_min": (1e-3, 1.0),
    "crop_aspect_min": (1e-3, 1.0), "brightness": (0.0, 1.0), "contrast": (0.0, 1.0), "saturation": (0.0, 1.0),
    "hue": (0.0, 0.5), "quality": (0.0, 1.0), "mu": (0.0, 1.0), "resolution": (1, MAX_RESOLUTION),
    "adapter_dim": (1, 65_536), "num_layers": (0, 4096)}
_NONNEG = (lambda v: v >= 0, "an integer ≥ 0")
_NONNEGF = (lambda v: v >= 0, "a number ≥ 0")
_METHOD = (lambda v: v in methods.METHODS, f"a method of methods.METHODS {sorted(methods.METHODS)}")
HP_NAMES = tuple(dict.fromkeys((*methods.TABLE1, *methods.MUNET_VALUES, "num_layers", "mu")))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pretrain(methods.Budget):
    """A random root's pre-training: one task iteration on one task whose best model becomes the root (so the
    root carries knowledge, as the paper's root is pre-trained on ImageNet-21k). `task = ""`: no pre-training.
    By default one full fine-tuning child, ranked by quality alone (s = 1)."""

    task: str = ""
    method: str = _f("finetune", *_METHOD)
    generations: int = _budget("generations", 1)
    children: int = _budget("children", 1)
    cycles: int = _budget("cycles", 1)
    s: float = _budget("s", 1.0)
    hp: Mapping[str, Any] = _f(factory=dict)  # hyperparameters of the pre-training (e.g. a larger lr)


@dataclasses.dataclass(frozen=True)
class Root:
    """Where the system starts. kind: "augreg" (path = an AugReg .npz), "random" (vit config, keyed by the
    manifest seed, optional `pretrain`), "system" (path = a previous run dir: its committed system, all models
    kept; its vit, resolutions, resolution and depth are the run's own, `system_root`), "mu2net_state" (path = the
    authors' published μ2Net state, Section 5's start: its folder, a .zip of it or a gs:// path; published.py).
    `vit = ""` takes the config from the file or the state; a named config must match it."""

    kind: str = _f("random", lambda v: v in ("augreg", "random", "system", "mu2net_state"),
                   "one of 'augreg', 'random', 'system', 'mu2net_state'")
    vit: str = _f("L/16", lambda v: v in vit.CONFIGS or v == "",
                  f"a ViT config of vit.CONFIGS {sorted(vit.CONFIGS)}, or '' (from root.path)")
    path: str = ""
    resolutions: tuple[int, ...] = _f((224, 384), lambda v: len(v) >= 1 and all(0 < r <= MAX_RESOLUTION for r in v),
                                      f"a non-empty list of resolutions in [1, {MAX_RESOLUTION}]")
    resolution: int = _f(0, lambda v: 0 <= v <= MAX_RESOLUTION, f"an integer in [0, {MAX_RESOLUTION}]")  # default
    # resolution of fresh models; 0 = the largest
    depth: int = _f(0, *_NONNEG)  # keep only the first `depth` blocks of the root (0 = all); Section 4's MCCB
    # root is ViT-Ti/16 cut to 3 layers (its normaliser P = 1,484,162 is that model's size)
    hp: Mapping[str, Any] = _f(factory=dict)  # the root model's hyperparameters over Table 1's defaults: every
    # child inherits its parent's values, so these are where a first child of the root starts (e.g. lr)
    pretrain: Pretrain = _f(factory=Pretrain)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment(methods.Budget):
    """One experiment segment (Section 5): a method, iterated over `tasks` `iterations` times, with its budget
    (every field of `methods.Budget`: generations, children, cycles, samples_cap, batch_size, eval_batch, s, P, F,
    trainable_split)."""

    name: str
    tasks: tuple[str, ...] = _f(check=lambda v: len(v) >= 1, expect="a non-empty list of task or set names")
    method: str = _f("mu2net+", *_METHOD)
    iterations: int = _f(1, *_ITERATIONS)
    adapter_dim: int = _f(0, *_NONNEG)  # residual-adapter baseline: inner dim (0 = the method's own)
    clone: str = ""  # fine-tune-top-layers baseline: 'top:K' ('' = the method's own; checked by methods.Method)
    values: Mapping[str, Any] = _f(factory=dict)  # search-space overrides: hyperparameter -> valid values
    defaults: Mapping[str, Any] = _f(factory=dict)  # search-space overrides: hyperparameter -> default
    # Section 5.2: "P and F are set respectively to ~10 times the accounted parameters and inference flops averaged
    # across all the models that are part of the system at the beginning of this experiment segment". A factor
    # > 0 makes the runner compute P (F) as factor × that average, at the start of segments[penalty_segment]
    # (-1: this segment), instead of reading a typed P (F); 0 = the typed value.
    P_factor: float = _f(0.0, *_NONNEGF)
    F_factor: float = _f(0.0, *_NONNEGF)
    penalty_segment: int = _f(-1, lambda v: v >= -1, "-1 (this segment) or the index of a segment")
    # §5.1 runs μ2Net "until sufficient convergence": > 0 ends the segment after the first round of task iterations
    # whose mean over the segment's tasks of (gain in validation accuracy × validation examples) is below this many
    # examples; `iterations` is then the most it runs (0 = always `iterations`).
    until_gain: float = _f(0.0, *_NONNEGF)


@dataclasses.dataclass(frozen=True)
class UserTask:
    """The user's own data: an image folder (PATH/<class>/<img> or PATH/<split>/<class>/<img>), see data.py."""

    folder: str
    num_classes: int = _f(0, *_NONNEG)  # 0 = count the class folders
    splits: Mapping[str, str] = _f(factory=dict)
    skip_bad: bool = False  # skip unreadable images and empty class folders (with a warning) instead of stopping


@dataclasses.dataclass(frozen=True)
class Family:
    """One method family of a Section 4 comparison (a Table 2 row, a Figure 2 series): `set` replaces segment
    fields in every segment (the method and its budget), and each value of `values` is one configuration, set as
    the segment field `vary` (s for μ2Net+ and muNet, clone = 'top:K' for fine-tuning, adapter_dim for adapters)."""

    name: str = _f(check=checkpoint.plain_name, expect="a non-empty name without '/' (a folder name)")
    vary: str = ""  # a [[segments]] field; "" = a single configuration
    values: tuple[Any, ...] = ()
    set: Mapping[str, Any] = _f(factory=dict)
    # The Table 2 / Figure 2 pairs the family is drawn in: "" is the first (comparison.md's `## Table 2`,
    # figure2.png); another name adds a table of its own (figure2-<name>.png), e.g. the same comparison with each
    # family's own preprocessing defaults beside one with equal defaults. A family in several shares its runs.
    tables: tuple[str, ...] = _f(("",), lambda v: len(v) >= 1 and all(t == "" or checkpoint.plain_name(t) for t in v),
                                 "a non-empty list of table names without '/' ('' = the first table)")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Section 4's parallel replicated runs: every (family, configuration, repetition) is a sub-run of its own in
    `<out>/<family>/<vary>=<value>/rep<r>`, repetition r with seed `seed + r`.

    `shared = K` makes it a paired control (Section 5's sequence with arms): the first K segments run once per
    repetition, in `<out>/shared/rep<r>`, and every family's sub-run continues that run's committed system with the
    remaining segments (`root.kind = "system"`), at the same segment indices, hence the same keys. `pairs`: (control,
    arm) family names whose per-repetition differences `paired.md` lists (each family of one configuration)."""

    repetitions: int = _f(1, *_POS)
    families: tuple[Family, ...] = ()
    shared: int = _f(0, *_NONNEG)
    pairs: tuple[tuple[str, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A whole continual sequence. `report_set`: the tasks whose test accuracy is averaged in Figure 3's first
    metric (Section 5: task-set A). `comparison`: Section 4's method families × configurations × repetitions, each
    a sub-run of this manifest (see `runs`)."""

    name: str = _f(check=checkpoint.inside, expect="a relative path without '..' (runs/<name>-seed<seed>)")
    segments: tuple[Segment, ...] = _f(check=lambda v: len(v) >= 1, expect="at least one [[segments]] table")
    seed: int = _f(0, lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)")
    data_dir: str = ""  # "" = TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    catalog: str = ""  # "" = catalog.toml beside data.py
    root: Root = _f(factory=Root)
    tasks: Mapping[str, UserTask] = _f(factory=dict)
    report_set: tuple[str, ...] = ("A",)
    comparison: Comparison = _f(factory=Comparison)
    # The index of segments[0] in the whole sequence: a task iteration's key folds in first_segment + i, so a run
    # that continues another's system (an arm of a paired comparison) draws the keys one uninterrupted run would.
    first_segment: int = _f(0, *_NONNEG)


def _type_name(t: Any) -> str:
    o = typing.get_origin(t)
    if o is tuple:
        return f"a list of {_type_name(typing.get_args(t)[0])}s"
    if o is not None:
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(t, f"a [{t.__name__}] table")


def _convert(v: Any, t: Any, path: str, where: str) -> Any:
    def bad(expect: str) -> ManifestError:
        return ManifestError(f"{where}: {path} = {v!r}: expected {expect}")

    o = typing.get_origin(t)
    if dataclasses.is_dataclass(t):
        if not isinstance(v, Mapping):
            raise bad(_type_name(t))
        return _parse(t, v, path, where)
    if o is tuple:
        if not isinstance(v, (list, tuple)):
            raise bad(_type_name(t))
        return tuple(_convert(x, typing.get_args(t)[0], f"{path}[{i}]", where) for i, x in enumerate(v))
    if o is not None:  # Mapping[str, X]
        if not isinstance(v, Mapping):
            raise bad("a table")
        vt = typing.get_args(t)[1]
        return {str(k): (x if vt is Any else _convert(x, vt, f"{path}.{k}", where)) for k, x in v.items()}
    if t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("a number")
        return float(v)
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
        return v
    if t is str:
        if not isinstance(v, str):
            raise bad("a string")
        return v
    if t is bool:
        if not isinstance(v, bool):
            raise bad("a boolean")
        return v
    if t is Any:
        return v
    raise TypeError(f"unsupported manifest field type {t}")


def _parse(cls: type, raw: Mapping[str, Any], path: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    pre = f"{path}." if path else ""
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(k, list(fields), n=1)
        raise ManifestError(f"{where}: {pre}{k}: unknown key" + (f" (did you mean {near[0]!r}?)" if near else "")
                            + f"; expected one of {sorted(fields)}")
    kw = {}
    for name, f in fields.items():
        p = f"{pre}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{where}: {p}: missing; expected {f.metadata.get('expect') or _type_name(hints[name])}")
            continue
        v = _convert(raw[name], hints[name], p, where)
        check = f.metadata.get("check")
        if check is not None and not check(v):
            raise ManifestError(f"{where}: {p} = {raw[name]!r}: expected {f.metadata['expect']}")
        kw[name] = v
    try:
        return cls(**kw)
    except ValueError as e:  # a check across fields (Budget: micro_batches against batch_size)
        raise ManifestError(f"{where}: {pre}{str(e).removeprefix(cls.__name__ + '.')}") from None


def validate(raw: Mapping[str, Any], where: str = "manifest") -> Manifest:
    """Raw TOML → Manifest, every check done before any work: types, ranges, unknown keys, task and set names
    (against the catalog, no data read), methods, ViT configs, resolutions and search-space overrides."""
    m = system_root(_parse(Manifest, raw, "", where), raw.get("root", {}), where)
    cat = m.catalog or None
    try:
        known = data.load_catalog(cat)
        sets = data.load_sets(cat)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{where}: catalog = {m.catalog!r}: {e}") from None
    for name, t in m.tasks.items():
        if name in known:
            raise ManifestError(f"{where}: tasks.{name}: a catalog task has this name; pick another")
        if not t.folder:
            raise ManifestError(f"{where}: tasks.{name}.folder = '': expected an image folder path")

    def check_names(names: Sequence[str], path: str) -> None:
        for i, n in enumerate(names):
            key = n[1:] if n.startswith("@") else n
            if n in m.tasks or n in known or key in sets:
                continue
            near = difflib.get_close_matches(key, list(known) + list(sets) + list(m.tasks), n=3)
            raise ManifestError(f"{where}: {path}[{i}] = {n!r}: expected a task or set name of the catalog or of "
                                f"[tasks]" + (f" (did you mean {near}?)" if near else ""))

    check_names(m.report_set, "report_set")
    r = m.root
    _check_hp(r.hp, "root.hp", where, values=False)
    if r.pretrain.task:
        check_names([r.pretrain.task], "root.pretrain.task")
        _check_hp(r.pretrain.hp, "root.pretrain.hp", where, values=False)
    cfg = _check_root_table(r, where)
    for i, s in enumerate(m.segments):
        check_names(s.tasks, f"segments[{i}].tasks")
        _check_hp(s.values, f"segments[{i}].values", where, values=True)
        _check_hp(s.defaults, f"segments[{i}].defaults", where, values=False)
        c = segment_config(m, s, r.depth or (cfg.depth if cfg else 1), f"{where}: segments[{i}]")
        bad = [res for res in c.resolutions() if cfg and res % cfg.patch]
        if bad:
            raise ManifestError(f"{where}: segments[{i}]: resolution {bad[0]} of method {s.method!r} (its search "
                                f"space or values.resolution) is not a multiple of the patch size {cfg.patch}")
        _check_penalties(m, i, where)
        _check_start(m, i, c, where)
    if r.pretrain.task:
        segment_config(m, r.pretrain, r.depth or cfg.depth, f"{where}: root.pretrain")
    _check_comparison(m, raw, where)
    return m


def check_root(m: Manifest, cfg: vit.Config) -> None:
    """A system read from root.path must be the ViT the manifest names, at resolutions its patch divides."""
    r = m.root
    if r.vit and vit.CONFIGS[r.vit] != cfg:
        raise ManifestError(f"root.vit = {r.vit!r} ({vit.CONFIGS[r.vit]}) but the system at root.path = {r.path!r} "
                            f"is a {cfg}; set root.vit = '' to take it from the file")
    for i, res in enumerate(r.resolutions):
        if res % cfg.patch:
            raise ManifestError(f"root.resolutions[{i}] = {res}: expected a multiple of the patch size {cfg.patch} "
                                f"of the system at root.path = {r.path!r}")


def _check_root_table(r: Root, where: str) -> vit.Config | None:
    """[root]: a path where one is read, pre-training on random roots only, a config, its depth and resolutions."""
    if r.kind in ("augreg", "system", "mu2net_state") and not r.path:
        raise ManifestError(f"{where}: root.path = '': expected a path (root.kind = {r.kind!r})")
    if r.kind != "random" and r.pretrain.task:
        raise ManifestError(f"{where}: root.pretrain.task = {r.pretrain.task!r}: expected '' (pre-training applies "
                            f"to root.kind = 'random' only)")
    if not r.vit and r.kind == "random":
        raise ManifestError(f"{where}: root.vit = '': expected a ViT config of vit.CONFIGS {sorted(vit.CONFIGS)} "
                            f"(root.kind = 'random' has no file to take it from)")
    if r.kind == "mu2net_state" and r.depth:
        raise ManifestError(f"{where}: root.depth = {r.depth}: expected 0 (root.kind = {r.kind!r} keeps its models)")
    cfg = root_config(r, where)
    if r.kind == "mu2net_state" and "://" not in r.path and Path(r.path).expanduser().exists():
        try:  # its population table now, before any work; the checkpoint is read when the run starts
            published.population(str(Path(r.path).expanduser()))
        except published.StateError as e:
            raise ManifestError(f"{where}: root.path = {r.path!r}: {e}") from None
    name = f"ViT {r.vit!r}" if r.vit else f"the ViT of {r.path}"
    if cfg is not None and r.depth > cfg.depth:
        raise ManifestError(f"{where}: root.depth = {r.depth}: expected 0 or at most the {cfg.depth} blocks of {name}")
    patch = cfg.patch if cfg is not None else 1  # unknown until the state is read: build_root checks it then
    for i, res in enumerate(r.resolutions):
        if res % patch:
            raise ManifestError(f"{where}: root.resolutions[{i}] = {res}: expected a multiple of the patch size "
                                f"{patch} of {name}")
    if r.resolution and r.resolution not in r.resolutions:
        raise ManifestError(f"{where}: root.resolution = {r.resolution}: expected 0 or one of root.resolutions "
                            f"{list(r.resolutions)}")
    return cfg


def _check_comparison(m: Manifest, raw: Mapping[str, Any], where: str) -> None:
    """[comparison]: unique family names, `vary` and `set` name segment fields, and every sub-run validates."""
    seg_fields = {f.name for f in dataclasses.fields(Segment)} - {"name", "tasks"}
    names = [f.name for f in m.comparison.families]
    for i, fam in enumerate(m.comparison.families):
        path = f"{where}: comparison.families[{i}]"
        if names.index(fam.name) != i:
            raise ManifestError(f"{path}.name = {fam.name!r}: expected a name no other family has")
        if fam.vary and fam.vary not in seg_fields:
            raise ManifestError(f"{path}.vary = {fam.vary!r}: expected a [[segments]] field, one of "
                                f"{sorted(seg_fields)}")
        if bool(fam.vary) != bool(fam.values):
            raise ManifestError(f"{path}: vary = {fam.vary!r} with values = {list(fam.values)}: expected both or "
                                f"neither")
        for k in fam.set:
            if k not in seg_fields:
                raise ManifestError(f"{path}.set.{k}: unknown segment field; expected one of {sorted(seg_fields)}")
    _check_arms(m, where)
    if m.comparison.families:
        runs(m, raw, where)  # each sub-run validated as a manifest of its own


def _check_arms(m: Manifest, where: str) -> None:
    """comparison.shared leaves every family at least one segment, none measuring P / F at a shared segment's start;
    comparison.pairs name two families of one configuration each."""
    c, fams = m.comparison, {f.name: f for f in m.comparison.families}
    if c.shared and not (c.families and c.shared < len(m.segments)):
        raise ManifestError(f"{where}: comparison.shared = {c.shared}: expected fewer than the {len(m.segments)} "
                            f"segments, with families to continue them")
    for i, s in enumerate(m.segments[c.shared:], c.shared):
        if 0 <= s.penalty_segment < c.shared:
            raise ManifestError(f"{where}: segments[{i}].penalty_segment = {s.penalty_segment}: expected -1 or an "
                                f"index ≥ comparison.shared = {c.shared} (the families start at segments[{c.shared}])")
    for i, pair in enumerate(c.pairs):
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(fams):
            raise ManifestError(f"{where}: comparison.pairs[{i}] = {list(pair)}: expected [control, arm], two "
                                f"different family names of {list(fams)}")
        for n in pair:
            if len(fams[n].values) > 1:
                raise ManifestError(f"{where}: comparison.pairs[{i}]: family {n!r} has {len(fams[n].values)} "
                                    f"configurations; expected one (a pair compares one run per repetition)")


SHAPE = ("vit", "resolutions", "resolution", "depth")  # what a system root takes from the run it continues


def system_root(m: Manifest, given: Mapping[str, Any], where: str = "manifest") -> Manifest:
    """root.kind = "system": the root's vit, resolutions, resolution and depth become those of the run at
    root.path (its resolved manifest and system, `checkpoint.shape`), so its models go on at their own size. One
    the manifest gives (`given`: its [root] table) must agree, else a ManifestError names the field, the value and
    the run's. A run not readable here (not yet there: `evolve.run` says so) leaves the fields as written."""
    r = m.root
    if r.kind != "system" or not r.path or "://" in r.path:
        return m
    try:
        if not checkpoint.exists(Path(r.path).expanduser()):
            return m
        cfg, extra = checkpoint.shape(Path(r.path).expanduser())
    except checkpoint.CheckpointError as e:
        raise ManifestError(f"{where}: root.path = {r.path!r}: {e}") from None
    prev = (extra.get("manifest") or {}).get("root")
    if not isinstance(prev, Mapping):
        raise ManifestError(f"{where}: root.path = {r.path!r}: its checkpoint records no manifest, so its "
                            f"resolutions are unknown; expected the run directory of evolve.py")
    run = {"vit": prev.get("vit", ""), "resolutions": tuple(prev.get("resolutions", ())),
           "resolution": prev.get("resolution", 0), "depth": cfg.depth}
    here = f"the run at root.path = {r.path!r} has"
    for k in SHAPE:
        if k not in given:
            continue
        v, theirs = getattr(r, k), run[k]
        if k == "vit" and v and dataclasses.replace(vit.CONFIGS[v], depth=cfg.depth) != cfg:  # depth on its own
            raise ManifestError(f"{where}: root.vit = {v!r} ({vit.CONFIGS[v]}): {here} a {cfg}; leave root.vit "
                                f"out to take it from there")
        if k == "resolutions" and v != theirs:
            raise ManifestError(f"{where}: root.resolutions = {list(v)}: {here} {list(theirs)}; leave "
                                f"root.resolutions out to take them from there")
        if k == "depth" and v and v != theirs:
            raise ManifestError(f"{where}: root.depth = {v}: {here} {theirs} blocks; expected 0 or {theirs}")
    fill = {k: run[k] for k in SHAPE if k not in given}
    return dataclasses.replace(m, root=dataclasses.replace(r, **fill))


def root_config(r: Root, where: str = "manifest") -> vit.Config | None:
    """The root's full ViT config: the named one, else read from the AugReg file's array headers or the previous
    run's checkpoint; None when only the file or state at root.path can tell and it is not read yet (a published
    state, a run not here)."""
    if r.vit:
        return vit.CONFIGS[r.vit]
    if r.kind == "augreg" and Path(r.path).expanduser().is_file():
        try:
            return vit.augreg_config(Path(r.path).expanduser())
        except ValueError as e:
            raise ManifestError(f"{where}: root.path = {r.path!r}: {e}") from None
    if r.kind == "system" and "://" not in r.path and checkpoint.exists(Path(r.path).expanduser()):
        return checkpoint.shape(Path(r.path).expanduser())[0]
    return None


def _check_penalties(m: Manifest, i: int, where: str) -> None:
    """P_factor / F_factor: not beside a typed P / F, and measured at the start of this or an earlier segment
    that has models (the first segment's start has none, unless the root is a previous run's system)."""
    s = m.segments[i]
    for name in ("P", "F"):
        if getattr(s, f"{name}_factor") and getattr(s, name) != math.inf:
            raise ManifestError(f"{where}: segments[{i}].{name} = {getattr(s, name)!r}: expected no {name} beside "
                                f"{name}_factor = {getattr(s, f'{name}_factor')!r} (the runner computes it)")
    at = i if s.penalty_segment < 0 else s.penalty_segment
    if s.penalty_segment > i:
        raise ManifestError(f"{where}: segments[{i}].penalty_segment = {s.penalty_segment}: expected -1 or a segment "
                            f"index ≤ {i} (the averages are taken at a segment's start)")
    if (s.P_factor or s.F_factor) and at == 0 and m.root.kind != "system":
        raise ManifestError(f"{where}: segments[{i}].P_factor/F_factor = {s.P_factor!r}/{s.F_factor!r}: expected 0 "
                            f"when the averages would be taken at the first segment's start, where the system has no "
                            f"models yet (root.kind = {m.root.kind!r})")


def penalties(seg: Segment, index: int, starts: Sequence[Mapping[str, Any]]) -> Segment:
    """The segment with P and F as §5.2 sets them when it asks for factors: factor × the average accounted
    parameters (FLOPs) over the system's models at the start of segments[penalty_segment] (this one by default).
    `starts[k]` is the summary of the system at segment k's start (`report.summary`: "params", "flops")."""
    if not (seg.P_factor or seg.F_factor):
        return seg
    k = index if seg.penalty_segment < 0 else seg.penalty_segment
    start = starts[k]
    out = {}
    for name, avg in (("P", "params"), ("F", "flops")):
        f = getattr(seg, f"{name}_factor")
        if f:
            if not start[avg] > 0:
                raise ManifestError(f"segments[{index}].{name}_factor = {f!r}: the system at the start of segments[{k}] "
                                    f"has no models to average ({avg} = {start[avg]!r})")
            out[name] = f * float(start[avg])
    return dataclasses.replace(seg, **out)


def _check_hp(d: Mapping[str, Any], path: str, where: str, values: bool) -> None:
    """Hyperparameters (root.hp, a segment's `defaults`, each entry of its `values`): known names, each value of
    its kind and inside `HP_RANGE`."""
    for k, v in d.items():
        if k not in HP_NAMES:
            raise ManifestError(f"{where}: {path}.{k}: unknown hyperparameter; expected one of {list(HP_NAMES)}")
        if values and (not isinstance(v, (list, tuple)) or not v):
            raise ManifestError(f"{where}: {path}.{k} = {v!r}: expected a non-empty list of values")
        for i, x in enumerate(v if values else [v]):
            at = f"{path}.{k}" + (f"[{i}]" if values else "")
            if k == "schedule" and x not in train.SCHEDULES:
                raise ManifestError(f"{where}: {at} = {x!r}: expected one of {list(train.SCHEDULES)}")
            if k != "schedule" and not isinstance(x, (int, float, bool)):
                raise ManifestError(f"{where}: {at} = {x!r}: expected a number or boolean")
            lo, hi = HP_RANGE.get(k, (-math.inf, math.inf))
            if k != "schedule" and not lo <= x <= hi:
                raise ManifestError(f"{where}: {at} = {x!r}: expected a number in [{lo:g}, {hi:g}]")


def _check_start(m: Manifest, i: int, c: methods.Config, where: str) -> None:
    """What a segment's children start from and reach must be in its search space: the root's hyperparameters'
    resolution (the input pipeline provides only `c.resolutions()`), and one batch at its largest resolution
    within MAX_BATCH_BYTES."""
    res = m.root.hp.get("resolution")
    if res is not None and m.root.kind in ("random", "augreg") and res not in c.resolutions():
        raise ManifestError(f"{where}: root.hp.resolution = {res!r}: expected one of segments[{i}]'s resolutions "
                            f"{list(c.resolutions())} (its search space)")
    b, top = c.budget, max(c.resolutions())
    for f in ("batch_size", "eval_batch"):
        n = getattr(b, f) * top * top * 3 * 4
        if n > MAX_BATCH_BYTES:
            raise ManifestError(f"{where}: segments[{i}].{f} = {getattr(b, f)}: one batch at resolution {top} is "
                                f"{n / 2**30:.1f} GiB of float32 images; expected at most {MAX_BATCH_BYTES >> 30} GiB")


def to_dict(m: Any) -> Any:
    """A manifest as plain data (tuples → lists): what is saved with the run and compared on resume."""
    if dataclasses.is_dataclass(m):
        return {f.name: to_dict(getattr(m, f.name)) for f in dataclasses.fields(m)}
    if isinstance(m, Mapping):
        return {k: to_dict(v) for k, v in m.items()}
    if isinstance(m, (list, tuple)):
        return [to_dict(v) for v in m]
    return m


def parse_override(text: str) -> tuple[list[str], Any]:
    """`segments.0.generations=2` → (['segments', '0', 'generations'], 2); the value is read as TOML when it
    parses (numbers, booleans, lists, quoted strings), else taken as a bare string."""
    if "=" not in text:
        raise ManifestError(f"--set {text!r}: expected FIELD.PATH=VALUE")
    k, v = text.split("=", 1)
    try:
        val = tomllib.loads(f"v = {v}")["v"]
    except tomllib.TOMLDecodeError:
        val = v
    except RecursionError:
        raise ManifestError(f"--set {text[:80]!r}: arrays or tables nested too deeply") from None
    return k.strip().split("."), val


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Dotted CLI overrides applied to the raw TOML before validation, so they are checked like the file."""
    for o in overrides:
        path, val = parse_override(o)
        node: Any = raw
        for i, k in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise ManifestError(f"--set {o!r}: {'.'.join(path[:i])} has {len(node)} entries; {k!r} is not "
                                        f"an index of it")
                k = int(k)
            elif not isinstance(node, dict):
                raise ManifestError(f"--set {o!r}: {'.'.join(path[:i])} is not a table")
            if last:
                node[k] = val
            else:
                if isinstance(node, dict) and k not in node:
                    node[k] = {}
                node = node[k]
    return raw


def load_manifest(path: str | os.PathLike, overrides: Sequence[str] = (), seed: int | None = None) -> Manifest:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (HERE / p).exists():
        p = HERE / p
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ManifestError(f"manifest {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{p}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ManifestError(f"{p}: not valid TOML here: arrays or tables nested too deeply") from None
    raw = apply_overrides(raw, overrides)
    if seed is not None:
        raw["seed"] = seed
    where = str(p) + (" (with --set overrides)" if overrides else "")
    return validate(raw, where)


# --- from manifest to mu2net ---------------------------------------------------------------------------------

Cursor = tuple[int, int, int]  # (segment, iteration, task index): the next task iteration to run


def iteration_key(seed: int, segment: int, iteration: int, task: int) -> jax.Array:
    """The key of one task iteration: a fold-in chain of its coordinates, so no RNG state is carried."""
    k = jax.random.key(seed)
    for i in (segment, iteration, task):
        k = jax.random.fold_in(k, i)
    return k


def task_key(m: Manifest, cursor: Cursor) -> jax.Array:
    """The key of the task iteration at `cursor`, its segment counted in the whole sequence (`first_segment`): the
    arms of a paired comparison draw the keys one run of the whole sequence would."""
    return iteration_key(m.seed, m.first_segment + cursor[0], cursor[1], cursor[2])


def key_data(k: jax.Array) -> list[int]:
    return [int(x) for x in jax.random.key_data(k).reshape(-1)]


def round_end(seg: Segment, iteration: int, gains: Sequence[float]) -> dict[str, Any]:
    """How a round of task iterations ended: rounds run, the mean gain (validation examples) over its tasks, and
    whether that is below the segment's `until_gain` (§5.1's "until sufficient convergence")."""
    mean = sum(gains) / len(gains)
    return dict(iterations=iteration + 1, gain=mean, converged=bool(seg.until_gain) and mean < seg.until_gain)



@dataclasses.dataclass(frozen=True)
class SubRun:
    """One (family, configuration, repetition) of a comparison, or the one run of a plain manifest (path "")."""

    path: str
    manifest: Manifest
    family: str = ""
    config: str = ""
    value: Any = None
    repetition: int = 0
    tables: tuple[str, ...] = ("",)
    shared: str = ""  # the sub-run whose committed system this one continues (comparison.shared)

    def info(self) -> dict[str, Any]:
        """What a sub-run's `comparison.json` records for Table 2 and Figure 2 (report.sub_runs)."""
        return dict(family=self.family, config=self.config, value=self.value, repetition=self.repetition,
                    tables=list(self.tables))


def _label(vary: str, value: Any) -> str:
    return f"{vary}={value:g}" if isinstance(value, float) else f"{vary}={value}" if vary else "default"


def runs(m: Manifest, raw: Mapping[str, Any] | None = None, where: str = "manifest", out: str = "<out>"
         ) -> list[SubRun]:
    """The runs a manifest asks for: itself, or one per (family, configuration, repetition) of its comparison,
    each a manifest without a comparison, validated like a file (`where` names the sub-run in errors), repetition
    by repetition, so that a sweep stopped early has every configuration at the same number of repetitions. With
    `comparison.shared = K`, repetition r runs `shared/rep<r>` (the first K segments) before its families' sub-runs,
    each of which continues that run's system in `out` (`_continuing`)."""
    c = m.comparison
    if not c.families:
        return [SubRun("", m)]
    base = dict(to_dict(m) if raw is None else raw)
    base.pop("comparison", None)
    segs, k = list(base["segments"]), c.shared
    grid = [(fam, value) for fam in c.families for value in fam.values or (None,)]
    order = [(g, r) for r in range(c.repetitions) for g in ([None] if k else []) + grid]
    subs = []
    for g, r in order:
        shared = f"shared/rep{r}" if k else ""
        if g is None:
            sub = dict(base, seed=m.seed + r, name=f"{m.name}/{shared}", segments=segs[:k])
            subs.append(SubRun(shared, validate(sub, f"{where} (comparison, {shared})"), repetition=r))
            continue
        fam, value = g
        label = _label(fam.vary, value)
        patch = dict(fam.set) | ({fam.vary: value} if fam.vary else {})
        sub = dict(base, seed=m.seed + r, name=f"{m.name}/{fam.name}/{label}/rep{r}",
                   segments=[dict(s) | patch for s in segs[k:]])
        if k:
            sub |= _continuing(m, sub["segments"], f"{out}/{shared}")
        mm = validate(sub, f"{where} (comparison {fam.name}, {label}, repetition {r})")
        subs.append(SubRun(f"{fam.name}/{label}/rep{r}", mm, fam.name, label, value, r, fam.tables, shared))
    return subs


def _continuing(m: Manifest, segments: list[dict], path: str) -> dict[str, Any]:
    """What an arm of a paired comparison replaces: its root is the shared run's committed system at `path` (at the
    root's own shape, SHAPE), its segments keep their indices in the whole sequence (`first_segment`, and
    penalty_segment counted from the arm's first)."""
    k = m.comparison.shared
    for s in segments:
        if s.get("penalty_segment", -1) >= k:
            s["penalty_segment"] -= k
    shape = {f: list(v) if isinstance(v := getattr(m.root, f), tuple) else v for f in SHAPE}
    return dict(root=dict(kind="system", path=path, **shape), first_segment=m.first_segment + k)


def task_names(m: Manifest, names: Sequence[str]) -> list[str]:
    """Task names in order (sets expanded, duplicates dropped); user tasks by their own names."""
    out: dict[str, None] = {}
    for n in names:
        if n in m.tasks:
            out[n] = None
        else:
            for s in data.resolve_tasks([n], m.catalog or None):
                out.setdefault(s.name, None)
    return list(out)


def segment_tasks(m: Manifest, seg: Segment) -> list[str]:
    return task_names(m, seg.tasks)


def report_tasks(m: Manifest) -> list[str]:
    return task_names(m, m.report_set)


def image_size(m: Manifest) -> int:
    """S: the largest resolution the run can use (data.py resizes every image to it once, on the host): the
    root's, and every one a segment's method can reach (muNet's and μ2Net+'s small-benchmark spaces carry their
    own image-size lists)."""
    cfg = root_config(m.root)
    depth = m.root.depth or (cfg.depth if cfg else 1)  # image sizes do not depend on it
    segs = [*m.segments, *([m.root.pretrain] if m.root.pretrain.task else [])]
    return max([*m.root.resolutions, *(r for s in segs for r in segment_config(m, s, depth).resolutions())])


def segment_config(m: Manifest, seg: Segment | Pretrain, depth: int, where: str = "manifest") -> methods.Config:
    """A segment (or the pre-training) → `methods.Config`: its method's complete setting with the segment's
    adapter and clone overrides, the root's Table 1 search space with the segment's overrides, and every
    `methods.Budget` field as it stands. An invalid combination raises ManifestError naming the field."""
    method = methods.METHODS[seg.method]
    try:
        if getattr(seg, "adapter_dim", 0):
            method = dataclasses.replace(method, adapter_dim=seg.adapter_dim)
        if getattr(seg, "clone", ""):
            method = dataclasses.replace(method, clone=seg.clone)
    except ValueError as e:
        raise ManifestError(f"{where}.{str(e).removeprefix('Method.')}") from None
    budget = {f.name: getattr(seg, f.name) for f in dataclasses.fields(methods.Budget)}
    return methods.config(method, depth, m.root.resolutions, m.root.resolution or None,
                         getattr(seg, "values", None), getattr(seg, "defaults", None), **budget)


# --- a manifest's tasks, and its stored form -----------------------------------------------------------------


class Tasks:
    """TaskData by name, opened on first use (one run's cache; never module state), and the class names and image
    size of every task opened (kept with the run's checkpoint, for `predict` and `export`)."""

    def __init__(self, m: Manifest, stream: Any = sys.stderr):
        self.m, self.size, self.open, self.stream = m, image_size(m), {}, stream
        self.classes: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}  # S of each task: its images' own size or the run's (data.native_size)

    def __call__(self, name: str) -> train.TaskData:
        if name not in self.open:
            m = self.m
            if name in m.tasks:
                u = m.tasks[name]
                spec = data.folder_task(u.folder, name, u.num_classes or None, dict(u.splits) or None, u.skip_bad,
                                        lambda msg: print(msg, file=self.stream, flush=True))
            else:
                spec = data.resolve_tasks([name], m.catalog or None)[0]
            self.open[name] = data.make_task_data(spec, self.size, m.data_dir or None)
            self.classes[name] = data.class_names(spec, m.data_dir or None)
            self.sizes[name] = self.open[name].image_size
        return self.open[name]


def check_data(m: Manifest, tasks: Tasks) -> set[str]:
    """Before any work: every TFDS dataset the run reads must be prepared (data.check_prepared: one error listing
    the missing ones and the command that prepares them), and every image folder task is opened, which decodes
    each of its images (data.folder_task). Returns the tasks the catalog marks unavailable; the run leaves them
    out."""
    written = [n for s in m.segments for n in s.tasks] + ([m.root.pretrain.task] if m.root.pretrain.task else [])
    catalog = list(dict.fromkeys(n for n in written if n not in m.tasks))
    unavailable = set(data.check_prepared(data.resolve_tasks(catalog, m.catalog or None), m.data_dir or None,
                                          catalog))
    for name in task_names(m, written):
        if name in m.tasks:
            tasks(name)
    return unavailable


def readable_tasks(m: Manifest, tasks: Tasks, stream: Any) -> list[list[str]]:
    """Each segment's tasks, less those the catalog marks unavailable (with a warning); the data is checked first."""
    unavailable = check_data(m, tasks)
    names = [[t for t in segment_tasks(m, s) if t not in unavailable] for s in m.segments]
    if unavailable:
        print(f"warning: left out {len(unavailable)} task(s) the catalog marks unavailable (no TFDS builder can "
              f"prepare them): {', '.join(sorted(unavailable))}", file=stream, flush=True)
    for i, n in enumerate(names):
        if not n:
            raise ManifestError(f"segments[{i}].tasks = {list(m.segments[i].tasks)}: no task left that can be read")
    return names


def resolved(m: Manifest) -> dict:
    """The manifest as its checkpoint stores it: a JSON round trip, so floats like inf and tuples compare as
    stored."""
    return json.loads(json.dumps(to_dict(m)))


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where a resumed run's stored manifest (`a`) and today's (`b`) differ, one line per field."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: checkpoint {a!r} vs now {b!r}"]
