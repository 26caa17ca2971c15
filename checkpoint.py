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
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import socket
import stat
import sys
import tempfile
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
STATE = re.compile(r"state-\d{6,}\.msgpack")  # the only state file names a COMMIT may name
MAX_READ = 1 << 30  # bytes a file of a run directory may hold when no commit records its size
MAX_MARKER = 1 << 16  # ... COMMIT and LOCK (a few hundred bytes of JSON)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent. The message names the file."""


class DiskFull(CheckpointError):
    """No space was left for a checkpoint file: that commit is abandoned, the previous one stands."""


class Missing(CheckpointError):
    """A file (or the run directory) that is not there."""


class Locked(CheckpointError):
    """Another live process holds the run directory's lock."""


def plain_name(s: Any) -> bool:
    """One entry of a folder: not empty, no '/', no NUL, not '.' or '..'."""
    return isinstance(s, str) and s not in ("", ".", "..") and "/" not in s and "\0" not in s


def inside(s: Any) -> bool:
    """A relative path that stays inside its folder: plain names joined by '/' (names that become paths: a run's
    files, the run and report folders named after a manifest, `cmp/mu2net+/s=0.5/rep0` for a comparison's)."""
    return isinstance(s, str) and all(map(plain_name, s.split("/")))


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
    """A run directory: a local path, or an fsspec URL (`gs://…` on TPU VMs, whose disks do not outlive them).

    Every name is relative and stays inside the run directory (no absolute names, no `..`). On a local disk every
    operation walks from the run directory with O_NOFOLLOW: a symbolic link, device, FIFO or socket inside it is
    refused (the run directory itself may be a link the user made), and a file is read only once its size is
    known to be at most what is expected of it (`MAX_READ`, or the size a commit recorded)."""

    def __init__(self, run: str | os.PathLike):
        self.url = str(run).rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol

    def name(self, rel: str) -> str:
        """`rel` as the user spelled the run directory (for messages)."""
        return f"{self.url}/{rel}"

    def _p(self, rel: str) -> str:
        return f"{self.root}/{'/'.join(self._parts(rel))}"

    def _parts(self, rel: str) -> list[str]:
        if not inside(rel):
            raise CheckpointError(f"{self.name(rel)}: {rel!r} is not a name inside the run directory; refusing it")
        return rel.split("/")

    @contextlib.contextmanager
    def _dir(self, rel: str, create: bool = False) -> Iterator[int]:
        """An fd of the real directory (no symbolic link on the way) that holds `rel`'s last part."""
        parts = self._parts(rel)
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CheckpointError(f"run directory {self.url} is not a directory (or a loop of symbolic links)") \
                    from None
            raise _error(e, self.url) from None
        try:
            for i, p in enumerate(parts[:-1]):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(p, dir_fd=fd)
                try:
                    sub = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as e:
                    raise _error(e, self.name("/".join(parts[: i + 1]))) from None
                os.close(fd)
                fd = sub
            yield fd
        finally:
            os.close(fd)

    def read(self, rel: str, size: int | None = None) -> bytes:
        """`rel`'s bytes: a regular file of `size` bytes when given, else of at most `MAX_READ` (COMMIT and LOCK:
        `MAX_MARKER`)."""
        cap = size if size is not None else MAX_MARKER if rel in (COMMIT, LOCK) else MAX_READ
        if not self.local:
            try:
                info = self.fs.info(self._p(rel))
            except FileNotFoundError:
                raise Missing(f"checkpoint file {self.name(rel)} is missing") from None
            _check_size(self.name(rel), info.get("type") == "file", int(info.get("size") or 0), cap, size)
            return self.fs.cat_file(self._p(rel))
        with self._dir(rel) as d:
            try:
                fd = os.open(rel.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=d)
            except OSError as e:
                raise _error(e, self.name(rel)) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            _check_size(self.name(rel), stat.S_ISREG(st.st_mode), st.st_size, cap, size)
            data = f.read(cap + 1)  # the file may have grown since
        _check_size(self.name(rel), True, len(data), cap, size)
        return data

    def exists(self, rel: str) -> bool:
        if not self.local:
            return self.fs.exists(self._p(rel))
        try:
            with self._dir(rel) as d:
                os.stat(rel.rsplit("/", 1)[-1], dir_fd=d, follow_symlinks=False)
            return True
        except (FileNotFoundError, Missing):
            return False

    def glob(self, pattern: str) -> list[str]:
        """Relative names matching `pattern` (`*.msgpack`, `components/*.msgpack`: a pattern in the last part only,
        so the run directory's own name may hold any character), sorted."""
        parent, _, pat = pattern.rpartition("/")
        try:
            if self.local:
                with self._dir(f"{parent}/x" if parent else "x") as d:
                    names = os.listdir(d)
            else:
                names = [p.rstrip("/").rsplit("/", 1)[-1]
                         for p in self.fs.ls(self._p(parent).rstrip("/") if parent else self.root, detail=False)]
        except (FileNotFoundError, Missing):
            return []
        return sorted(f"{parent}/{n}" if parent else n for n in names if fnmatch.fnmatchcase(n, pat))

    def remove(self, rel: str) -> None:
        """Removes `rel` (a symbolic link itself, never what it points to)."""
        if not self.local:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(rel))
            return
        with contextlib.suppress(FileNotFoundError, Missing), self._dir(rel) as d:
            os.unlink(rel.rsplit("/", 1)[-1], dir_fd=d)

    def write(self, rel: str, data: bytes) -> None:
        """Writes `rel` whole or not at all (see the module docstring); a full disk raises `DiskFull`."""
        try:
            if self.local:
                Path(self.root).mkdir(parents=True, exist_ok=True)
                with self._dir(rel, create=True) as d:
                    _write_at(d, rel.rsplit("/", 1)[-1], data)
            else:
                self.fs.pipe_file(self._p(rel), data)  # one whole-object upload: no rename needed
        except OSError as e:
            raise _error(e, self.name(rel)) from None


