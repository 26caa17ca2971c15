"""One run over many processes on JAX's multi-controller runtime (`jax.distributed`): the paper ran Section 5 on 32
TPUv4 chips and Section 4 on 8 TPUv3 cores, one child per core.

Every process runs the same program on the same values: it samples the same children (they are a pure function of
the iteration's key and state), trains the ones placed on its own devices, and receives the others' trained
children through JAX collectives (`multihost_utils`: a broadcast from the process that trained each child), so
every process holds the same active population and, in the end, the same system. Process 0 alone touches the run
directory: what it reads (a resumed checkpoint) or decides (an error) reaches the others the same way. There is no
other channel: no RPC of our own, no polling of a shared filesystem. A child travels as its component files'
bytes (checkpoint.component_bytes), broadcast in chunks, so an accelerator holds one chunk at a time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import msgpack
import numpy as np

import checkpoint
import methods
import mu2net
import schedule

CHUNK = 1 << 26  # bytes per broadcast: a 64 MiB staging buffer per device, whatever a child weighs


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the run's processes (`jax.distributed.initialize`): with no arguments JAX finds its settings where it
    can (TPU pod slices, SLURM, other clusters it knows); the explicit ones cover the rest. On CPU the collectives
    go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


class PeerLost(RuntimeError):
    """A collective failed because a process of the run is gone (killed, preempted, its host down): the others
    cannot go on without its devices. The run's last commit stands; rerunning every process resumes it."""


def _collective(fn: Callable[[], Any], who: str) -> Any:
    """`fn()`, a JAX collective; a process that died makes it fail at once (gloo: "connection closed by peer"),
    which becomes `PeerLost` naming `who`."""
    try:
        return fn()
    except jax.errors.JaxRuntimeError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(f"{who} of the run is lost ({why[:200]}); this process stops too: the last commit stands, "
                       f"and rerunning every process's command resumes it") from None


def _bucket(n: int) -> int:
    """Broadcast buffers come in powers of two, so a run compiles a few buffer shapes, not one per child."""
    return min(CHUNK, max(1024, 1 << (n - 1).bit_length()))


class Hosts:
    """This process's place among the run's processes, and the collectives the segment loop needs. With one
    process every method is the plain local operation."""

    def __init__(self, devices: Sequence[jax.Device] | None = None):
        self.index, self.count = jax.process_index(), jax.process_count()
        self.devices = list(devices or jax.local_devices())  # where this process trains its children

    @property
    def main(self) -> bool:
        """The process that reads and writes the run directory."""
        return self.index == 0

    def other(self) -> str:
        """The process a failed collective lost, as far as this one can tell."""
        return f"process {1 - self.index}" if self.count == 2 else "another process"

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process (e.g. a stop request that reached only some of them)."""
        if self.count == 1:
            return flag
        from jax.experimental import multihost_utils as mh
        return bool(_collective(lambda: np.asarray(mh.process_allgather(np.int32(flag))).any(), self.other()))

    def send(self, blob: bytes | None, source: int) -> bytes:
        """`blob` of process `source`, on every process."""
        if self.count == 1:
            return blob
        from jax.experimental import multihost_utils as mh
        me = self.index == source
        who = f"process {source}" if not me else self.other()  # the one sending, else whichever is gone
        n = len(blob) if me else 0
        hi, lo = _collective(lambda: np.asarray(mh.broadcast_one_to_all(
            np.array([n >> 30, n & (1 << 30) - 1], np.int32), me)), who)
        n = (int(hi) << 30) | int(lo)
        out = bytearray()
        for at in range(0, n, CHUNK):
            size = min(CHUNK, n - at)
            buf = np.zeros(_bucket(size), np.uint8)
            if me:
                buf[:size] = np.frombuffer(blob, np.uint8, size, at)
            out += _collective(lambda: np.asarray(mh.broadcast_one_to_all(buf, me)), who)[:size].tobytes()
        return bytes(out)

    def share(self, produce: Callable[[], bytes]) -> bytes:
        """`produce()` run by the main process, its bytes on every process; an error it raises (a damaged
        checkpoint, a full disk, a held lock) is raised on every process, so none is left waiting."""
        if self.count == 1:
            return produce()
        err = None
        if self.main:
            try:
                blob = b"\0" + produce()
            except Exception as e:  # noqa: BLE001 -- whatever it is, the others must not wait for it
                err, blob = e, b"\1" + f"{type(e).__name__}: {e}".encode()
        got = self.send(blob if self.main else None, 0)
        if err is not None:
            raise err
        if got[:1] == b"\1":
            raise checkpoint.CheckpointError(f"process 0 failed: {got[1:].decode()}")
        return got[1:]

    def trainer(self, programs: schedule.Programs, stop: Callable[[], bool] = lambda: False) -> mu2net.Trainer:
        """A `mu2net.Trainer` over every process's devices (`Spread`); with one process, `schedule.Local`."""
        local = schedule.Local(programs, self.devices, stop)
        return local if self.count == 1 else Spread(self, local)


