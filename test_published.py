"""published.py reads a μ2Net state written exactly as google-research `muNet/mu2Net.ipynb` writes one (`save_state`:
pandas CSVs and a Flax msgpack checkpoint), with a tiny ViT: same models, same sharing, same logits."""

import collections
import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pandas as pd
import pytest

import mu2net
import published
import vit

CFG = vit.CONFIGS["tiny"]
_fwd = jax.jit(vit.forward)  # eager would compile op by op


# --- a writer following the notebook ------------------------------------------------------------------------


def flax_bytes(tree, max_chunk: int = 2**30) -> bytes:
    """`flax.serialization.to_bytes` of nested dicts of numpy arrays: an array is ExtType(1, msgpack((shape, dtype
    name, C bytes))), one over `max_chunk` bytes a table of flat chunks (Flax's MAX_CHUNK_SIZE is 2^30)."""

    def chunk(x):
        if isinstance(x, dict):
            return {k: chunk(v) for k, v in x.items()}
        if x.nbytes <= max_chunk:
            return x
        n, flat = max(1, max_chunk // x.dtype.itemsize), x.reshape(-1)
        return {"__msgpack_chunked_array__": True, "shape": {str(i): d for i, d in enumerate(x.shape)},
                "chunks": {str(j): flat[i:i + n] for j, i in enumerate(range(0, flat.size, n))}}

    def ext(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        raise TypeError(type(x))

    return msgpack.packb(chunk(tree), default=ext, strict_types=True)


def flax_params(module) -> dict | np.ndarray:
    """A component's parameters as the Flax ViT holds them: nested by module name; `cls` a bare array."""
    if isinstance(module, vit.Cls):
        return np.asarray(module.cls)
    out: dict = {}
    for key, a in vit.flat(module).items():
        *parents, leaf = key.split("/")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = np.asarray(a)
    return out


def _random(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), tree)


HP = {"_mu_": 0.2, "num_classes": 2, "adapter_layers": "", "num_layers": 2, "adapter_dim": 16, "opt_lr": 0.01,
      "opt_lr_schedule": "cosine", "opt_lr_warmup_ratio": 0.05, "opt_momentum": 0.9, "opt_nesterov": False,
      "ds_image_size": 16, "ds_crop": True, "ds_area_range_min": 0.05, "ds_aspect_ratio_range_min": 0.75,
      "ds_flip_left_right": True, "ds_brightness_delta": 0.0, "ds_contrast_delta": 0.0,
      "ds_saturation_delta": 0.0, "ds_hue_delta": 0.0}


class Writer:
    """Components with the notebook's global ids, paths, and `save_state`'s files."""

    def __init__(self):
        self.comps: dict[int, tuple[str, object, object]] = {}  # id -> (name, params, opt_state or None)
        self.paths: list[dict] = []

    def comp(self, cid: int, name: str, module, trained: bool = False) -> int:
        mom = (jax.tree.map(lambda a: np.asarray(a * 0.1, ml_dtypes.bfloat16), module) if trained else None)
        self.comps[cid] = (name, module, mom)
        return cid

    def path(self, pid: int, task: str, parent: int, comps: list[int], hp: dict, quality: float, score: float):
        self.paths.append(dict(id=pid, task=task, parent=parent, comps=comps, hp={**HP, **hp}, quality=quality,
                               score=score))

    def save(self, exp_dir: Path, loop: int, gen: int, max_chunk: int = 2**30) -> Path:
        d = exp_dir / f"state_{loop}_{gen}"
        d.mkdir(parents=True)
        data = collections.defaultdict(list)  # `paths_to_df`
        tasks = {p["id"]: p["task"] for p in self.paths}
        for p in self.paths:
            data["task_name"].append(p["task"])
            data["id"].append(p["id"])
            data["parent_id"].append(p["parent"])
            data["parent_task_name"].append(tasks.get(p["parent"]))
            data["final_accounted_params"].append(123.5)
            data["components"].append("_".join(str(c) for c in p["comps"]))
            for k, v in p["hp"].items():
                data[f"hparams.{k}"].append(v)
            metrics = {"offsprings": 1, "offsprings_per_task": json.dumps({p["task"]: 2, "x": 1}), "reloads": 0,
                       "generation": 3, "private": False, "evals": json.dumps([0.5, p["quality"]]),
                       "quality": p["quality"], "test_quality": None if p["task"] == "NOT_TRAINABLE"
                       else p["quality"] - 0.01}
            for k, v in metrics.items():
                data[f"metrics.{k}"].append(v)
            data["score"].append(p["score"])
        pd.DataFrame(data).to_csv(d / "population.csv", index=False)
        pd.DataFrame(data).to_csv(d / "paths.csv", index=False)
        used = sorted({c for p in self.paths for c in p["comps"]})
        pd.DataFrame({"id": used, "name": [self.comps[c][0] for c in used], "num_params": [1] * len(used),
                      "train_locks": ["a,b"] * len(used)}).to_csv(d / "components.csv", index=False)
        target = {}  # `get_comps_params`
        for c in used:
            name, module, mom = self.comps[c]
            target[f"{name}:{c}"] = flax_params(module)
            if mom is not None:
                target[f"opt_state:{name}:{c}"] = flax_params(mom)
        (d / f"checkpoint_{loop}_{gen}").write_bytes(flax_bytes(target, max_chunk))
        return d


def _state(max_chunk=2**30):
    """Root (path 0, ids 0-6) and three tasks: t_a shares the root's stem and block 0; t_b (8 px, one block) and
    t_c share t_a's block 1; t_c also has a worse path of a task iteration in progress."""
    root = {k: _random(v, i) for i, (k, v) in enumerate(vit.init(CFG, jax.random.key(0), 2, 16).items())}
    w = Writer()
    r = [w.comp(i, k, m) for i, (k, m) in enumerate(root.items())]
    a = r[:4] + [w.comp(11, "encoderblock_1", _random(root["encoderblock_1"], 11), True),
                 w.comp(12, "encoder_norm", _random(root["encoder_norm"], 12), True),
                 w.comp(13, "head", _random(vit.init_head(CFG, 3), 13), True)]
    pe8 = vit.resample_posembed(root["posembed_input"], 8, CFG.patch)
    b = [r[0], r[1], w.comp(20, "posembed_input", _random(pe8, 20), True), r[3],
         w.comp(21, "encoder_norm", _random(root["encoder_norm"], 21), True),
         w.comp(22, "head", _random(vit.init_head(CFG, 5), 22), True)]
    c = [w.comp(31, "head", _random(vit.init_head(CFG, 4), 31), True), 11, r[2], r[3], r[0], r[1],
         w.comp(30, "encoder_norm", _random(root["encoder_norm"], 30), True)]  # unordered, as a dict may list
    c_worse = c[1:] + [w.comp(32, "head", _random(vit.init_head(CFG, 4), 32), True)]
    w.path(0, "NOT_TRAINABLE", -1, r, {}, 0.0, 0.0)
    w.path(7, "t_a", 0, a, {"opt_lr": 0.02, "num_classes": 3, "opt_nesterov": True}, 0.9, 0.8)
    w.path(9, "t_b", 7, b, {"num_layers": 1, "ds_image_size": 8, "ds_crop": False, "num_classes": 5,
                            "ds_hue_delta": 0.1}, 0.7, 0.6)
    w.path(15, "t_c", 7, c, {"num_classes": 4, "_mu_": 0.14}, 0.8, 0.75)
    w.path(16, "t_c", 15, c_worse, {"num_classes": 4}, 0.6, 0.5)
    return w


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    exp = tmp_path_factory.mktemp("exp")
    w = _state(max_chunk=256)  # small chunks: every kernel of the tiny ViT is stored chunked
    Writer().save(exp, 2, 0)  # an older state: the latest (natural order, 10 > 2) is read
    (exp / "state_2_0" / "population.csv").write_text("garbage")
    state = w.save(exp, 10, 0, max_chunk=256)
    (state / "checkpoint_10_tmp").write_bytes(b"half written")  # Flax's temporary file is ignored
    return w, exp, state


def _x(res, n=3):
    return jnp.asarray(np.random.default_rng(res).uniform(-1, 1, (n, res, res, 3)), jnp.float32)


def test_same_models_sharing_and_logits(written):
    w, exp, state = written
    s = published.read(str(exp))
    assert s.cfg == CFG
    assert set(s.models) == {"t_a", "t_b", "t_c"}
    ids = {t: m.components for t, m in s.models.items()}
    assert s.root.components == ("embedding:0", "cls:1", "posembed_input:2", "encoderblock_0:3",
                                 "encoderblock_1:4", "encoder_norm:5", "head:6")
    assert ids["t_a"] == ("embedding:0", "cls:1", "posembed_input:2", "encoderblock_0:3", "encoderblock_1:11",
                          "encoder_norm:12", "head:13")
    assert ids["t_b"] == ("embedding:0", "cls:1", "posembed_input:20", "encoderblock_0:3", "encoder_norm:21",
                          "head:22")
    assert ids["t_c"] == ("embedding:0", "cls:1", "posembed_input:2", "encoderblock_0:3", "encoderblock_1:11",
                          "encoder_norm:30", "head:31")  # the best t_c path, in forward order
    assert "head:32" not in s.params and set(s.params) == s.component_ids()
    assert mu2net.sharers(s, "t_a")["encoderblock_1:11"] == 1  # t_c uses t_a's block: shared by id
    assert s.models["t_b"].parent == "t_a/7" and s.models["t_a"].parent == mu2net.ROOT
    assert s.lineage["t_c/15"] == ("t_a/7", ids["t_c"]) and s.counter == 33
    for t, m in s.models.items():
        want = [w.comps[int(c.split(":")[1])][1] for c in m.components]
        res = int(m.hp["resolution"])
        np.testing.assert_array_equal(_fwd(mu2net.assemble(s, m), _x(res)), _fwd(want, _x(res)))
    for cid, mom in s.momentum.items():
        written_mom = w.comps[int(cid.split(":")[1])][2]
        got = [np.asarray(a) for a in jax.tree.leaves(mom)]
        assert all(a.dtype == ml_dtypes.bfloat16 for a in got)
        if written_mom is None:  # root components carry no optimizer state
            assert not any(a.any() for a in got)
        else:
            assert all((a == np.asarray(b)).all() for a, b in zip(got, jax.tree.leaves(written_mom), strict=True))


def test_hyperparameters_and_metrics(written):
    s = published.read(str(written[2]))  # the state folder itself
    a, b, c = (s.models[t] for t in ("t_a", "t_b", "t_c"))
    assert a.hp == dict(lr=0.02, warmup=0.05, momentum=0.9, nesterov=True, crop_area_min=0.05, crop_aspect_min=0.75,
                        flip=True, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, resolution=16, mu=0.2,
                        num_layers=2, quality=0.0)
    assert (b.hp["crop_area_min"], b.hp["crop_aspect_min"], b.hp["resolution"], b.hp["num_layers"],
            b.hp["hue"]) == (1.0, 1.0, 8, 1, 0.1)
    # μ2Net's offsprings_per_task ({own task: 2, "x": 1} in the writer) go on as #selections (mu2net.selections).
    assert c.hp["mu"] == 0.14 and c.metrics == {"quality": 0.8, "test": pytest.approx(0.79), "score": 0.75,
                                                "selections:t_c": 2, "selections:x": 1}
    assert s.root.hp == {} and s.root.metrics == {"selections:NOT_TRAINABLE": 2, "selections:x": 1}
    assert mu2net.selections(s, "x") == {m.id: 1 for m in (s.root, *s.models.values())}


def test_zip_reads_the_same(written, tmp_path):
    _, exp, _ = written
    z = tmp_path / "mu2net186.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in sorted(exp.rglob("*")):
            if p.is_file():
                f.write(p, Path("experiment") / p.relative_to(exp))
    assert mu2net.identical(published.read(str(z)), published.read(str(exp)))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_states_name_the_file(written, tmp_path):
    _, _, state = written
    ck = "checkpoint_10_0"
    t = _copy(state, tmp_path / "trunc")
    (t / ck).write_bytes((t / ck).read_bytes()[:5000])
    with pytest.raises(published.StateError, match=rf"{t / ck}.*truncated"):
        published.read(str(t))
    g = _copy(state, tmp_path / "gone")
    pop = (g / "population.csv").read_text().replace("_13", "_99")
    (g / "population.csv").write_text(pop)
    with pytest.raises(published.StateError, match=r"population.csv: path 7 \(t_a\): components \[99\]"):
        published.read(str(g))
    (g / "population.csv").unlink()
    with pytest.raises(published.StateError, match="no population.csv"):
        published.read(str(g))
    n = _copy(state, tmp_path / "noname")
    (n / "components.csv").write_text((n / "components.csv").read_text().replace("13,head", "13,cls"))
    with pytest.raises(published.StateError, match=r"components.csv: component 13 is named 'cls'"):
        published.read(str(n))
    with pytest.raises(published.StateError, match="no such folder"):
        published.read(str(tmp_path / "nowhere"))
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(published.StateError, match=r"x.zip: not a folder and not a readable .zip"):
        published.read(str(tmp_path / "x.zip"))