def _check_size(where: str, regular: bool, n: int, cap: int, size: int | None) -> None:
    if not regular:
        raise CheckpointError(f"{where} is not a regular file (a directory, device, FIFO or socket); refusing to "
                              f"read it")
    if size is not None and n != size:
        raise CheckpointError(f"{where} is corrupt or truncated: {n} bytes, but its commit recorded {size}")
    if n > cap:
        raise CheckpointError(f"{where} is {n} bytes, more than the {cap} a checkpoint file may hold; refusing to "
                              f"read it")


def write_error(e: OSError, where: str) -> CheckpointError:
    """An OSError of writing `where` as one line naming it: `DiskFull` for a full disk, a quota or a file size limit
    (ENOSPC, EDQUOT, EFBIG), else what the system said (a read-only file system, no permission, no such folder)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFull(f"no space left on device while writing {where} ({os.strerror(e.errno)})")
    return CheckpointError(f"cannot write {where}: {e.strerror or e}")


def _error(e: OSError, where: str) -> CheckpointError:
    """An OSError of a run-directory operation as the CheckpointError that names the file."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return write_error(e, where)
    if e.errno == errno.ENOENT:
        return Missing(f"checkpoint file {where} is missing")
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return CheckpointError(f"{where} is a symbolic link or not a directory; a run directory holds only plain "
                               f"files and folders, and links are never followed")
    return CheckpointError(f"{where}: {e.strerror or e}")


def _put(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _write_at(d: int, name: str, data: bytes) -> None:
    """`name` in the directory `d` whole or not at all: a temp file created exclusively (never through a link),
    fsync, rename over `name` (which replaces a link itself), fsync the directory."""
    tmp = f".{name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=d)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=d)
    try:
        try:
            _put(fd, data)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=d)
        raise
    os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
    os.fsync(d)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `path` whole or not at all, never through a symbolic link at `path` (reports, logs, results, exports).
    On failure the temp file is removed, `path` is as it was, and `write_error` says why in one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _write_at(fd, path.name, data)
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(e, str(path)) from None


# --- the metrics log: appended between commits, its committed length recorded in each commit ------------------


