"""The continual runner: a manifest of experiment segments → one ever-growing multitask system (paper Section 5).

A manifest (TOML) names where the system starts (a root ViT: AugReg `.npz`, a random init with an optional
pre-training iteration, or a previous run's system), the seed, and an ordered list of experiment segments — each
a method (μ2Net, μ2Net+ or a Section 4 baseline) with its budgets, score parameters and the tasks it iterates over.
The runner executes every task iteration of every segment in order (Algorithm 1 via `mu2net.task_iteration`),
commits a checkpoint after each (checkpoint.py), and reports the three Figure 3 metrics at each segment's end
(report.py). Rerunning the same command resumes from the last commit; a killed-and-resumed run ends bit-identical to
an uninterrupted one because every task iteration's key is a pure function of (seed, segment, iteration, task).

    python evolve.py                                       # the quickstart (manifests/quickstart.toml)
    python evolve.py --manifest manifests/paper_sec5.toml --out runs/sec5 --seed 3
    python evolve.py --set segments.0.generations=2 --set root.pretrain.cycles=1
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import threading
import time
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import checkpoint
import data
import mu2net
import report
import vit

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = "manifests/quickstart.toml"
KILL_ENV = "MU2NET_TEST_KILL_AFTER"  # tests: os._exit after this many finished child trainings
ROOT_TAG = 0x524F4F54  # "ROOT": fold-in tag of the root's keys, apart from the small segment indices


class ManifestError(ValueError):
    """A manifest is invalid: the message names the file, the field path, the value and what was expected."""


# --- the manifest schema -------------------------------------------------------------------------------------


def _f(default: Any = dataclasses.MISSING, check: Callable[[Any], bool] | None = None, expect: str = "",
       factory: Callable[[], Any] | None = None) -> Any:
    meta = {"check": check, "expect": expect}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_POS = (lambda v: v >= 1, "an integer ≥ 1")
_NONNEG = (lambda v: v >= 0, "an integer ≥ 0")
_FRAC = (lambda v: 0 < v <= 1, "a number in (0, 1]")
_POSF = (lambda v: v > 0, "a number > 0 (inf = no penalty)")
HP_NAMES = tuple(mu2net.TABLE1) + ("num_layers", "mu")


@dataclasses.dataclass(frozen=True)
class Pretrain:
    """A random root's pre-training: task iterations on one task whose best model becomes the root (so the root
    carries knowledge, as the paper's root is pre-trained on ImageNet-21k). `task = ""`: no pre-training."""

    task: str = ""
    method: str = _f("finetune", lambda v: v in mu2net.METHODS, f"a method of mu2net.METHODS {sorted(mu2net.METHODS)}")
    generations: int = _f(1, *_POS)
    children: int = _f(1, *_POS)
    cycles: int = _f(1, *_POS)
    samples_cap: int = _f(51_200, *_POS)
    batch_size: int = _f(16, *_POS)
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


@dataclasses.dataclass(frozen=True)
class Segment:
    """One experiment segment (Section 5): a method and its budgets, iterated over `tasks` `iterations` times."""

    name: str
    tasks: tuple[str, ...] = _f(check=lambda v: len(v) >= 1, expect="a non-empty list of task or set names")
    method: str = _f("mu2net+", lambda v: v in mu2net.METHODS,
                     f"a method of mu2net.METHODS {sorted(mu2net.METHODS)}")
    iterations: int = _f(1, *_POS)
    generations: int = _f(4, *_POS)
    children: int = _f(8, *_POS)
    cycles: int = _f(4, *_POS)
    samples_cap: int = _f(51_200, *_POS)
    batch_size: int = _f(16, *_POS)
    eval_batch: int = _f(256, *_POS)
    s: float = _f(0.99, *_FRAC)
    P: float = _f(math.inf, *_POSF)
    F: float = _f(math.inf, *_POSF)
    adapter_dim: int = _f(0, *_NONNEG)  # residual-adapter baseline: inner dim (0 = the method's own)
    clone: str = _f("", lambda v: v in ("", "mu", "all", "none") or (v.startswith("top:") and v[4:].isdigit()),
                    "'', 'mu', 'all', 'none' or 'top:K'")  # fine-tune-top-layers baseline: 'top:K'
    values: Mapping[str, Any] = _f(factory=dict)  # search-space overrides: hyperparameter -> valid values
    defaults: Mapping[str, Any] = _f(factory=dict)  # search-space overrides: hyperparameter -> default
    # How the trainable/frozen split compiles (mu2net.split): "mask" compiles least (bench/compile.py); "hybrid"
    # skips the backward pass below the lowest trained layer, which pays off once steps cost more than compiles.
    split: str = _f("mask", lambda v: v in ("mask", "hybrid", "partition"), "'mask', 'hybrid' or 'partition'")


