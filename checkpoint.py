"""Incremental, atomic msgpack checkpoints of a μ2Net+ system (the continual runs of paper Section 5).

Layout of a run directory (a local path or any fsspec URL: `gs://bucket/run`, `memory://run` in tests):

    components/<name>-<n>.msgpack   one file per component id `<name>:<n>`: its parameters and bfloat16 momentum
    state-<k>.msgpack               models, root, lineage, counter, cursor, key, resolved manifest, code version,
                                    history, the sha256 of every component file it references, and the task
                                    iteration in progress (its active population and the generation reached)
    COMMIT                          JSON naming the latest state file and its sha256; written last
    LOCK                            the process running the run (host, pid); removed when it ends

A component id is immutable in mu2net (a trained component always gets a fresh id; a retained component's arrays
never change), so each component file is written once and a checkpoint's bytes stay close to the distinct parameters
of the system. The protocol needs no atomic rename: every file but COMMIT has a name that is never written twice,
and COMMIT is replaced whole. On a local disk every file goes through write-temp, fsync, `os.replace`, fsync-dir;
on an object store (no rename) each file is one whole-object upload, which readers see entirely or not at all. A
crash leaves either the old or the new COMMIT, and the old one's files are deleted only after the new one stands.
A load verifies every hash and structure and raises `CheckpointError` naming the bad file; the runner then stops,
so nothing is ever written over a damaged checkpoint. A full disk raises `DiskFull` and leaves the last commit as
it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import hashlib
import json
import os
import socket
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import fsspec
import ml_dtypes
import msgpack
import numpy as np

import mu2net
import vit

STATE_FORMAT = "mu2net-state/1"
COMPONENT_FORMAT = "mu2net-component/1"
COMMIT = "COMMIT"
LOCK = "LOCK"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent. The message names the file."""


class DiskFull(CheckpointError):
    """No space was left for a checkpoint file: that commit is abandoned, the previous one stands."""


class Locked(CheckpointError):
    """Another live process holds the run directory's lock."""


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
            args.append(np.asarray(arrays[path]))  # host memory: a system never sits on an accelerator
        else:
            raise KeyError(f"array {path!r} missing")
    return cls(*args)


# --- storage: a local directory or any fsspec filesystem ------------------------------------------------------