def open_log(path: str | os.PathLike) -> typing.BinaryIO:
    """`path` opened to append (created if absent), never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _error(e, str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file; refusing to write to it")
    return open(path, "ab", opener=lambda *_: fd)  # named `path` in errors


def synced_size(f: typing.BinaryIO) -> int:
    """The length of the log `f` once it is on disk: a commit records it only after the bytes it counts."""
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        raise write_error(e, str(f.name)) from None
    return f.tell()


def cut_log(path: str | os.PathLike, n: int, warn: Callable[[str], None] | None = None) -> int:
    """On resume: drops what the log `path` gained after its last commit (it held `n` bytes then). A log shorter
    than `n` (an object store's log is uploaded after its commit, so a kill in between loses the last lines) is
    kept up to its last whole line, with a warning, never padded. Returns its new length."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _error(e, str(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file; refusing to write to it")
        keep = n
        if st.st_size < n:
            keep = os.pread(fd, st.st_size, 0).rfind(b"\n") + 1
            (warn or (lambda s: print(s, file=sys.stderr, flush=True)))(
                f"warning: {path} holds {st.st_size} bytes but its last commit recorded {n}: its last records were "
                f"lost; the log goes on from its last whole line ({keep} bytes)")
        os.ftruncate(fd, keep)
        os.fsync(fd)
        return keep
    finally:
        os.close(fd)


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
def _takeovers(st: Store) -> Iterator[None]:
    """Serialises the takeovers of `st`'s lock on this host: an advisory lock (flock) on a file in this user's
    private temp folder, named after the run directory, which the kernel releases when its holder dies. A LOCK is
    taken over only from a dead process of this host, so every process that may take one over meets here."""
    key = st.url
    if st.local:
        with contextlib.suppress(OSError):
            s_ = os.stat(st.root)
            key = f"{s_.st_dev}:{s_.st_ino}"  # the directory however it is spelled
    d = Path(tempfile.gettempdir()) / f"mu2net-locks-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    s_ = os.lstat(d)
    if not stat.S_ISDIR(s_.st_mode) or s_.st_uid != os.getuid():
        raise Locked(f"{d} is not a folder of this user; it serialises lock takeovers: move it away")
    fd = os.open(d / sha256(key.encode())[:32], os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _create(st: Store, data: bytes) -> bool:
    """Writes LOCK if there is none: atomically on a local disk (O_EXCL); an object store has no such primitive,
    so there it is written and read back, which narrows a race between hosts that it cannot close."""
    if st.local:
        try:
            Path(st.root).mkdir(parents=True, exist_ok=True)
            with st._dir(LOCK) as d:
                fd = os.open(LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=d)
                try:
                    _put(fd, data)
                except OSError:  # a full disk: no half-written LOCK left behind to refuse the next run
                    os.unlink(LOCK, dir_fd=d)
                    raise
                finally:
                    os.close(fd)
        except FileExistsError:
            return False
        except OSError as e:
            raise write_error(e, st.name(LOCK)) from None
        return True
    if st.exists(LOCK):
        return False
    st.write(LOCK, data)
    return st.read(LOCK) == data


@contextlib.contextmanager
def lock(run: str | os.PathLike) -> Iterator[None]:
    """Holds `run`'s LOCK while the block runs. A second process on the same run gets `Locked`; a lock left by a
    dead process of this host is taken over, atomically: under `_takeovers`, and only if LOCK still holds what was
    judged stale, so of several processes taking over at once exactly one wins. A lock from another host cannot be
    checked and is refused, naming its holder. What an object store cannot promise: `_create` there narrows, but
    cannot close, the race of two hosts that find no LOCK at the same moment (docs/guarantees.md)."""
    st = Store(run)
    me = dict(host=socket.gethostname(), pid=os.getpid(), ticks=_start_ticks(os.getpid()), since=time.time())
    data = json.dumps(me).encode()
    for _ in range(3):
        if _create(st, data):
            break
        try:
            raw = st.read(LOCK)
        except Missing:
            continue  # released in between: try again
        except CheckpointError as e:
            raise Locked(f"{e}; if no process runs {st.url}, delete {st.name(LOCK)}") from None
        try:
            held = json.loads(raw)
            host, pid, ticks, since = held["host"], int(held["pid"]), held.get("ticks"), held.get("since", 0)
        except (ValueError, KeyError, TypeError):
            raise Locked(f"{st.name(LOCK)} exists but cannot be read; if no process runs {st.url}, delete it") \
                from None
        if host == me["host"] and not _alive(pid, ticks):
            with _takeovers(st):
                try:
                    now = st.read(LOCK)
                except Missing:
                    now = None
                if now == raw:
                    print(f"taking over the stale lock of process {pid} (no longer running) on {st.url}",
                          file=sys.stderr, flush=True)
                    st.write(LOCK, data)
                    break
            continue  # another process took it over or released it first: look again
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        raise Locked(f"{st.url} is in use by process {pid} on host {host} (since {when}); refusing to run it twice. "
                     f"If that process is gone, delete {st.name(LOCK)}")
    else:
        raise Locked(f"could not take {st.name(LOCK)}: other processes took and released it meanwhile; try again")
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
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)  # component id -> bytes of its file


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
    sizes: dict[str, int] = {}
    rec, extra_comps = _pending(pending, system) if pending else (None, {})
    comps = {c: (p, system.momentum[c]) for c, p in system.params.items()} | extra_comps
    try:
        for cid, (p, m) in comps.items():
            if cid in known:
                hashes[cid] = known[cid]
                if cid in previous.sizes:
                    sizes[cid] = previous.sizes[cid]
                continue
            data = component_bytes(cid, p, m)
            st.write(component_file(cid), data)
            hashes[cid], sizes[cid] = sha256(data), len(data)
        k = (int(previous.state.split("-")[1].split(".")[0]) + 1) if previous else 0
        name = f"state-{k:06d}.msgpack"
        files = lambda ids: {c: {"file": component_file(c), "sha256": hashes[c]}  # noqa: E731
                             | ({"bytes": sizes[c]} if c in sizes else {}) for c in ids}
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
        st.write(COMMIT, json.dumps({"state": name, "sha256": sha256(data), "bytes": len(data)}).encode())
    except DiskFull as e:
        raise DiskFull(f"{e}: this checkpoint was not committed; the last commit "
                       f"({previous.state if previous else 'none yet'}) stands and stays loadable") from None
    return Checkpoint(system, dict(extra), hashes, name, pending, sizes)


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