class Spread:
    """`mu2net.Trainer` over every process's devices: the children of a generation are dealt one per device over the
    run's D devices, taken first device of every process, then second device of every process, ... (child i on
    slot i mod D, so a generation smaller than the run is spread over every host); each process trains its own on
    its devices (`schedule.Local`), then every child reaches every process. The log records of a child (its
    cycles, a discard) travel with it: each process shows its own children's progress as they train, and the log
    gets every child's records in child order. Evaluation is local: every process computes the same accuracy."""

    def __init__(self, hosts: Hosts, local: schedule.Local):
        self.hosts, self.local, self.accuracy = hosts, local, local.accuracy
        per: dict[int, list[jax.Device]] = collections.defaultdict(list)
        for d in jax.devices():
            per[d.process_index].append(d)
        self.slots = [ds[k] for k in range(max(map(len, per.values()))) for _, ds in sorted(per.items())
                      if k < len(ds)]

    def owner(self, i: int) -> int:
        return self.slots[i % len(self.slots)].process_index

    def __call__(self, pool: mu2net.Pool, todo: Sequence[mu2net.Planned], task: mu2net.TaskData,
                 config: methods.Config, log: Any, more: bool = False) -> dict[int, mu2net.Trained | None]:
        records: dict[str, list[dict]] = collections.defaultdict(list)

        def here(rec: dict) -> None:
            if log:
                log(rec, record=False)
            if rec.get("event") != "step":
                records[rec.get("child")].append(rec)

        got = self.local(pool, [c for c in todo if self.owner(c.index) == self.hosts.index], task, config, here, more)
        out = {}
        for c in todo:
            src = self.owner(c.index)
            blob = encode(got, c.index, records[c.child.model.id]) if src == self.hosts.index else None
            done, r, recs = decode(self.hosts.send(blob, src), c.child)
            for rec in recs if log else ():
                log(rec, show=False)
            if done:
                out[c.index] = r
        return out


def encode(got: dict[int, mu2net.Trained | None], i: int, records: list[dict]) -> bytes:
    """Child i's outcome: not trained (stopped before it started), not retained, or its trained components."""
    if i not in got:
        return msgpack.packb({"done": False}, use_bin_type=True)
    r = got[i]
    body: dict[str, Any] = {"done": True, "records": records, "trained": r is not None}
    if r is not None:
        body |= {"model": checkpoint.model_record(r.model), "score": r.score,
                 "components": {c: checkpoint.component_bytes(c, p, r.momentum[c]) for c, p in r.params.items()}}
    return msgpack.packb(body, use_bin_type=True)


def decode(blob: bytes, child: mu2net.Child) -> tuple[bool, mu2net.Trained | None, list[dict]]:
    d = msgpack.unpackb(blob, raw=False)
    if not d["done"]:
        return False, None, []
    if not d["trained"]:
        return True, None, d["records"]
    where = f"trained child {child.model.id}"
    comps = {c: checkpoint.component(b, c, where) for c, b in d["components"].items()}
    r = mu2net.Trained(checkpoint.model_of(d["model"]), {c: p for c, (p, _) in comps.items()},
                       {c: m for c, (_, m) in comps.items()}, float(d["score"]))
    return True, r, d["records"]