class Store:
    """A run directory: a local path, or an fsspec URL (`gs://…` on TPU VMs, whose disks do not outlive them)."""

    def __init__(self, run: str | os.PathLike):
        self.url = str(run).rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol

    def name(self, rel: str) -> str:
        """`rel` as the user spelled the run directory (for messages)."""
        return f"{self.url}/{rel}"

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self._p(rel))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.name(rel)} is missing") from None

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def glob(self, pattern: str) -> list[str]:
        """Relative names matching `pattern` (`*.msgpack`, `components/*.msgpack`: a pattern in the last part only,
        so the run directory's own name may hold any character), sorted."""
        parent, _, pat = pattern.rpartition("/")
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(parent).rstrip("/"), detail=False)]
        except FileNotFoundError:
            return []
        return sorted(f"{parent}/{n}" if parent else n for n in names if fnmatch.fnmatchcase(n, pat))

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._p(rel))

    def write(self, rel: str, data: bytes) -> None:
        """Writes `rel` whole or not at all (see the module docstring); a full disk raises `DiskFull`."""
        try:
            if self.local:
                write_atomic(Path(self._p(rel)), data)
            else:
                self.fs.pipe_file(self._p(rel), data)  # one whole-object upload: no rename needed
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left on device while writing {self.name(rel)}") from None
            raise


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory. On failure (a full disk)
    the temp file is removed and `path` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _put(tmp, data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unpack(data: bytes, path: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 -- msgpack raises several types for truncated / corrupt input
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {type(e).__name__}: {e}") from None


# --- the run directory's lock --------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), which tells a live pid from a reused one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return ticks is None or _start_ticks(pid) in (None, ticks)


@contextlib.contextmanager
def lock(run: str | os.PathLike) -> Iterator[None]:
    """Holds `run`'s LOCK while the block runs. A second process on the same run gets `Locked`; a lock left by a
    dead process of this host is taken over. A lock from another host cannot be checked and is refused, naming
    its holder. On a local disk the lock file is created exclusively (O_EXCL); an object store has no such
    primitive, so there the lock is written and read back, which narrows a race it cannot close."""
    st = Store(run)
    me = dict(host=socket.gethostname(), pid=os.getpid(), ticks=_start_ticks(os.getpid()), since=time.time())
    data = json.dumps(me).encode()
    for _ in range(2):
        if st.local:
            Path(st.root).mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(st._p(LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, data)
                os.close(fd)
                break
            except FileExistsError:
                pass
        elif not st.exists(LOCK):
            st.write(LOCK, data)
            if st.read(LOCK) == data:
                break
        try:
            held = json.loads(st.read(LOCK))
            host, pid, ticks, since = held["host"], int(held["pid"]), held.get("ticks"), held.get("since", 0)
        except (CheckpointError, ValueError, KeyError, TypeError):
            raise Locked(f"{st.name(LOCK)} exists but cannot be read; if no process runs {st.url}, delete it") \
                from None
        if host == me["host"] and not _alive(pid, ticks):
            print(f"taking over the stale lock of process {pid} (no longer running) on {st.url}", file=sys.stderr,
                  flush=True)
            st.remove(LOCK)
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        raise Locked(f"{st.url} is in use by process {pid} on host {host} (since {when}); refusing to run it twice. "
                     f"If that process is gone, delete {st.name(LOCK)}")
    else:
        raise Locked(f"could not take {st.name(LOCK)}: another process took it at the same time")
    try:
        yield
    finally:
        with contextlib.suppress(CheckpointError, OSError):
            if st.read(LOCK) == data:
                st.remove(LOCK)


# --- models ----------------------------------------------------------------------------------------------------


def model_record(m: mu2net.Model) -> dict:
    return {"id": m.id, "task": m.task, "components": list(m.components), "hp": dict(m.hp), "mu": dict(m.mu),
            "parent": m.parent, "metrics": dict(m.metrics)}


def model_of(d: Mapping) -> mu2net.Model:
    return mu2net.Model(d["id"], d["task"], tuple(d["components"]), dict(d["hp"]), dict(d["mu"]), d["parent"],
                        dict(d["metrics"]))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded commit: the system plus the runner's bookkeeping (cursor, key, manifest, history, ...), and the task
    iteration in progress when the commit was taken after a generation (`pending`, None between iterations)."""

    system: mu2net.System
    extra: Mapping[str, Any]  # cursor, key, manifest, version, history, metrics_bytes, elapsed, ...
    hashes: Mapping[str, str]  # component id -> sha256 of its file (the system's and the pending iteration's)
    state: str  # state file name
    pending: mu2net.Iteration | None = None


def component_bytes(cid: str, params: eqx.Module, momentum: eqx.Module) -> bytes:
    """One component's file: its parameters and momentum as msgpack (also how trained children travel between
    processes, exchange.py)."""
    return msgpack.packb({"format": COMPONENT_FORMAT, "id": cid, "class": type(params).__name__,
                          "params": flatten(params), "momentum": flatten(momentum)}, use_bin_type=True)


def component(blob: bytes, cid: str, where: str) -> tuple[eqx.Module, eqx.Module]:
    """Parameters and momentum of component `cid` from `component_bytes`; `where` names the source in errors."""
    d = _unpack(blob, where)
    try:
        cls = vit.component_class(mu2net.kind(cid))
        if d["id"] != cid or d["class"] != cls.__name__:
            raise ValueError(f"holds {d['id']!r} ({d['class']}), expected {cid!r} ({cls.__name__})")
        return (build(cls, {k: _unarray(v, where) for k, v in d["params"].items()}),
                build(cls, {k: _unarray(v, where) for k, v in d["momentum"].items()}))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint component file {where} has a bad structure: {type(e).__name__}: {e}") \
            from None


def _pending(it: mu2net.Iteration, system: mu2net.System) -> tuple[dict, dict[str, tuple]]:
    """The task iteration in progress as a msgpack-able record, and the components it adds to the system's."""
    pool = it.pool
    comps = {c: (pool.params[c], pool.momentum[c]) for c in pool.params if c not in system.params}
    done = None if it.done is None else {}
    for i, r in (it.done or {}).items():
        if r is not None:
            comps |= {c: (p, r.momentum[c]) for c, p in r.params.items()}
        done[str(i)] = None if r is None else {"model": model_record(r.model), "score": r.score,
                                               "components": list(r.params)}
    added = {m: [p, list(c)] for m, (p, c) in pool.lineage.items() if m not in system.lineage}
    rec = {"task": it.task, "generation": it.generation, "counter": it.counter, "selections": dict(it.selections),
           "models": [model_record(m) for m in pool.models], "scores": dict(pool.scores), "lineage": added,
           "done": done}
    return rec, comps


def _unpending(rec: Mapping, system: mu2net.System, params: Mapping, momentum: Mapping) -> mu2net.Iteration:
    models = tuple(model_of(m) for m in rec["models"])
    ids = [c for c in params if c not in system.params]
    lineage = {**system.lineage, **{m: (p, tuple(c)) for m, (p, c) in rec["lineage"].items()}}
    done = None if rec["done"] is None else {}
    for i, r in (rec["done"] or {}).items():
        done[int(i)] = None if r is None else mu2net.Trained(
            model_of(r["model"]), {c: params[c] for c in r["components"]}, {c: momentum[c] for c in r["components"]},
            float(r["score"]))
    done_ids = {c for r in (done or {}).values() if r is not None for c in r.params}
    pool = mu2net.Pool(system, {**system.params, **{c: params[c] for c in ids if c not in done_ids}},
                       {**system.momentum, **{c: momentum[c] for c in ids if c not in done_ids}}, lineage, models,
                       {k: float(v) for k, v in rec["scores"].items()})
    return mu2net.Iteration(rec["task"], int(rec["generation"]), pool, int(rec["counter"]), dict(rec["selections"]),
                            done)


def save(run: str | os.PathLike, system: mu2net.System, extra: Mapping[str, Any],
         previous: Checkpoint | None = None, pending: mu2net.Iteration | None = None) -> Checkpoint:
    """Commits `system` (and the runner's `extra`, which must be msgpack-able) to `run`, with the task iteration in
    progress (`pending`) when the commit is taken between two generations.

    Component files referenced by `previous` (the last commit) are trusted and never rewritten; every other
    component is written afresh (an uncommitted file left by a killed run is simply replaced). A full disk raises
    `DiskFull` and leaves `previous` the valid commit."""
    st = Store(run)
    known = dict(previous.hashes) if previous else {}
    hashes: dict[str, str] = {}
    rec, extra_comps = _pending(pending, system) if pending else (None, {})
    comps = {c: (p, system.momentum[c]) for c, p in system.params.items()} | extra_comps
    try:
        for cid, (p, m) in comps.items():
            if cid in known:
                hashes[cid] = known[cid]
                continue
            data = component_bytes(cid, p, m)
            st.write(component_file(cid), data)
            hashes[cid] = sha256(data)
        k = (int(previous.state.split("-")[1].split(".")[0]) + 1) if previous else 0
        name = f"state-{k:06d}.msgpack"
        files = lambda ids: {c: {"file": component_file(c), "sha256": hashes[c]} for c in ids}  # noqa: E731
        state = {
            "format": STATE_FORMAT,
            "cfg": dataclasses.asdict(system.cfg),
            "root": model_record(system.root),
            "models": [model_record(m) for m in system.models.values()],
            "lineage": {mid: [p, list(c)] for mid, (p, c) in system.lineage.items()},
            "counter": system.counter,
            "components": files(system.params),
            "extra": dict(extra),
        }
        if rec is not None:
            state["pending"] = rec | {"components": files(extra_comps)}
        data = msgpack.packb(state, use_bin_type=True)
        st.write(name, data)
        st.write(COMMIT, json.dumps({"state": name, "sha256": sha256(data)}).encode())
    except DiskFull as e:
        raise DiskFull(f"{e}: this checkpoint was not committed; the last commit "
                       f"({previous.state if previous else 'none yet'}) stands and stays loadable") from None
    return Checkpoint(system, dict(extra), hashes, name, pending)


def prune(run: str | os.PathLike, ck: Checkpoint) -> None:
    """Deletes state and component files the commit `ck` no longer references (after it is committed)."""
    st = Store(run)
    keep = {component_file(c) for c in ck.hashes}
    for f in st.glob("state-*.msgpack"):
        if f != ck.state:
            st.remove(f)
    for f in st.glob("components/*.msgpack"):
        if f not in keep:
            st.remove(f)


def exists(run: str | os.PathLike) -> bool:
    """Whether `run` holds a commit. A lone `state-000000` without COMMIT is a first commit killed half-way (start
    afresh); any later state without COMMIT means the marker was lost: refused as damaged."""
    st = Store(run)
    if st.exists(COMMIT):
        return True
    states = st.glob("state-*.msgpack")
    if states and states != ["state-000000.msgpack"]:
        raise CheckpointError(f"{st.name(COMMIT)} is missing but {st.name(states[-1])} exists: the checkpoint is "
                              f"damaged; refusing to start over on top of it (move the directory away to start afresh)")
    return False


def _state(st: Store, read: Callable[[str], bytes]) -> tuple[dict, str]:
    """The last commit's state record, its hash verified against COMMIT, and the state file's name."""
    marker = st.name(COMMIT)
    try:
        commit = json.loads(read(COMMIT))
        name, digest = commit["state"], commit["sha256"]
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"bad state name {name!r}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"commit marker {marker} is corrupt: {type(e).__name__}: {e}") from None
    path = st.name(name)
    data = read(name)
    if sha256(data) != digest:
        raise CheckpointError(f"checkpoint state file {path} is corrupt or truncated: its sha256 does not match the "
                              f"one recorded in {marker}")
    st_ = _unpack(data, path)
    if not isinstance(st_, dict) or st_.get("format") != STATE_FORMAT:
        form = st_.get("format") if isinstance(st_, dict) else type(st_).__name__
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: format {form!r}, expected "
                              f"{STATE_FORMAT!r}")
    return st_, name


def shape(run: str | os.PathLike) -> tuple[vit.Config, Mapping[str, Any]]:
    """The ViT config and the runner's bookkeeping (`Checkpoint.extra`: the resolved manifest among them) of the
    last commit of `run`, read from its state file alone (no component is read)."""
    st = Store(run)
    st_, name = _state(st, st.read)
    try:
        return vit.Config(**st_["cfg"]), dict(st_["extra"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint state file {st.name(name)} has a bad structure: {type(e).__name__}: "
                              f"{e}") from None


def load(run: str | os.PathLike, read: Callable[[str], bytes] | None = None) -> Checkpoint:
    """Loads and verifies the last commit of `run` (hashes of the state and of every component file). `read` (a
    relative name -> its bytes) replaces reading `run` itself, e.g. with bytes one process read for all."""
    st = Store(run)
    read = read or st.read
    st_, name = _state(st, read)
    path = st.name(name)
    try:
        cfg = vit.Config(**st_["cfg"])
        root = model_of(st_["root"])
        models = {m.task: m for m in map(model_of, st_["models"])}
        lineage = {mid: (p, tuple(c)) for mid, (p, c) in st_["lineage"].items()}
        comps = st_["components"]
        counter, extra = int(st_["counter"]), st_["extra"]
        pend = st_.get("pending")
        pcomps = pend["components"] if pend else {}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: {type(e).__name__}: {e}") from None
    used = {c for m in (root, *models.values()) for c in m.components}
    if missing := sorted(used - set(comps)):
        raise CheckpointError(f"checkpoint state file {path}: models use components it does not list: {missing[:5]}")
    params, momentum, hashes = {}, {}, {}
    for cid, rec in (comps | pcomps).items():
        f = rec["file"]
        blob = read(f)
        if sha256(blob) != rec["sha256"]:
            raise CheckpointError(f"checkpoint component file {st.name(f)} is corrupt or truncated: its sha256 does "
                                  f"not match the one recorded in {path}")
        params[cid], momentum[cid] = component(blob, cid, st.name(f))
        hashes[cid] = rec["sha256"]
    system = mu2net.System(cfg, {c: params[c] for c in comps}, {c: momentum[c] for c in comps}, models, root,
                           lineage, counter)
    pending = None
    if pend:
        try:
            pending = _unpending(pend, system, params, momentum)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint state file {path} has a bad pending iteration: {type(e).__name__}: "
                                  f"{e}") from None
    return Checkpoint(system, extra, hashes, name, pending)


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
