"""Reads the authors' published μ2Net system state (`mu2net186.zip`, the start of paper Section 5) into a System.

The layout is the one google-research `muNet/mu2Net.ipynb` writes (`save_state`) and reads back
(`load_population_from_checkpoint`): an experiment folder holds `state_<loop>_<generation>/` folders, each with

    population.csv           one row per retained path (pandas `to_csv`): task_name, id, parent_id, components (the
                             path's component ids joined by '_'), hparams.<name>, metrics.<name>, score, ...; the
                             root (the seed ViT) is the path of task NOT_TRAINABLE
    components.csv           id, name, num_params, train_locks of the components seen so far
    paths.csv                every path ever trained (history; not needed to rebuild the system)
    checkpoint_<loop>_<gen>  Flax msgpack of {"<name>:<id>": parameters, "opt_state:<name>:<id>": bfloat16 momentum}

Flax msgpack stores an array as ExtType(1, msgpack((shape, dtype name, C-order bytes))) and a numpy scalar as
ExtType(3, same); an array over 2^30 bytes is a table {"__msgpack_chunked_array__": True, "shape": {"0": d0, ...},
"chunks": {"0": flat part, ...}}. A component's parameters are the Flax module's nested parameter dict, whose names
are the AugReg names this project's components use (`cls` is a bare array). The state is read from a folder, a
`.zip` of one, or a `gs://` location (etils.epath).

The system keeps the published ids: component `encoderblock_3:17` is the published component 17, a model's id is
`<task>/<path id>`, and new ids continue above the largest published one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import typing
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np

import checkpoint
import mu2net
import vit

ROOT_TASK = "NOT_TRAINABLE"  # the notebook's task of the seed paths
CHUNKED = "__msgpack_chunked_array__"
EXT_ARRAY, EXT_COMPLEX, EXT_SCALAR = 1, 2, 3

# Notebook hyperparameter -> Table 1 name. μ2Net's `ds_crop` switch, `opt_lr_schedule` and the adapter
# settings have no Table 1 counterpart: the crop is folded into the crop bounds, the others are dropped
# (docs/deviations.md).
HPARAMS = {"opt_lr": "lr", "opt_lr_warmup_ratio": "warmup", "opt_momentum": "momentum", "opt_nesterov": "nesterov",
           "ds_area_range_min": "crop_area_min", "ds_aspect_ratio_range_min": "crop_aspect_min",
           "ds_flip_left_right": "flip", "ds_brightness_delta": "brightness", "ds_contrast_delta": "contrast",
           "ds_saturation_delta": "saturation", "ds_hue_delta": "hue", "ds_image_size": "resolution",
           "_mu_": "mu", "num_layers": "num_layers"}


MAX_CSV = 1 << 28  # bytes population.csv or components.csv may declare (a few MB for thousands of paths)
MAX_ENTRY = 1 << 30  # bytes one entry of the checkpoint (a component's parameters or momentum) may take
MAX_ID = 1 << 53  # path and component ids are below this (the notebook counts from 0; a float CSV cell holds it)


class StateError(ValueError):
    """The published state is missing, truncated or inconsistent; the message names the file."""


# --- where the files are -------------------------------------------------------------------------------------


class _Files:
    """A folder (local or gs://, through etils.epath) or a .zip of one: relative names and their bytes."""

    def __init__(self, where: str):
        from etils import epath  # installed with tensorflow-datasets; gs:// needs its GCS backend

        self.where, root = where, epath.Path(where)
        self.zip: zipfile.ZipFile | None = None
        try:
            if root.is_file():
                self.zip = zipfile.ZipFile(root.open("rb"))  # seekable, locally and on GCS: read on demand
            elif not root.is_dir():
                raise StateError(f"{where}: no such folder or .zip file (root.kind = 'mu2net_state' expects the "
                                 f"published state folder, a .zip of it or a gs:// path)")
        except zipfile.BadZipFile as e:
            raise StateError(f"{where}: not a folder and not a readable .zip file: {e}") from None
        except StateError:
            raise
        except Exception as e:  # noqa: BLE001 -- e.g. no GCS backend installed, no access to the bucket
            raise StateError(f"{where}: cannot open it: {type(e).__name__}: {e}") from None
        self.root = root

    def names(self) -> list[str]:
        """Relative file names, at most three folders deep (experiment/state_<l>_<g>/file inside a zip)."""
        if self.zip is not None:
            return [n for n in self.zip.namelist() if not n.endswith("/")]
        out = []

        def walk(d, rel: str, depth: int) -> None:
            for p in d.iterdir():
                if p.is_dir():
                    if depth < 2:
                        walk(p, f"{rel}{p.name}/", depth + 1)
                else:
                    out.append(rel + p.name)

        walk(self.root, "", 0)
        return out

    def size(self, name: str) -> int:
        """The size the layout declares: the zip directory's uncompressed size, or the file's."""
        try:
            return self.zip.getinfo(name).file_size if self.zip is not None else (self.root / name).stat().length
        except (OSError, KeyError) as e:
            raise StateError(f"{self.path(name)}: cannot read it: {e}") from None

    def open(self, name: str, cap: int) -> typing.BinaryIO:
        """A stream of `name`, refused before any read when its declared size is over `cap`. A zip member never
        yields more than its declared size (zipfile stops there and checks the CRC), so a zip bomb is refused by
        what it declares, or ends at it."""
        n = self.size(name)
        if n > cap:
            raise StateError(f"{self.path(name)}: declares {n:,} bytes, more than the {cap:,} this file may have "
                             f"(a corrupt or malicious state?)")
        try:
            return self.zip.open(name) if self.zip is not None else (self.root / name).open("rb")
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise StateError(f"{self.path(name)}: cannot read it: {e}") from None

    def read(self, name: str, cap: int) -> bytes:
        try:
            with self.open(name, cap) as f:
                return f.read(cap)
        except (OSError, zipfile.BadZipFile) as e:
            raise StateError(f"{self.path(name)}: cannot read it: {e}") from None

    def path(self, name: str) -> str:
        return f"{self.where}!{name}" if self.zip is not None else str(self.root / name)


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def locate(files: _Files) -> tuple[str, str]:
    """(population.csv, checkpoint file) of the latest state: the folder given, or its last `state_<l>_<g>`."""
    names = files.names()
    pops = sorted((n for n in names if n.rsplit("/", 1)[-1] == "population.csv"), key=_natural)
    if not pops:
        raise StateError(f"{files.where}: no population.csv found: not a μ2Net state (expected "
                         f"state_<loop>_<generation>/population.csv and checkpoint_<loop>_<generation>)")
    pop = pops[-1]
    folder = pop[: -len("population.csv")]
    ckpts = sorted((n for n in names if n.startswith(folder) and "/" not in n[len(folder):]
                    and n[len(folder):].startswith("checkpoint_") and not n.endswith("_tmp")), key=_natural)
    if not ckpts:
        raise StateError(f"{files.path(folder or '.')}: holds population.csv but no checkpoint_<loop>_<generation> "
                         f"file (the Flax msgpack of the components)")
    return pop, ckpts[-1]


# --- Flax msgpack --------------------------------------------------------------------------------------------


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _ext(code: int, payload: bytes) -> Any:
    if code in (EXT_ARRAY, EXT_SCALAR):
        shape, name, buf = msgpack.unpackb(payload, raw=True)  # raw: old writers packed the bytes as str
        a = np.frombuffer(buf, dtype=_dtype(name.decode() if isinstance(name, bytes) else name)).reshape(shape)
        return a if code == EXT_ARRAY else a[()]
    if code == EXT_COMPLEX:
        re_, im = msgpack.unpackb(payload)
        return complex(re_, im)
    raise ValueError(f"unknown msgpack extension type {code}")


def _unchunk(tree: Any) -> Any:
    """Chunked arrays (`CHUNKED` tables) back to one array each."""
    if not isinstance(tree, dict):
        return tree
    if CHUNKED in tree:
        shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
        parts = [np.asarray(tree["chunks"][str(i)]).reshape(-1) for i in range(len(tree["chunks"]))]
        return np.concatenate(parts).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def stream_flax(f: typing.BinaryIO, keep: Callable[[Any], bool]) -> Iterator[tuple[Any, Any]]:
    """(key, value) of the top-level table of a Flax msgpack stream, one entry in memory at a time; the value is
    None where `keep(key)` is false (skipped unparsed). No entry may need more than `MAX_ENTRY` bytes."""
    u = msgpack.Unpacker(f, ext_hook=_ext, raw=False, strict_map_key=False, max_buffer_size=MAX_ENTRY,
                         read_size=1 << 20)
    for _ in range(u.read_map_header()):
        key = u.unpack()
        if keep(key):
            yield key, _unchunk(u.unpack())
        else:
            u.skip()
            yield key, None


# --- CSV rows -> models --------------------------------------------------------------------------------------


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf|nan")
_TEXT = ("components", "hparams.adapter_layers")  # ids joined by '_': never numbers (int('1_2') is 12)


def _cell(s: str) -> Any:
    """A pandas `to_csv` cell: '' is None (NaN / None), True/False, then int, float, else the string."""
    if s == "":
        return None
    if s in ("True", "False"):
        return s == "True"
    if _INT.fullmatch(s):
        return int(s)
    return float(s) if _FLOAT.fullmatch(s) else s


def _ids(s: str, where: str) -> list[int]:
    try:
        return [int(float(v)) for v in str(s).split("_") if v != ""]
    except (ValueError, OverflowError):
        raise StateError(f"{where}: components = {s!r}: expected component ids joined by '_'") from None


def hparams(row: Mapping[str, Any]) -> dict[str, Any]:
    """Table 1 hyperparameters of a population row (`hparams.<name>` columns of the notebook)."""
    hp = {k.removeprefix("hparams."): v for k, v in row.items() if k.startswith("hparams.")}
    out: dict[str, Any] = {}
    for name, ours in HPARAMS.items():
        v = hp.get(name)
        if v is None and name == "opt_momentum" and name in hp:
            v = 0.0  # None in μ2Net's momentum range: plain SGD
        if v is None or v != v:  # absent or NaN: the segment's default applies
            continue
        out[ours] = bool(v) if ours in ("nesterov", "flip") else int(v) if ours in ("resolution", "num_layers") \
            else float(v)
    if hp.get("ds_crop") is False:  # crop off: the whole image, as crop bounds of 1.0 give
        out["crop_area_min"], out["crop_aspect_min"] = 1.0, 1.0
    out.setdefault("quality", 0.0)  # μ2Net had no JPEG-quality augmentation
    return out


def _metrics(row: Mapping[str, Any], where: str) -> dict[str, float]:
    pick = {"quality": row.get("metrics.quality"), "test": row.get("metrics.test_quality"), "score": row.get("score")}
    out = {k: float(v) for k, v in pick.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
           and not math.isnan(float(v))}
    return out | selections(row, where)


def selections(row: Mapping[str, Any], where: str) -> dict[str, float]:
    """The path's #selections per task (Algorithm 1), which μ2Net keeps as `metrics.offsprings_per_task`, a JSON
    table task -> children sampled from the path for that task; they go on in this system (mu2net.selections)."""
    cell = row.get("metrics.offsprings_per_task")
    if cell is None:
        return {}
    try:
        counts = json.loads(cell) if isinstance(cell, str) else None
        if not isinstance(counts, dict) or not all(isinstance(n, int) and n >= 0 for n in counts.values()):
            raise ValueError("not a table of counts")
    except ValueError:
        raise StateError(f"{where}: path {row.get('id')}: metrics.offsprings_per_task = {cell!r}: expected a JSON "
                         f"table task -> count") from None
    return {mu2net.selections_key(str(t)): float(n) for t, n in counts.items() if n}


def read_csv(files: _Files, name: str) -> list[dict[str, Any]]:
    try:
        text = files.read(name, MAX_CSV).decode("utf-8")
        rows = [{k: v if k in _TEXT else _cell(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]
    except (UnicodeDecodeError, csv.Error) as e:
        raise StateError(f"{files.path(name)}: not a readable CSV file: {e}") from None
    return rows


# --- components ----------------------------------------------------------------------------------------------


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}/")
    else:
        yield prefix[:-1], tree


def component(name: str, tree: Any, dtype: Any) -> eqx.Module:
    """A published component's nested parameter dict -> our module (`cls` is stored as a bare array)."""
    cls = vit.component_class(name)
    arrays = {"cls": tree} if name == "cls" and not isinstance(tree, dict) else dict(_flat(tree))
    if other := sorted(k for k, a in arrays.items() if not isinstance(a, np.ndarray)):
        raise ValueError(f"expected arrays, found other values at {other}")
    module = checkpoint.build(cls, {k: np.asarray(a, dtype) for k, a in arrays.items()})  # no copy if dtype fits
    extra = set(arrays) - set(vit.flat(module))
    if extra:
        raise ValueError(f"arrays {sorted(extra)} have no place in {cls.__name__}")
    return module


def _shown(v: Any) -> str:
    return "'' (empty)" if v is None else repr(v)


def _int(v: Any, lo: int, where: str, what: str) -> int:
    """An id cell: an integer, or a float that is one (pandas writes a column with a missing value as floats)."""
    i = int(v) if isinstance(v, float) and math.isfinite(v) and v == int(v) else v
    if not (isinstance(i, int) and not isinstance(i, bool) and lo <= i < MAX_ID):
        raise StateError(f"{where}: {what} = {_shown(v)}: expected an integer in [{lo}, 2^53)")
    return i


def check_rows(rows: list[dict[str, Any]], where: str) -> None:
    """Each population row's fields are what the notebook writes: an integer id and parent_id (made ints here), a
    task name, the path's component ids, and numbers (or booleans, or nothing) for the Table 1 hyperparameters."""
    need = {"task_name", "id", "parent_id", "components"}
    if not rows or not need <= set(rows[0]):
        raise StateError(f"{where}: expected a header with {sorted(need)} and one row per path, found "
                         f"{sorted(rows[0]) if rows else 'no rows'}")
    for i, r in enumerate(rows):
        at = f"{where}: row {i + 1}"
        if not isinstance(r["task_name"], str) or not r["task_name"]:
            raise StateError(f"{at}: task_name = {_shown(r['task_name'])}: expected a task name")
        r["id"] = _int(r["id"], 0, at, "id")
        at = f"{where}: path {r['id']} ({r['task_name']})"
        if r["task_name"] != ROOT_TASK or r["parent_id"] is not None:  # the root's parent: -1 or nothing
            r["parent_id"] = _int(r["parent_id"], -1, at, "parent_id")
        for c in _ids(r["components"], at):
            _int(c, 0, at, "component id")
        selections(r, at)  # μ2Net's per-task counts: a JSON table, checked before any work
        for name, ours in HPARAMS.items():
            v = r.get(f"hparams.{name}")
            if v is None or isinstance(v, bool) or (isinstance(v, float) and math.isnan(v)):
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or (
                    ours in ("resolution", "num_layers") and (v != int(v) or not 0 <= v < 1 << 16)):
                raise StateError(f"{at}: hparams.{name} = {_shown(v)}: expected "
                                 + ("a whole number in [0, 65536)" if ours in ("resolution", "num_layers")
                                    else "a finite number"))


def population(path: str) -> list[dict[str, Any]]:
    """The checked rows of the population.csv of the published state at `path` (the CSV only: cheap, so a run
    checks it before it makes its run directory)."""
    files = _Files(str(path))
    pop_name, _ = locate(files)
    rows = read_csv(files, pop_name)
    check_rows(rows, files.path(pop_name))
    return rows


def read(path: str, log: Callable[[str], None] | None = None) -> mu2net.System:
    """The published state at `path` (folder, .zip or gs://) as a System: the root (the NOT_TRAINABLE path), one
    model per task with its hyperparameters, metrics and parent, and the components the models share by id. The
    checkpoint is streamed: one entry in memory at a time, only the components the models use converted."""
    pop_name, ck_name = locate(files := _Files(str(path)))
    where_pop, where_ck = files.path(pop_name), files.path(ck_name)
    if log:
        log(f"reading the μ2Net state {where_pop} and {where_ck}")
    rows, roots, best = _population(files, pop_name, log)
    keep = {i for r in (roots[0], *(r for r, _ in best.values())) for i in _ids(r["components"], where_pop)}
    names, params, mom = _stream_arrays(files, ck_name, keep)
    by_id = {r["id"]: r for r in rows}

    def model_id(r: Mapping[str, Any]) -> str:
        return mu2net.ROOT if r["task_name"] == ROOT_TASK else mu2net.model_id(r["task_name"], r["id"])

    def parent_of(r: Mapping[str, Any]) -> str | None:
        p = by_id.get(r["parent_id"]) if r["task_name"] != ROOT_TASK else None
        return None if p is None else model_id(p)

    def comp_ids(r: Mapping[str, Any]) -> tuple[str, ...]:
        where = f"{where_pop}: path {r['id']} ({r['task_name']})"
        ids = _ids(r["components"], where)
        if missing := [i for i in ids if i not in names]:
            raise StateError(f"{where}: components {missing} are not in {where_ck}")
        by_name = {names[i]: mu2net.component_id(names[i], i) for i in ids}
        if len(by_name) != len(ids):
            raise StateError(f"{where}: two components of one path share a name: {[names[i] for i in ids]}")
        try:
            return tuple(by_name[n] for n in vit.path_order(list(by_name)))  # the CSV order need not run
        except ValueError as e:
            raise StateError(f"{where_ck}: {e}") from None

    # The root keeps no hyperparameters: its children take their segment's defaults, as the notebook's take
    # the experiment's (μ2Net+ turns augmentation off where the published root was trained with μ2Net's).
    root = mu2net.Model(mu2net.ROOT, mu2net.ROOT, comp_ids(roots[0]), {}, {}, None, selections(roots[0], where_pop))
    models = {t: mu2net.Model(model_id(r), t, comp_ids(r), hparams(r), {}, parent_of(r), _metrics(r, where_pop))
              for t, (r, _) in sorted(best.items(), key=lambda kv: kv[1][0]["id"])}
    lineage: dict[str, tuple[str | None, tuple[str, ...]]] = {mu2net.ROOT: (None, root.components)}
    for m in models.values():  # retained models and the chain of their ancestors in the population
        lineage[m.id] = (m.parent, m.components)
        mid = m.parent
        while mid is not None and mid not in lineage:
            r = by_id[int(mid.removeprefix(mu2net.task_of(mid) + "/"))]
            lineage[mid] = (parent_of(r), comp_ids(r))
            mid = parent_of(r)

    used = sorted({c for m in (root, *models.values()) for c in m.components}, key=mu2net.id_number)
    if missing := [c for c in used if c not in params]:
        raise StateError(f"{where_ck}: component {missing[0]!r} does not hold the arrays of a "
                         f"{mu2net.kind(missing[0])}: its parameters are missing")
    params = {c: params[c] for c in used}
    momentum = {c: mom[c] if c in mom else mu2net.zeros_like_bf16(params[c]) for c in used}
    _check_names(files, pop_name, names)
    root_comps = {mu2net.kind(c): params[c] for c in root.components}
    cfg = vit.infer_config({k: v.shape for k, v in vit.to_flat(root_comps).items()})
    for m in (root, *models.values()):
        _check_shapes(m, params, where_ck)
    counter = 1 + max([*names, *by_id])  # new ids continue above every published one
    return mu2net.System(cfg, params, momentum, models, root, dict(sorted(lineage.items())), counter)


def _population(files: _Files, pop_name: str, log: Callable[[str], None] | None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple[dict[str, Any], float]]]:
    """population.csv's checked rows, its root row, and one retained path per task with its score. A state saved
    in the middle of a task iteration holds every improved path of the active task: the best is kept, the most
    recent on ties, as the notebook's `end_task` does."""
    where_pop = files.path(pop_name)
    rows = read_csv(files, pop_name)
    check_rows(rows, where_pop)
    roots = [r for r in rows if r["task_name"] == ROOT_TASK]
    if len(roots) != 1:
        raise StateError(f"{where_pop}: expected exactly one root path (task_name {ROOT_TASK}), found {len(roots)}")
    best: dict[str, tuple[dict[str, Any], float]] = {}
    for r in sorted(rows, key=lambda r: r["id"], reverse=True):
        t = r["task_name"]
        s = r.get("score")
        s = -math.inf if not isinstance(s, (int, float)) or math.isnan(s) else float(s)
        if t != ROOT_TASK and (t not in best or s > best[t][1]):
            best[t] = (r, s)
    if log and len(best) + 1 < len(rows):
        log(f"{where_pop}: {len(rows) - len(best) - 1} non-best paths of a task iteration in progress dropped")
    return rows, roots, best


_KEY = re.compile(r"(opt_state:)?([A-Za-z_]+(?:_\d+)?):(\d+)")


def _stream_arrays(files: _Files, ck_name: str, keep: set[int]
                   ) -> tuple[dict[int, str], dict[str, eqx.Module], dict[str, eqx.Module]]:
    """Each component id's name, and the parameters (float32) and momentum (bfloat16) of the ids in `keep`, read
    from the Flax msgpack checkpoint one entry at a time (`stream_flax`)."""
    where_ck = files.path(ck_name)
    names: dict[int, str] = {}
    params: dict[str, eqx.Module] = {}
    mom: dict[str, eqx.Module] = {}

    def kept(key: Any) -> bool:
        m = _KEY.fullmatch(str(key))
        return bool(m) and int(m.group(3)) in keep

    try:
        with files.open(ck_name, 1 << 62) as f:
            for key, tree in stream_flax(f, kept):
                m = _KEY.fullmatch(str(key))
                if not m:
                    raise StateError(f"{where_ck}: key {key!r}: expected '<component>:<id>' or "
                                     f"'opt_state:<component>:<id>'")
                opt, name, i = m.group(1), m.group(2), _int(int(m.group(3)), 0, where_ck, f"the id of key {key!r}")
                if not opt:
                    names[i] = name
                if tree is None:
                    continue
                cid = mu2net.component_id(name, i)
                try:
                    (mom if opt else params)[cid] = component(name, tree, ml_dtypes.bfloat16 if opt else np.float32)
                except (KeyError, TypeError, ValueError) as e:
                    raise StateError(f"{where_ck}: component {cid!r} does not hold the arrays of a {name}: "
                                     f"{type(e).__name__}: {e}") from None
    except StateError:
        raise
    except Exception as e:  # noqa: BLE001 -- msgpack raises several types on truncated, oversized or foreign data
        raise StateError(f"{where_ck}: not a readable Flax msgpack checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {str(e)[:300]}") from None
    if not names:
        raise StateError(f"{where_ck}: expected a table keyed '<component>:<id>', found no component")
    return names, params, mom


def _check_names(files: _Files, pop_name: str, names: Mapping[int, str]) -> None:
    """components.csv, when present, must name each component as the checkpoint does."""
    comp_name = pop_name[: -len("population.csv")] + "components.csv"
    if comp_name not in files.names():
        return
    for r in read_csv(files, comp_name):
        i = r.get("id")
        if isinstance(i, int) and i in names and r.get("name") != names[i]:
            raise StateError(f"{files.path(comp_name)}: component {i} is named {r.get('name')!r} but the "
                             f"checkpoint holds it as {names[i]!r}")


def _check_shapes(model: mu2net.Model, params: Mapping[str, eqx.Module], where: str) -> None:
    """A model's components must fit together at its resolution (abstract forward pass: nothing is computed)."""
    comps = [params[c] for c in model.components]
    try:
        res = int(model.hp.get("resolution") or vit.resolution(comps[2], comps[0].kernel.shape[0]))
        jax.eval_shape(vit.forward, comps, jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32))
    except Exception as e:  # noqa: BLE001 -- any shape error of the forward pass
        raise StateError(f"{where}: the components of model {model.id!r} ({', '.join(model.components)}) do not "
                         f"fit together: {type(e).__name__}: {str(e)[:300]}") from None
