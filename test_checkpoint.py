"""Checkpoints: bit-identical round trip, write-once components, and damaged files refused without damage."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import methods
import mu2net
import train
import vit


def _system() -> mu2net.System:
    """A root plus one trained-looking model: cloned components with random params and bf16 momentum."""
    cfg = vit.CONFIGS["tiny"]
    root = vit.init(cfg, jax.random.key(0), 2, 16)
    hp = methods.search_space(cfg.depth, (8, 16)).defaults
    s = mu2net.new_system(cfg, root, hp)
    rnd = lambda a, k: jax.random.normal(k, a.shape, a.dtype)  # noqa: E731
    params, mom = dict(s.params), dict(s.momentum)
    comps = list(s.root.components)
    for i, name in ((3, "encoderblock_1"), (5, "encoder_norm"), (6, "head")):
        cid = f"{name}:{10 + i}"
        k = jax.random.fold_in(jax.random.key(1), i)
        p = jax.tree.map(lambda a: rnd(a, k), root[name])
        params[cid] = p
        mom[cid] = jax.tree.map(lambda a: rnd(a, k).astype(jnp.bfloat16), p)
        comps[comps.index(next(c for c in comps if mu2net.kind(c) == name))] = cid
    model = mu2net.Model("digits/12", "digits", tuple(comps), dict(hp, nesterov=True, lr=0.02),
                         {"hp:lr": 0.22, "clone:cls": 0.18}, "root",
                         {"quality": 0.5, "score": 0.49, "params": 123.0, "flops": 4567, "test": 0.51})
    lineage = {**s.lineage, model.id: ("root", model.components)}
    return dataclasses.replace(s, params=params, momentum=mom, models={"digits": model}, lineage=lineage,
                               counter=17)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_round_trip_is_bit_identical(tmp_path):
    s = _system()
    extra = {"at": [1, 0, 2], "manifest": {"P": float("inf"), "name": "x"}, "history": []}
    ck = checkpoint.save(tmp_path, s, extra)
    got = checkpoint.load(tmp_path)
    t = got.system
    assert mu2net.identical(t, s)  # every array bit, models, lineage, counter
    assert any(str(np.asarray(x).dtype) == "bfloat16" for x in jax.tree.leaves(t.momentum))
    m = t.models["digits"]
    assert isinstance(m.components, tuple) and m.hp["nesterov"] is True and isinstance(m.metrics["flops"], int)
    assert got.extra["at"] == [1, 0, 2] and got.extra["manifest"]["P"] == float("inf")
    assert got.hashes == ck.hashes and got.state == ck.state


def test_components_written_once_and_pruned(tmp_path):
    s = _system()
    ck = checkpoint.save(tmp_path, s, {})
    files = {p.name: p.stat().st_ino for p in (tmp_path / "components").iterdir()}
    assert len(files) == len(s.params)
    # Next commit: one component replaced by a new id; the others are not rewritten (same inode).
    old = next(c for c in s.models["digits"].components if c.startswith("head:"))
    new = "head:99"
    m = s.models["digits"]
    m2 = dataclasses.replace(m, components=tuple(new if c == old else c for c in m.components))
    params = {**{c: p for c, p in s.params.items() if c != old}, new: s.params[old]}
    mom = {**{c: p for c, p in s.momentum.items() if c != old}, new: s.momentum[old]}
    s2 = dataclasses.replace(s, params=params, momentum=mom, models={"digits": m2})
    ck2 = checkpoint.save(tmp_path, s2, {}, ck)
    checkpoint.prune(tmp_path, ck2)
    now = {p.name: p.stat().st_ino for p in (tmp_path / "components").iterdir()}
    assert set(now) == set(files) - {"head-16.msgpack"} | {"head-99.msgpack"}
    assert all(now[f] == files[f] for f in now if f in files)
    assert sorted(p.name for p in tmp_path.glob("state-*")) == [ck2.state]
    assert mu2net.identical(checkpoint.load(tmp_path).system, s2)


@pytest.mark.parametrize("damage", ["truncate_state", "flip_state", "truncate_component", "flip_component",
                                    "delete_component", "corrupt_commit", "delete_commit"])
def test_damaged_checkpoint_refused_without_damage(tmp_path, damage):
    ck = checkpoint.save(tmp_path, _system(), {})
    checkpoint.prune(tmp_path, checkpoint.save(tmp_path, _system(), {}, ck))  # state-000001 only
    state = next(tmp_path.glob("state-*.msgpack"))
    comp = sorted((tmp_path / "components").glob("encoderblock_1*"))[0]
    if damage == "truncate_state":
        state.write_bytes(state.read_bytes()[:-40])
        name = state.name
    elif damage == "flip_state":
        b = bytearray(state.read_bytes())
        b[len(b) // 2] ^= 0xFF
        state.write_bytes(bytes(b))
        name = state.name
    elif damage == "truncate_component":
        comp.write_bytes(comp.read_bytes()[:100])
        name = comp.name
    elif damage == "flip_component":
        b = bytearray(comp.read_bytes())
        b[-5] ^= 0x01
        comp.write_bytes(bytes(b))
        name = comp.name
    elif damage == "delete_component":
        comp.unlink()
        name = comp.name
    elif damage == "corrupt_commit":
        (tmp_path / "COMMIT").write_bytes(b'{"state": "state-0')
        name = "COMMIT"
    else:
        (tmp_path / "COMMIT").unlink()
        name = "COMMIT"
    before = _snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=name.replace(".", r"\.")):
        checkpoint.exists(tmp_path) and checkpoint.load(tmp_path)
    assert _snapshot(tmp_path) == before


def test_first_commit_killed_half_way_starts_afresh(tmp_path):
    checkpoint.save(tmp_path, _system(), {})
    (tmp_path / "COMMIT").unlink()  # killed between the first state file and its marker
    assert not checkpoint.exists(tmp_path)


def test_unknown_component_name_is_rejected():
    with pytest.raises(ValueError, match="unknown component name"):
        vit.component_class("decoderblock_1")
    assert vit.component_class("encoderblock_11") is vit.EncoderBlock
    assert vit.component_class("residual_adapter_0") is vit.ResidualAdapter
    assert vit.component_class("encoder_norm") is vit.LayerNorm


# --- a task iteration in progress, object stores, a full disk, the lock ------------------------------


def _pending(s: mu2net.System) -> mu2net.Iteration:
    """A task iteration after one generation (a retained child) and part of the next (one child done, one not
    retained), with components only it holds."""
    conf = methods.config("mu2net+", s.cfg.depth, (8, 16), P=2e5, F=7e6)
    it = mu2net.start(s, "digits", conf)
    m = s.models["digits"]
    k = jax.random.key(7)

    def trained(n: int) -> mu2net.Trained:
        ids = {c: f"{mu2net.kind(c)}:{n + i}" for i, c in enumerate(m.components[-2:])}
        model = dataclasses.replace(m, id=f"digits/{n}", parent=m.id, metrics={"quality": 0.25 * n},
                                    components=tuple(ids.get(c, c) for c in m.components))
        p = {new: jax.tree.map(lambda a: np.asarray(jax.random.normal(jax.random.fold_in(k, n), a.shape)), s.params[c])
             for c, new in ids.items()}
        return mu2net.Trained(model, p, {c: train.zeros_like_bf16(v) for c, v in p.items()}, 0.1 * n)

    pool = it.pool.add(trained(20))
    return mu2net.Iteration("digits", 1, pool, 31, {"digits/12": 2, "root": 1}, {0: trained(25), 2: None})


def _same_iteration(a: mu2net.Iteration, b: mu2net.Iteration) -> bool:
    same = lambda x, y: all(np.asarray(u).tobytes() == np.asarray(v).tobytes()  # noqa: E731
                            for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    pa, pb = a.pool, b.pool
    return ((a.task, a.generation, a.counter, dict(a.selections)) == (b.task, b.generation, b.counter,
                                                                       dict(b.selections))
            and pa.models == pb.models and dict(pa.scores) == dict(pb.scores) and dict(pa.lineage) == dict(pb.lineage)
            and set(pa.params) == set(pb.params) and all(same(pa.params[c], pb.params[c]) and
                                                         same(pa.momentum[c], pb.momentum[c]) for c in pa.params)
            and set(a.done) == set(b.done) and b.done[2] is None
            and all(x.model == y.model and x.score == y.score and same(x.params, y.params) and
                    same(x.momentum, y.momentum) for x, y in ((a.done[0], b.done[0]),)))


def test_pending_iteration_round_trips_and_its_files_are_kept(tmp_path):
    s = _system()
    it = _pending(s)
    ck = checkpoint.save(tmp_path, s, {}, pending=it)
    checkpoint.prune(tmp_path, ck)
    got = checkpoint.load(tmp_path)
    assert mu2net.identical(got.system, s) and _same_iteration(it, got.pending)
    assert got.pending.pool.system is got.system
    assert len(list((tmp_path / "components").iterdir())) == len(s.params) + 4  # 2 pool + 2 done components
    # The next commit (the iteration finished) drops the pending components.
    ck2 = checkpoint.save(tmp_path, s, {}, got)
    checkpoint.prune(tmp_path, ck2)
    assert checkpoint.load(tmp_path).pending is None
    assert len(list((tmp_path / "components").iterdir())) == len(s.params)


def test_object_store_without_rename_saves_and_loads():
    """fsspec's memory filesystem stands in for gs://: no rename, whole-object writes."""
    import fsspec
    run = "memory://ckpt-test/run"
    s = _system()
    ck = checkpoint.save(run, s, {"at": [0, 0, 1]}, pending=_pending(s))
    assert checkpoint.exists(run)
    ck2 = checkpoint.save(run, s, {"at": [0, 1, 0]}, ck)
    checkpoint.prune(run, ck2)
    got = checkpoint.load(run)
    assert mu2net.identical(got.system, s) and got.extra["at"] == [0, 1, 0] and got.pending is None
    fs = fsspec.filesystem("memory")
    assert [p.rsplit("/", 1)[1] for p in fs.glob("/ckpt-test/run/state-*")] == ["state-000001.msgpack"]
    assert not [p for p in fs.find("/ckpt-test/run") if ".tmp" in p]
    fs.rm("/ckpt-test", recursive=True)