@dataclasses.dataclass(frozen=True)
class UserTask:
    """The user's own data: an image folder (PATH/<class>/<img> or PATH/<split>/<class>/<img>), see data.py."""

    folder: str
    num_classes: int = _f(0, *_NONNEG)  # 0 = count the class folders
    splits: Mapping[str, str] = _f(factory=dict)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A whole continual sequence. `report_set`: the tasks whose test accuracy is averaged in Figure 3's first
    metric (Section 5: task-set A). `s_sweep`: Section 4 runs one experiment per s value; the runner then runs one
    sub-run per value in `<out>/s=<value>`, each with every segment's s replaced."""

    name: str
    segments: tuple[Segment, ...] = _f(check=lambda v: len(v) >= 1, expect="at least one [[segments]] table")
    seed: int = _f(0, lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)")
    data_dir: str = ""  # "" = TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    catalog: str = ""  # "" = catalog.toml beside data.py
    root: Root = _f(factory=Root)
    tasks: Mapping[str, UserTask] = _f(factory=dict)
    report_set: tuple[str, ...] = ("A",)
    s_sweep: tuple[float, ...] = _f((), lambda v: all(0 < s <= 1 for s in v), "a list of numbers in (0, 1]")


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
        for j, res in enumerate(s.values.get("resolution", ())):
            if res % patch:
                raise ManifestError(f"{where}: segments[{i}].values.resolution[{j}] = {res}: expected a multiple "
                                    f"of the patch size {patch}")
    return m


def _check_hp(d: Mapping[str, Any], path: str, where: str, values: bool) -> None:
    for k, v in d.items():
        if k not in HP_NAMES:
            raise ManifestError(f"{where}: {path}.{k}: unknown hyperparameter; expected one of {list(HP_NAMES)}")
        if values and (not isinstance(v, (list, tuple)) or not v):
            raise ManifestError(f"{where}: {path}.{k} = {v!r}: expected a non-empty list of values")
        if not values and not isinstance(v, (int, float, bool)):
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


def sweep(m: Manifest) -> list[tuple[str, Manifest]]:
    """Section 4's seven s values: (sub-directory, manifest with every segment's s replaced), or one plain run."""
    if not m.s_sweep:
        return [("", m)]
    return [(f"s={s:g}", dataclasses.replace(m, s_sweep=(), segments=tuple(
        dataclasses.replace(seg, s=s) for seg in m.segments))) for s in m.s_sweep]


def segment_tasks(m: Manifest, seg: Segment) -> list[str]:
    """A segment's task names in order (sets expanded, duplicates dropped); user tasks by their own names."""
    out: dict[str, None] = {}
    for n in seg.tasks:
        if n in m.tasks:
            out[n] = None
        else:
            for s in data.resolve_tasks([n], m.catalog or None):
                out.setdefault(s.name, None)
    return list(out)


def report_tasks(m: Manifest) -> list[str]:
    return segment_tasks(m, Segment(name="report", tasks=m.report_set))


def image_size(m: Manifest) -> int:
    """S: the largest resolution the run can use (data.py resizes every image to it once, on the host)."""
    res = list(m.root.resolutions)
    for s in m.segments:
        res += list(s.values.get("resolution", ()))
    return max(res)


def config(m: Manifest, seg: Segment, depth: int) -> mu2net.Config:
    """A segment → `mu2net.Config` (Table 1 search space of the root, with the segment's overrides)."""
    method = mu2net.METHODS[seg.method]
    if seg.adapter_dim:
        method = dataclasses.replace(method, adapter_dim=seg.adapter_dim)
    if seg.clone:
        method = dataclasses.replace(method, clone=seg.clone)
    kind = seg.method if seg.method in ("mu2net", "munet") else "plus"
    space = mu2net.search_space(depth, m.root.resolutions, kind, m.root.resolution or None)
    values = dict(space.values) | {k: tuple(v) for k, v in seg.values.items()}
    defaults = dict(space.defaults) | dict(seg.defaults)
    return mu2net.Config(space=mu2net.SearchSpace(values, defaults), method=method, generations=seg.generations,
                         children=seg.children, cycles=seg.cycles, samples_cap=seg.samples_cap,
                         batch_size=seg.batch_size, s=seg.s, P=seg.P, F=seg.F, eval_batch=seg.eval_batch,
                         split=seg.split)


