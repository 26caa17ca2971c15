"""Incremental, atomic msgpack checkpoints of a μ2Net+ system (issue 5; the continual runs of paper Section 5).

Layout of a run directory:

    components/<name>-<n>.msgpack   one file per component id `<name>:<n>`: its parameters and bfloat16 momentum
    state-<k>.msgpack               models, root, lineage, counter, cursor, key, resolved manifest, code version,
                                    history, and the sha256 of every component file it references
    COMMIT                          JSON naming the latest state file and its sha256; written last

A component id is immutable in mu2net (a trained component always gets a fresh id; a retained component's arrays
never change), so each component file is written once and a checkpoint's bytes stay close to the distinct parameters
of the system. Every file goes through write-temp, fsync, `os.replace`, fsync-dir, so a crash leaves either the old
or the new file. A load verifies every hash and structure and raises `CheckpointError` naming the bad file; the
runner then stops, so nothing is ever written over a damaged checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import ml_dtypes
import msgpack
import numpy as np

import mu2net
import vit

STATE_FORMAT = "mu2net-state/1"
COMPONENT_FORMAT = "mu2net-component/1"
COMMIT = "COMMIT"

class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent. The message names the file."""


def component_file(cid: str) -> str:
    """`encoderblock_3:17` -> `components/encoderblock_3-17.msgpack` (no ':' in file names)."""
    return f"components/{mu2net.kind(cid)}-{mu2net.id_number(cid)}.msgpack"


# --- arrays and modules -------------------------------------------------------------------------------------


def _array(a: Any) -> dict:
    x = np.asarray(a)
    return {"shape": list(x.shape), "dtype": x.dtype.name, "data": np.ascontiguousarray(x).tobytes()}


def _dtype(name: str) -> np.dtype:
    # bfloat16 momentum: numpy knows it only through ml_dtypes.
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _unarray(d: Mapping, where: str) -> np.ndarray:
    try:
        dt, shape = _dtype(d["dtype"]), tuple(int(s) for s in d["shape"])
        x = np.frombuffer(d["data"], dtype=dt)
        return x.reshape(shape).copy()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed array record: {e}") from None


def flatten(module: eqx.Module) -> dict[str, dict]:
    """'/'-joined AugReg field path -> array record, e.g. `MlpBlock_3/Dense_0/kernel`."""
    return {k: _array(v) for k, v in vit.flat(module).items()}


def build(cls: type, arrays: Mapping[str, np.ndarray], prefix: str = "") -> eqx.Module:
    """Rebuilds a component module of class `cls` from its flat arrays (field types from the class annotations)."""
    hints = typing.get_type_hints(cls)
    args = []  # positional: `Cls` has a field named `cls`, which a keyword call would clash with
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        t = hints.get(f.name)
        if isinstance(t, type) and issubclass(t, eqx.Module):
            args.append(build(t, arrays, path + "/"))
        elif path in arrays:
            args.append(jax.numpy.asarray(arrays[path]))
        else:
            raise KeyError(f"array {path!r} missing")
    return cls(*args)


# --- atomic files --------------------------------------------------------------------------------------------


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None


def _unpack(data: bytes, path: Path) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 -- msgpack raises several types for truncated / corrupt input
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {type(e).__name__}: {e}") from None


# --- models ----------------------------------------------------------------------------------------------------


def _model(m: mu2net.Model) -> dict:
    return {"id": m.id, "task": m.task, "components": list(m.components), "hp": dict(m.hp), "mu": dict(m.mu),
            "parent": m.parent, "metrics": dict(m.metrics)}


def _unmodel(d: Mapping) -> mu2net.Model:
    return mu2net.Model(d["id"], d["task"], tuple(d["components"]), dict(d["hp"]), dict(d["mu"]), d["parent"],
                        dict(d["metrics"]))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded commit: the system plus the runner's bookkeeping (cursor, key, manifest, history, ...)."""

    system: mu2net.System
    extra: Mapping[str, Any]  # cursor, key, manifest, version, history, metrics_bytes, elapsed, ...
    hashes: Mapping[str, str]  # component id -> sha256 of its file
    state: str  # state file name


def _component_bytes(cid: str, params: eqx.Module, momentum: eqx.Module) -> bytes:
    return msgpack.packb({"format": COMPONENT_FORMAT, "id": cid, "class": type(params).__name__,
                          "params": flatten(params), "momentum": flatten(momentum)}, use_bin_type=True)