def finished(run: str | os.PathLike) -> bool:
    """Whether a run directory holds a run whose last commit is its end."""
    return exists(run) and bool(load(run).extra.get("done"))

# The runner's bookkeeping in a run's commit (`extra` with a cursor): what each key must be, checked on load so
# that a tampered state gives one error line naming its file, not a failure wherever the value is used.
_INT = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62  # noqa: E731
RUN_EXTRA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "cursor": ("3 integers ≥ 0", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_INT, v))),
    "manifest": ("a table with a report_set and a name that is a relative path without '..'", lambda v: isinstance(
        v, dict) and inside(v.get("name")) and isinstance(v.get("report_set"), list)),
    "history": ("a list of tables", lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v)),
    "metrics_bytes": ("an integer ≥ 0", _INT),
    "elapsed": ("a number ≥ 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    "classes": ("a table of lists of class names", lambda v: isinstance(v, dict) and all(
        isinstance(c, list) and all(isinstance(x, str) for x in c) for c in v.values())),
    "sizes": ("a table of image sizes (integers ≥ 1)", lambda v: isinstance(v, dict) and all(
        _INT(s) and s >= 1 for s in v.values())),
    "gains": ("a list of numbers", lambda v: isinstance(v, list) and all(
        isinstance(g, (int, float)) and not isinstance(g, bool) for g in v)),
}
_OPTIONAL = ("classes", "sizes", "gains")  # runs committed before they were kept have none
# One history entry (report.summary, read by the reports): its fields, and those only some entries have.
_NUM = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
_TABLE = lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)  # noqa: E731
_RECORD = {"id": ("text", lambda v: isinstance(v, str)), "hp": ("a table", _TABLE), "mu": ("a table", _TABLE),
           **{k: ("a number", _NUM) for k in ("quality", "score", "test", "params", "flops")}}