def iteration_key(seed: int, segment: int, iteration: int, task: int) -> jax.Array:
    """The key of one task iteration: a fold-in chain of its coordinates, so no RNG state is carried."""
    k = jax.random.key(seed)
    for i in (segment, iteration, task):
        k = jax.random.fold_in(k, i)
    return k


def key_data(k: jax.Array) -> list[int]:
    return [int(x) for x in jax.random.key_data(k).reshape(-1)]


class Tasks:
    """TaskData by name, opened on first use (one run's cache; never module state)."""

    def __init__(self, m: Manifest):
        self.m, self.size, self.open = m, image_size(m), {}

    def __call__(self, name: str) -> mu2net.TaskData:
        if name not in self.open:
            m = self.m
            if name in m.tasks:
                u = m.tasks[name]
                spec = data.folder_task(u.folder, name, u.num_classes or None, dict(u.splits) or None)
            else:
                spec = data.resolve_tasks([name], m.catalog or None)[0]
            self.open[name] = data.make_task_data(spec, self.size, m.data_dir or None)
        return self.open[name]


# --- progress and metrics ------------------------------------------------------------------------------------


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One stderr line per finished child and per generation (segment, task, generation, child, elapsed, ETA from
    the children finished so far) and the JSON-lines metrics log. `log` is called from several training threads,
    hence the lock."""

    def __init__(self, run: Path, total: int, elapsed: float, stream: Any = sys.stderr):
        self.lock = threading.Lock()
        self.metrics = open(run / "metrics.jsonl", "ab")
        self.total, self.done, self.t0, self.before = total, 0, time.monotonic(), elapsed
        self.stream, self.where, self.cycles, self.gen = stream, {}, 1, {}
        self.kill_after = int(os.environ.get(KILL_ENV, "0") or 0)

    def at(self, cycles: int, **where: Any) -> None:
        with self.lock:
            self.where, self.cycles = where, cycles

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.t0

    def write(self, rec: Mapping[str, Any]) -> None:
        with self.lock:
            self._write(rec)

    def _write(self, rec: Mapping[str, Any]) -> None:
        line = json.dumps({**rec, "elapsed": round(self.elapsed(), 3)}, default=str)
        self.metrics.write(line.encode() + b"\n")
        self.metrics.flush()

    def size(self) -> int:
        with self.lock:
            self.metrics.flush()
            return self.metrics.tell()

    def __call__(self, rec: dict) -> None:
        with self.lock:
            w = self.where
            self._write({**w, **rec})
            ev = rec.get("event")
            if ev == "child":
                self.gen[rec.get("child")] = rec.get("generation", 0)
            elif ev == "cycle" and rec.get("cycle") == self.cycles - 1:
                self.done += 1
                run = time.monotonic() - self.t0
                eta = run / self.done * max(self.total - self.done, 0)
                print(f"[{w.get('segment_name')}] it {w.get('iteration', 0) + 1}/{w.get('iterations')} "
                      f"task {w.get('task_index', 0) + 1}/{w.get('num_tasks')} {w.get('task')} "
                      f"gen {self.gen.get(rec.get('child'), 0) + 1}/{w.get('generations')} "
                      f"child {rec.get('child')} val {rec.get('quality', 0):.4f} score {rec.get('score', 0):.4f} "
                      f"| {self.done}/{self.total} children, elapsed {_hms(self.elapsed())}, ETA {_hms(eta)}",
                      file=self.stream, flush=True)
                if self.kill_after and self.done >= self.kill_after:
                    self.metrics.flush()
                    os._exit(75)  # tests: die like a killed job, mid-iteration, without any clean-up
            elif ev == "generation":
                print(f"[{w.get('segment_name')}] task {w.get('task')} generation {rec.get('generation', 0) + 1}/"
                      f"{w.get('generations')} done: retained {rec.get('retained')}, best score {rec.get('best')}", file=self.stream,
                      flush=True)

    def close(self) -> None:
        self.metrics.close()


# --- the run -------------------------------------------------------------------------------------------------


def build_root(m: Manifest, tasks: Tasks, progress: Progress) -> mu2net.System:
    """The start state (Section 5 starts from a system; Section 4 from a ViT root)."""
    r = m.root
    if r.kind == "system":
        return checkpoint.load(Path(r.path).expanduser()).system
    full = vit.CONFIGS[r.vit]
    cfg = dataclasses.replace(full, depth=r.depth or full.depth)
    res = r.resolution or max(r.resolutions)
    # Only the manifest's own root hyperparameters: a child fills the rest from its segment's search-space
    # defaults (μ2Net's mild preprocessing, μ2Net+'s none), which a full default dict here would shadow.
    hp = dict(r.hp)

    def cut(comps: dict) -> dict:
        return {k: v for k, v in comps.items() if (vit.block_index(k) or 0) < cfg.depth}

    if r.kind == "augreg":
        return mu2net.new_system(cfg, cut(vit.load_augreg(Path(r.path).expanduser(), full)), hp)
    key = jax.random.fold_in(jax.random.key(m.seed), ROOT_TAG)
    comps = cut(vit.init(full, jax.random.fold_in(key, 0), 2, res))
    system = mu2net.new_system(cfg, comps, hp)
    pt = r.pretrain
    if not pt.task:
        return system
    name = segment_tasks(m, Segment(name="pretrain", tasks=(pt.task,)))[0]
    seg = Segment(name="pretrain", tasks=(name,), method=pt.method, generations=pt.generations,
                  children=pt.children, cycles=pt.cycles, samples_cap=pt.samples_cap, batch_size=pt.batch_size,
                  s=1.0)
    conf = config(m, seg, cfg.depth)
    start = mu2net.new_system(cfg, comps, hp | dict(pt.hp))
    progress.at(pt.cycles, segment=-1, segment_name="pretrain", iteration=0, iterations=1, task_index=0,
                num_tasks=1, task=name, generations=pt.generations)
    trained = mu2net.task_iteration(start, tasks(name), conf, jax.random.fold_in(key, 1), progress)
    best = trained.models.get(name)
    if best is None:
        raise RuntimeError(f"pre-training on {name!r} retained no model")
    progress.write(dict(event="pretrain", task=name, metrics=dict(best.metrics)))
    named = {mu2net.kind(c): trained.params[c] for c in best.components}
    return mu2net.new_system(cfg, named, hp)


def _total_children(m: Manifest, cursor: tuple[int, int, int], pretrain: bool) -> int:
    n = m.root.pretrain.generations * m.root.pretrain.children if pretrain else 0
    for i, s in enumerate(m.segments):
        per = s.generations * s.children
        k = len(segment_tasks(m, s))
        for it in range(s.iterations):
            for t in range(k):
                if (i, it, t) >= cursor:
                    n += per
    return n


def _next(m: Manifest, ntasks: Sequence[int], cursor: tuple[int, int, int]) -> tuple[int, int, int]:
    seg, it, t = cursor
    t += 1
    if t == ntasks[seg]:
        t, it = 0, it + 1
    if it == m.segments[seg].iterations:
        it, seg = 0, seg + 1
    return seg, it, t


def _resolved(m: Manifest) -> dict:
    # JSON round trip so floats like inf and tuples compare as they are stored.
    return json.loads(json.dumps(to_dict(m)))


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: checkpoint {a!r} vs now {b!r}"]


def run(m: Manifest, out: str | os.PathLike, stream: Any = sys.stderr) -> mu2net.System:
    """Runs (or resumes) the manifest's whole sequence in `out`; returns the final system."""
    out = Path(out)
    r = m.root
    if r.kind == "mu2net_state":  # fail before touching `out`
        raise NotImplementedError(
            f"root.kind = 'mu2net_state' (path {r.path!r}): reading the authors' published μ2Net system state is not "
            f"implemented yet (it comes in a later issue). Start from root.kind = 'augreg' or 'system' meanwhile.")
    if r.kind in ("augreg", "system") and not Path(r.path).expanduser().exists() and not checkpoint.exists(out):
        raise FileNotFoundError(f"root.path = {r.path!r} (root.kind = {r.kind!r}) does not exist")
    out.mkdir(parents=True, exist_ok=True)
    resolved = _resolved(m)
    names = [segment_tasks(m, s) for s in m.segments]
    ntasks = [len(n) for n in names]
    rtasks = report_tasks(m)
    tasks = Tasks(m)
    if checkpoint.exists(out):
        ck = checkpoint.load(out)  # a damaged checkpoint raises here, before anything is written
        diff = _diff(ck.extra.get("manifest"), resolved)
        if diff:
            raise ManifestError(f"{out} holds a run of another manifest; refusing to resume it with this one "
                                f"(use another --out). Differences:\n  " + "\n  ".join(diff[:20]))
        with open(out / "metrics.jsonl", "ab") as f:  # drop the log lines of the iteration that was interrupted
            f.truncate(int(ck.extra["metrics_bytes"]))
        system, cursor = ck.system, tuple(ck.extra["cursor"])
        if cursor[0] < len(m.segments) and ck.extra.get("key") != key_data(iteration_key(m.seed, *cursor)):
            raise checkpoint.CheckpointError(f"{out / ck.state}: the stored key of task iteration {cursor} is not "
                                             f"the one this code derives from seed {m.seed}; refusing to resume")
        history = list(ck.extra["history"])
        progress = Progress(out, _total_children(m, cursor, False), float(ck.extra["elapsed"]), stream)
        print(f"resuming {out} at segment {cursor[0]}, iteration {cursor[1]}, task {cursor[2]} "
              f"(state {ck.state}, code {ck.extra.get('version')})", file=stream, flush=True)
    else:
        (out / "metrics.jsonl").write_bytes(b"")
        progress = Progress(out, _total_children(m, (0, 0, 0), bool(m.root.pretrain.task)), 0.0, stream)
        system, cursor, history, ck = build_root(m, tasks, progress), (0, 0, 0), [], None
        history.append(report.summary(system, rtasks, "start"))
    (out / "manifest.json").write_text(json.dumps(resolved, indent=2) + "\n")
    version = checkpoint.code_version()

    def commit(system: mu2net.System, cursor: tuple[int, int, int], prev: checkpoint.Checkpoint | None):
        done = cursor[0] >= len(m.segments)
        key = None if done else key_data(iteration_key(m.seed, *cursor))
        extra = dict(cursor=list(cursor), key=key, key_impl="threefry2x32", seed=m.seed, manifest=resolved,
                     version=version, history=history, metrics_bytes=progress.size(), elapsed=progress.elapsed(),
                     done=done)
        new = checkpoint.save(out, system, extra, prev)
        checkpoint.prune(out, new)
        return new

    if ck is None:
        ck = commit(system, cursor, None)
    report.write(out, history, m.segments, rtasks, system, final=False, stream=None)
    try:
        while cursor[0] < len(m.segments):
            si, it, ti = cursor
            seg = m.segments[si]
            task = names[si][ti]
            conf = config(m, seg, system.cfg.depth)
            progress.at(seg.cycles, segment=si, segment_name=seg.name, iteration=it, iterations=seg.iterations,
                        task_index=ti, num_tasks=ntasks[si], task=task, generations=seg.generations)
            system = mu2net.task_iteration(system, tasks(task), conf, iteration_key(m.seed, si, it, ti), progress)
            best = system.models.get(task)
            progress.write(dict(event="task_iteration", segment=si, iteration=it, task_index=ti, task=task,
                                model=best.id if best else None, metrics=dict(best.metrics) if best else None))
            cursor = _next(m, ntasks, cursor)
            if cursor[0] != si:
                history.append(report.summary(system, rtasks, seg.name))
                progress.write(dict(event="segment_end", **history[-1]))
            ck = commit(system, cursor, ck)
            if cursor[0] != si:
                report.write(out, history, m.segments, rtasks, system, final=False, stream=sys.stdout)
        report.write(out, history, m.segments, rtasks, system, final=True, stream=None)
        print(f"done: {out} ({_hms(progress.elapsed())})", file=stream, flush=True)
    finally:
        progress.close()
    return system