def save(run: str | os.PathLike, system: mu2net.System, extra: Mapping[str, Any],
         previous: Checkpoint | None = None) -> Checkpoint:
    """Commits `system` (and the runner's `extra`, which must be msgpack-able) to `run`.

    Component files referenced by `previous` (the last commit) are trusted and never rewritten; every other
    component is written afresh (an uncommitted file left by a killed run is simply replaced)."""
    run = Path(run)
    known = dict(previous.hashes) if previous else {}
    hashes: dict[str, str] = {}
    for cid, p in system.params.items():
        if cid in known:
            hashes[cid] = known[cid]
            continue
        data = _component_bytes(cid, p, system.momentum[cid])
        write_atomic(run / component_file(cid), data)
        hashes[cid] = sha256(data)
    k = (int(previous.state.split("-")[1].split(".")[0]) + 1) if previous else 0
    name = f"state-{k:06d}.msgpack"
    state = {
        "format": STATE_FORMAT,
        "cfg": dataclasses.asdict(system.cfg),
        "root": _model(system.root),
        "models": [_model(m) for m in system.models.values()],
        "lineage": {mid: [p, list(c)] for mid, (p, c) in system.lineage.items()},
        "counter": system.counter,
        "components": {cid: {"file": component_file(cid), "sha256": h} for cid, h in hashes.items()},
        "extra": dict(extra),
    }
    data = msgpack.packb(state, use_bin_type=True)
    write_atomic(run / name, data)
    write_atomic(run / COMMIT, json.dumps({"state": name, "sha256": sha256(data)}).encode())
    return Checkpoint(system, dict(extra), hashes, name)


def prune(run: str | os.PathLike, ck: Checkpoint) -> None:
    """Deletes state and component files the commit `ck` no longer references (after it is committed)."""
    run = Path(run)
    keep = {Path(component_file(c)).name for c in ck.hashes}
    for f in run.glob("state-*.msgpack"):
        if f.name != ck.state:
            f.unlink()
    for f in (run / "components").glob("*.msgpack"):
        if f.name not in keep:
            f.unlink()


def exists(run: str | os.PathLike) -> bool:
    """Whether `run` holds a commit. A lone `state-000000` without COMMIT is a first commit killed half-way (start
    afresh); any later state without COMMIT means the marker was lost: refused as damaged."""
    run = Path(run)
    if (run / COMMIT).exists():
        return True
    states = sorted(run.glob("state-*.msgpack"))
    if states and [s.name for s in states] != ["state-000000.msgpack"]:
        raise CheckpointError(f"{run / COMMIT} is missing but {states[-1]} exists: the checkpoint is damaged; "
                              f"refusing to start over on top of it (move the directory away to start afresh)")
    return False


def load(run: str | os.PathLike) -> Checkpoint:
    """Loads and verifies the last commit of `run` (hashes of the state and of every component file)."""
    run = Path(run)
    marker = run / COMMIT
    try:
        commit = json.loads(_read(marker))
        name, digest = commit["state"], commit["sha256"]
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"bad state name {name!r}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"commit marker {marker} is corrupt: {type(e).__name__}: {e}") from None
    path = run / name
    data = _read(path)
    if sha256(data) != digest:
        raise CheckpointError(f"checkpoint state file {path} is corrupt or truncated: its sha256 does not match the "
                              f"one recorded in {marker}")
    st = _unpack(data, path)
    try:
        if st.get("format") != STATE_FORMAT:
            raise ValueError(f"format {st.get('format')!r}, expected {STATE_FORMAT!r}")
        cfg = vit.Config(**st["cfg"])
        root = _unmodel(st["root"])
        models = {m.task: m for m in map(_unmodel, st["models"])}
        lineage = {mid: (p, tuple(c)) for mid, (p, c) in st["lineage"].items()}
        comps = st["components"]
        counter, extra = int(st["counter"]), st["extra"]
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: {type(e).__name__}: {e}") from None
    used = {c for m in (root, *models.values()) for c in m.components}
    if missing := sorted(used - set(comps)):
        raise CheckpointError(f"checkpoint state file {path}: models use components it does not list: {missing[:5]}")
    params, momentum, hashes = {}, {}, {}
    for cid, rec in comps.items():
        f = run / rec["file"]
        blob = _read(f)
        if sha256(blob) != rec["sha256"]:
            raise CheckpointError(f"checkpoint component file {f} is corrupt or truncated: its sha256 does not match "
                                  f"the one recorded in {path}")
        d = _unpack(blob, f)
        try:
            cls = vit.component_class(mu2net.kind(cid))
            if d["id"] != cid or d["class"] != cls.__name__:
                raise ValueError(f"holds {d['id']!r} ({d['class']}), expected {cid!r} ({cls.__name__})")
            params[cid] = build(cls, {k: _unarray(v, str(f)) for k, v in d["params"].items()})
            momentum[cid] = build(cls, {k: _unarray(v, str(f)) for k, v in d["momentum"].items()})
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint component file {f} has a bad structure: {type(e).__name__}: {e}") \
                from None
        hashes[cid] = rec["sha256"]
    system = mu2net.System(cfg, params, momentum, models, root, lineage, counter)
    return Checkpoint(system, extra, hashes, name)


def code_version() -> str:
    """`git describe` of this checkout when available, else the installed package version."""
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version
        return "mu2net " + version("mu2net")
    except Exception:  # noqa: BLE001
        return "unknown"