HISTORY: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "segment": ("text", lambda v: isinstance(v, str)),
    **{k: ("a number", _NUM) for k in ("test_acc_set", "params", "flops")},
    "set_tasks": ("an integer ≥ 0", _INT), "models": ("an integer ≥ 0", _INT),
    "test": ("a table of numbers", lambda v: _TABLE(v) and all(map(_NUM, v.values()))),
    "report_set": ("a list of task names", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
    "retained": (f"a table of model records, each with {', '.join(_RECORD)}", lambda v: _TABLE(v) and all(
        isinstance(r, dict) and all(k in r and ok(r[k]) for k, (_, ok) in _RECORD.items()) for r in v.values())),
    "P": ("a number", _NUM), "F": ("a number", _NUM),
    # how a segment ended (evolve's rounds: task iterations run, the last round's mean gain, until_gain reached)
    "iterations": ("an integer ≥ 0", _INT), "gain": ("a number", _NUM),
    "converged": ("true or false", lambda v: isinstance(v, bool)),
}
# The start's entry has no P, F nor an end; older runs have no retained nor an end.
_HISTORY_OPTIONAL = ("report_set", "retained", "P", "F", "iterations", "gain", "converged")
_CID = re.compile(r"[a-z_]+(?:_\d+)?:\d+")


def _check_extra(extra: Any, path: str) -> None:
    if not isinstance(extra, dict):
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: extra is {type(extra).__name__}")
    if "cursor" not in extra:  # not a run's commit (a bare system, as the tests save)
        return
    for k, (expect, ok) in RUN_EXTRA.items():
        if k in _OPTIONAL and k not in extra:
            continue
        if k not in extra or not ok(extra[k]):
            got = f"= {str(extra[k])[:80]!r}" if k in extra else "is missing"
            raise CheckpointError(f"checkpoint state file {path} has a bad structure: extra.{k} {got}; expected "
                                  f"{expect}")
    for i, h in enumerate(extra["history"]):
        for k, (expect, ok) in HISTORY.items():
            if (k in h or k not in _HISTORY_OPTIONAL) and (k not in h or not ok(h[k])):
                got = f"= {str(h[k])[:80]!r}" if k in h else "is missing"
                raise CheckpointError(f"checkpoint state file {path} has a bad structure: extra.history[{i}].{k} "
                                      f"{got}; expected {expect}")


def _component_records(comps: Any, path: str) -> dict[str, tuple[str, str, int | None]]:
    """component id -> (file, sha256, bytes or None) of a state's `components` table: each file the one its id
    names (`component_file`), so no name read from a state can point outside `components/`."""
    if not isinstance(comps, dict):
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: components is {type(comps).__name__}")
    out = {}
    for cid, rec in comps.items():
        ok = isinstance(cid, str) and _CID.fullmatch(cid) and isinstance(rec, dict)
        try:
            ok = ok and vit.component_class(mu2net.kind(cid)) is not None and rec.get("file") == component_file(cid)
        except ValueError:
            ok = False
        n = rec.get("bytes") if isinstance(rec, dict) else None
        if not ok or not isinstance(rec.get("sha256"), str) or not (n is None or _INT(n)):
            raise CheckpointError(f"checkpoint state file {path} has a bad component record {str(cid)[:80]!r}: "
                                  f"{str(rec)[:120]}; expected {{file: components/<name>-<n>.msgpack, sha256, bytes}}")
        out[cid] = (rec["file"], rec["sha256"], n)
    return out