def test_full_disk_leaves_the_last_commit_loadable(tmp_path, monkeypatch):
    import errno
    s = _system()
    ck = checkpoint.save(tmp_path, s, {"n": 1})
    before = _snapshot(tmp_path)
    real = checkpoint._put

    def full(fd, data):  # the disk fills up half-way through the new state file
        if "state-" in os.readlink(f"/proc/self/fd/{fd}"):
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(checkpoint, "_put", full)
    with pytest.raises(checkpoint.DiskFull, match=r"no space left on device while writing .*state-000001\.msgpack.*"
                                                  r"the last commit \(state-000000\.msgpack\) stands"):
        checkpoint.save(tmp_path, s, {"n": 2}, ck, pending=_pending(s))
    after = _snapshot(tmp_path)
    assert not [f for f in after if ".tmp" in f or f.startswith("state-000001")]
    assert {f: b for f, b in after.items() if f in before} == before  # nothing committed was touched
    got = checkpoint.load(tmp_path)
    assert got.extra == {"n": 1} and mu2net.identical(got.system, s)


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    import json
    import os
    import subprocess
    import sys
    with checkpoint.lock(tmp_path):
        held = json.loads((tmp_path / "LOCK").read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(checkpoint.Locked, match=rf"in use by process {os.getpid()} on host .*delete .*LOCK"):
            with checkpoint.lock(tmp_path):
                pass
    assert not (tmp_path / "LOCK").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "LOCK").write_text(json.dumps(dict(held, pid=dead.pid, ticks=None)))
    with checkpoint.lock(tmp_path):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    (tmp_path / "LOCK").write_text(json.dumps(dict(held, host="elsewhere")))  # cannot be checked: refused
    with pytest.raises(checkpoint.Locked, match="host elsewhere"):
        with checkpoint.lock(tmp_path):
            pass
