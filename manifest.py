"""The manifest: a whole continual sequence of experiment segments as TOML (paper Section 5), its schema and its
validation. Every check runs before any work, and a bad field gives one line naming the file, the field path, the
value and what was expected, e.g. `m.toml: segments[0].generations = -2: expected an integer ≥ 1`.

A segment's budget fields are `mu2net.Budget`'s own (one definition, one check); `config` turns a segment into the
`mu2net.Config` of its task iterations.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import data
import mu2net
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
    """A `mu2net.Budget` field with another default (its check stays the one `Budget` states)."""
    f = {f.name: f for f in dataclasses.fields(mu2net.Budget)}[name]
    return dataclasses.field(default=default, metadata=f.metadata)


_POS = (lambda v: v >= 1, "an integer ≥ 1")
_NONNEG = (lambda v: v >= 0, "an integer ≥ 0")
_METHOD = (lambda v: v in mu2net.METHODS, f"a method of mu2net.METHODS {sorted(mu2net.METHODS)}")
HP_NAMES = tuple(dict.fromkeys((*mu2net.TABLE1, *mu2net.MUNET_VALUES, "num_layers", "mu")))
SWEEPS = ("s", "clone", "adapter_dim")  # Section 4's trade-off knobs: s (μ2Net+, muNet), k (fine-tuning), D (adapters)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pretrain(mu2net.Budget):
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
    """Where the system starts. kind: "augreg" (path = AugReg .npz of `vit`), "random" (vit config, keyed by the
    manifest seed, optional `pretrain`), "system" (path = a previous run dir: its committed system, all models
    kept), "mu2net_state" (the authors' published μ2Net system, Section 5's start; reader not implemented yet)."""

    kind: str = _f("random", lambda v: v in ("augreg", "random", "system", "mu2net_state"),
                   "one of 'augreg', 'random', 'system', 'mu2net_state'")
    vit: str = _f("L/16", lambda v: v in vit.CONFIGS, f"a ViT config of vit.CONFIGS {sorted(vit.CONFIGS)}")
    path: str = ""
    resolutions: tuple[int, ...] = _f((224, 384), lambda v: len(v) >= 1 and all(r > 0 for r in v),
                                      "a non-empty list of positive resolutions")
    resolution: int = _f(0, *_NONNEG)  # default resolution of fresh models; 0 = the largest
    depth: int = _f(0, *_NONNEG)  # keep only the first `depth` blocks of the root (0 = all); Section 4's MCCB
    # root is ViT-Ti/16 cut to 3 layers (its normaliser P = 1,484,162 is that model's size)
    hp: Mapping[str, Any] = _f(factory=dict)  # the root model's hyperparameters over Table 1's defaults: every
    # child inherits its parent's values, so these are where a first child of the root starts (e.g. lr)
    pretrain: Pretrain = _f(factory=Pretrain)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment(mu2net.Budget):
    """One experiment segment (Section 5): a method, iterated over `tasks` `iterations` times, with its budget
    (every field of `mu2net.Budget`: generations, children, cycles, samples_cap, batch_size, eval_batch, s, P, F,
    trainable_split)."""

    name: str
    tasks: tuple[str, ...] = _f(check=lambda v: len(v) >= 1, expect="a non-empty list of task or set names")
    method: str = _f("mu2net+", *_METHOD)
    iterations: int = _f(1, *_POS)
    adapter_dim: int = _f(0, *_NONNEG)  # residual-adapter baseline: inner dim (0 = the method's own)
    clone: str = ""  # fine-tune-top-layers baseline: 'top:K' ('' = the method's own; checked by mu2net.Method)
    values: Mapping[str, Any] = _f(factory=dict)  # search-space overrides: hyperparameter -> valid values
    defaults: Mapping[str, Any] = _f(factory=dict)  # search-space overrides: hyperparameter -> default


@dataclasses.dataclass(frozen=True)
class UserTask:
    """The user's own data: an image folder (PATH/<class>/<img> or PATH/<split>/<class>/<img>), see data.py."""

    folder: str
    num_classes: int = _f(0, *_NONNEG)  # 0 = count the class folders
    splits: Mapping[str, str] = _f(factory=dict)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A whole continual sequence. `report_set`: the tasks whose test accuracy is averaged in Figure 3's first
    metric (Section 5: task-set A). `sweep`: Section 4 runs one experiment per value of a trade-off knob, e.g.
    `sweep = { s = [0.02, 0.3] }` (or `clone = ["all", "top:1"]`, `adapter_dim = [8, 16]`); the runner then runs
    one sub-run per value in `<out>/<field>=<value>`, each with that field of every segment replaced."""

    name: str
    segments: tuple[Segment, ...] = _f(check=lambda v: len(v) >= 1, expect="at least one [[segments]] table")
    seed: int = _f(0, lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)")
    data_dir: str = ""  # "" = TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    catalog: str = ""  # "" = catalog.toml beside data.py
    root: Root = _f(factory=Root)
    tasks: Mapping[str, UserTask] = _f(factory=dict)
    report_set: tuple[str, ...] = ("A",)
    sweep: Mapping[str, Any] = _f(factory=dict, check=lambda v: len(v) <= 1 and set(v) <= set(SWEEPS) and all(
        isinstance(x, list) and x for x in v.values()), expect=f"one of {list(SWEEPS)} with a non-empty list of values")


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
    return cls(**kw)


def validate(raw: Mapping[str, Any], where: str = "manifest") -> Manifest:
    """Raw TOML → Manifest, every check done before any work: types, ranges, unknown keys, task and set names
    (against the catalog, no data read), methods, ViT configs, resolutions and search-space overrides."""
    m = _parse(Manifest, raw, "", where)
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
    if r.kind in ("augreg", "system", "mu2net_state") and not r.path:
        raise ManifestError(f"{where}: root.path = '': expected a path (root.kind = {r.kind!r})")
    if r.kind != "random" and r.pretrain.task:
        raise ManifestError(f"{where}: root.pretrain.task = {r.pretrain.task!r}: expected '' (pre-training applies "
                            f"to root.kind = 'random' only)")
    patch = vit.CONFIGS[r.vit].patch
    if r.depth > vit.CONFIGS[r.vit].depth:
        raise ManifestError(f"{where}: root.depth = {r.depth}: expected 0 or at most the {vit.CONFIGS[r.vit].depth} "
                            f"blocks of ViT {r.vit!r}")
    for i, res in enumerate(r.resolutions):
        if res % patch:
            raise ManifestError(f"{where}: root.resolutions[{i}] = {res}: expected a multiple of the patch size "
                                f"{patch} of ViT {r.vit!r}")
    if r.resolution and r.resolution not in r.resolutions:
        raise ManifestError(f"{where}: root.resolution = {r.resolution}: expected 0 or one of root.resolutions "
                            f"{list(r.resolutions)}")
    for i, s in enumerate(m.segments):
        check_names(s.tasks, f"segments[{i}].tasks")
        _check_hp(s.values, f"segments[{i}].values", where, values=True)
        _check_hp(s.defaults, f"segments[{i}].defaults", where, values=False)
    for _, mm in sweep(m, where):
        for i, s in enumerate(mm.segments):
            c = config(mm, s, r.depth or vit.CONFIGS[r.vit].depth, f"{where}: segments[{i}]")
            bad = [res for res in c.resolutions() if res % patch]
            if bad:
                raise ManifestError(f"{where}: segments[{i}]: resolution {bad[0]} of method {s.method!r} (its search "
                                    f"space or values.resolution) is not a multiple of the patch size {patch}")
    if r.pretrain.task:
        config(m, r.pretrain, r.depth or vit.CONFIGS[r.vit].depth, f"{where}: root.pretrain")
    return m


def _check_hp(d: Mapping[str, Any], path: str, where: str, values: bool) -> None:
    for k, v in d.items():
        if k not in HP_NAMES:
            raise ManifestError(f"{where}: {path}.{k}: unknown hyperparameter; expected one of {list(HP_NAMES)}")
        if values and (not isinstance(v, (list, tuple)) or not v):
            raise ManifestError(f"{where}: {path}.{k} = {v!r}: expected a non-empty list of values")
        if not values and k == "schedule" and v not in train.SCHEDULES:
            raise ManifestError(f"{where}: {path}.{k} = {v!r}: expected one of {list(train.SCHEDULES)}")
        if not values and k != "schedule" and not isinstance(v, (int, float, bool)):
            raise ManifestError(f"{where}: {path}.{k} = {v!r}: expected a number or boolean")


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
    raw = apply_overrides(raw, overrides)
    if seed is not None:
        raw["seed"] = seed
    where = str(p) + (" (with --set overrides)" if overrides else "")
    return validate(raw, where)


# --- from manifest to mu2net ---------------------------------------------------------------------------------


def sweep(m: Manifest, where: str = "manifest") -> list[tuple[str, Manifest]]:
    """Section 4's trade-off sweep: (sub-directory `<field>=<value>`, manifest with that field of every segment
    replaced) per value, or one plain run. Each value is checked like the segment field it replaces."""
    if not m.sweep:
        return [("", m)]
    ((name, vals),) = m.sweep.items()
    field = {f.name: f for f in dataclasses.fields(Segment)}[name]
    out = []
    for i, v in enumerate(vals):
        path = f"sweep.{name}[{i}]"
        v = _convert(v, typing.get_type_hints(Segment)[name], path, where)
        check = field.metadata.get("check")
        if check is not None and not check(v):
            raise ManifestError(f"{where}: {path} = {v!r}: expected {field.metadata['expect']}")
        sub = f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}"
        out.append((sub, dataclasses.replace(m, sweep={}, segments=tuple(
            dataclasses.replace(seg, **{name: v}) for seg in m.segments))))
    return out


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
    depth = m.root.depth or vit.CONFIGS[m.root.vit].depth
    segs = [(mm, s) for _, mm in sweep(m) for s in mm.segments]
    segs += [(m, m.root.pretrain)] if m.root.pretrain.task else []
    return max([*m.root.resolutions, *(r for mm, s in segs for r in config(mm, s, depth).resolutions())])


def config(m: Manifest, seg: Segment | Pretrain, depth: int, where: str = "manifest") -> mu2net.Config:
    """A segment (or the pre-training) → `mu2net.Config`: its method's complete setting with the segment's
    adapter and clone overrides, the root's Table 1 search space with the segment's overrides, and every
    `mu2net.Budget` field as it stands. An invalid combination raises ManifestError naming the field."""
    method = mu2net.METHODS[seg.method]
    try:
        if getattr(seg, "adapter_dim", 0):
            method = dataclasses.replace(method, adapter_dim=seg.adapter_dim)
        if getattr(seg, "clone", ""):
            method = dataclasses.replace(method, clone=seg.clone)
    except ValueError as e:
        raise ManifestError(f"{where}.{str(e).removeprefix('Method.')}") from None
    budget = {f.name: getattr(seg, f.name) for f in dataclasses.fields(mu2net.Budget)}
    return mu2net.config(method, depth, m.root.resolutions, m.root.resolution or None,
                         getattr(seg, "values", None), getattr(seg, "defaults", None), **budget)