def _state(st: Store, get: Callable[[str, int | None], bytes]) -> tuple[dict, str]:
    """The last commit's state record, its hash (and size, where recorded) verified against COMMIT, and the state
    file's name: one the format allows (`STATE`), never a path taken from the marker as it stands."""
    marker = st.name(COMMIT)
    raw = get(COMMIT, None)
    try:
        commit = json.loads(raw)
        name, digest, size = commit["state"], commit["sha256"], commit.get("bytes")
        if not isinstance(name, str) or not STATE.fullmatch(name):
            raise ValueError(f"bad state name {name!r}, expected state-<number>.msgpack")
        if not isinstance(digest, str) or not (size is None or _INT(size)):
            raise ValueError(f"bad sha256 {digest!r} or bytes {size!r}")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"commit marker {marker} is corrupt: {type(e).__name__}: {str(e)[:200]}") from None
    path = st.name(name)
    data = get(name, size)
    if sha256(data) != digest:
        raise CheckpointError(f"checkpoint state file {path} is corrupt or truncated: its sha256 does not match the "
                              f"one recorded in {marker}")
    st_ = _unpack(data, path)
    if not isinstance(st_, dict) or st_.get("format") != STATE_FORMAT:
        form = st_.get("format") if isinstance(st_, dict) else type(st_).__name__
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: format {str(form)[:80]!r}, "
                              f"expected {STATE_FORMAT!r}")
    return st_, name


def shape(run: str | os.PathLike) -> tuple[vit.Config, Mapping[str, Any]]:
    """The ViT config and the runner's bookkeeping (`Checkpoint.extra`: the resolved manifest among them) of the
    last commit of `run`, read from its state file alone (no component is read)."""
    st = Store(run)
    st_, name = _state(st, st.read)
    path = st.name(name)
    try:
        cfg, extra = vit.Config(**st_["cfg"]), st_["extra"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: {type(e).__name__}: "
                              f"{str(e)[:200]}") from None
    _check_extra(extra, path)
    return cfg, dict(extra)


def load(run: str | os.PathLike, read: Callable[[str], bytes] | None = None) -> Checkpoint:
    """Loads and verifies the last commit of `run` (hashes of the state and of every component file). `read` (a
    relative name -> its bytes) replaces reading `run` itself, e.g. with bytes one process read for all. Every name
    read is one the format allows (`STATE`, `component_file`), never one taken from a file as it stands."""
    st = Store(run)
    get = (lambda rel, n: read(rel)) if read else st.read  # noqa: E731
    st_, name = _state(st, get)
    path = st.name(name)
    try:
        cfg = vit.Config(**st_["cfg"])
        root = model_of(st_["root"])
        models = {m.task: m for m in map(model_of, st_["models"])}
        lineage = {mid: (p, tuple(c)) for mid, (p, c) in st_["lineage"].items()}
        counter, extra = int(st_["counter"]), st_["extra"]
        pend = st_.get("pending")
        comps = _component_records(st_["components"], path)
        pcomps = _component_records(pend["components"], path) if pend else {}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint state file {path} has a bad structure: {type(e).__name__}: "
                              f"{str(e)[:200]}") from None
    _check_extra(extra, path)
    used = {c for m in (root, *models.values()) for c in m.components}
    if missing := sorted(used - set(comps)):
        raise CheckpointError(f"checkpoint state file {path}: models use components it does not list: {missing[:5]}")
    params, momentum, hashes, sizes = {}, {}, {}, {}
    for cid, (f, digest_, n) in (comps | pcomps).items():
        blob = get(f, n)
        if sha256(blob) != digest_:
            raise CheckpointError(f"checkpoint component file {st.name(f)} is corrupt or truncated: its sha256 does "
                                  f"not match the one recorded in {path}")
        params[cid], momentum[cid] = component(blob, cid, st.name(f))
        hashes[cid] = digest_
        if n is not None:
            sizes[cid] = n
    system = mu2net.System(cfg, {c: params[c] for c in comps}, {c: momentum[c] for c in comps}, models, root,
                           lineage, counter)
    pending = None
    if pend:
        try:
            pending = _unpending(pend, system, params, momentum)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint state file {path} has a bad pending iteration: {type(e).__name__}: "
                                  f"{e}") from None
    return Checkpoint(system, extra, hashes, name, pending, sizes)


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