# --- CLI -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Args:
    """Run (or resume) a continual μ2Net+ experiment described by a manifest (paper Section 5)."""

    manifest: str = DEFAULT_MANIFEST
    """TOML manifest (relative paths are tried from the working directory, then from this checkout)."""
    out: str | None = None
    """Run directory; rerunning with the same one resumes. Default: runs/<manifest name>-seed<seed>."""
    seed: int | None = None
    """Overrides the manifest's seed."""
    set: tuple[str, ...] = ()
    """Dotted overrides of any manifest field, e.g. --set segments.0.generations=2 root.pretrain.cycles=1."""
    sweep_index: int | None = None
    """With s_sweep: run only this entry (e.g. one per machine)."""
    check: bool = False
    """Validate the manifest, print it resolved and exit."""
    compile_cache: str = "~/.cache/mu2net/jax"
    """Persistent XLA compilation cache ('' = off); it cuts compile time on resume, results are the same."""


def main(argv: Sequence[str] | None = None) -> int:
    import tyro
    a = tyro.cli(Args, args=argv)
    try:
        m = load_manifest(a.manifest, a.set, a.seed)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check:
        print(json.dumps(to_dict(m), indent=2))
        return 0
    if a.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(a.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    out = Path(a.out) if a.out else Path("runs") / f"{m.name}-seed{m.seed}"
    runs = sweep(m)
    if a.sweep_index is not None:
        if not 0 <= a.sweep_index < len(runs):
            print(f"error: --sweep-index {a.sweep_index}: the manifest has {len(runs)} runs", file=sys.stderr)
            return 2
        runs = [runs[a.sweep_index]]
    try:
        for sub, mm in runs:
            run(mm, out / sub if sub else out)
    except (checkpoint.CheckpointError, ManifestError, NotImplementedError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
