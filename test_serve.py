"""serve.py: predict gives a trained tiny system's labels for a folder of image files; export then vit.load_augreg
gives identical logits."""

import csv
import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import augment
import conftest
import data
import methods
import mu2net
import serve
import vit
from conftest import U32

CFG = vit.CONFIGS["tiny"]
S = 16  # the run's image size; digits keep their own 8 px (data.native_size), so served images are read at 8
_fwd = jax.jit(vit.forward)  # eager would compile op by op


@pytest.fixture(scope="module")
def trained():
    """A random tiny root fine-tuned on scikit-learn digits by one short task iteration."""
    space = methods.search_space(CFG.depth, (S,), resolution=S)
    space = dataclasses.replace(space, defaults={**space.defaults, "lr": 0.1})
    conf = methods.Config(space, methods.METHODS["finetune"], methods.Budget(generations=1, children=1, cycles=8,
                                                                            samples_cap=1024, batch_size=32))
    task = data.make_task_data(data.load_catalog()["digits"], S)
    s0 = mu2net.new_system(CFG, vit.init(CFG, jax.random.key(0), 10, S), {})
    return conftest.task_iteration(s0, task, conf, jax.random.key(1)), task


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    """The first 40 test images of digits as 8-px PNG files in class subfolders (named by their true label)."""
    _, task = trained
    d = tmp_path_factory.mktemp("digits")
    src = task.source("test")
    for i in range(40):
        ex = src[i]
        (d / str(ex["label"])).mkdir(exist_ok=True)
        Image.fromarray(np.asarray(ex["image"])[..., 0]).save(d / str(ex["label"]) / f"{i:03d}.png")
    return d


def test_predict_on_a_folder_gives_the_systems_labels(trained, folder):
    system, task = trained
    m = system.models["digits"]
    files = serve.image_files([folder])
    assert len(files) == 40 and files == sorted(files)
    assert task.image_size == 8
    preds = serve.predict(system, "digits", files, data.class_names(task.spec), task.image_size, top_k=3)
    # Expected: the labels the system's own evaluation gives the same images read through data.py.
    idx = np.asarray([int(f.stem) for f in files])
    x, y = task.examples("test", idx)
    z = _fwd(mu2net.assemble(system, m), jax.jit(augment.eval_preprocess, static_argnums=1)(x, m.hp["resolution"]))
    want = np.asarray(jnp.argmax(z, axis=-1))
    assert [p.top[0][0] for p in preds] == want.tolist()
    assert [p.top[0][1] for p in preds] == [str(j) for j in want]  # digits' class names are the digits
    truth = np.asarray([int(f.parent.name) for f in files])
    assert (truth == y).all() and (want == truth).mean() >= 0.5  # learned: chance is 0.1
    for p in preds:
        probs = [q for _, _, q in p.top]
        # a float32 softmax over 10 classes sums to 1 within 10·U, and so do any 3 of its terms
        assert len(p.top) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 10 * U32


def test_render_formats(trained, folder):
    system, task = trained
    files = serve.image_files([folder / "0", folder / "1"])
    preds = serve.predict(system, "digits", files, data.class_names(task.spec), task.image_size, top_k=2)
    table = serve.render(preds, "table").splitlines()
    assert table[0].split() == ["file", "top-1", "top-2"] and len(table) == 1 + len(files)
    assert table[1].startswith(str(files[0])) and "%)" in table[1]
    js = json.loads(serve.render(preds, "json"))
    assert js[0]["file"] == str(files[0]) and [t["label"] for t in js[0]["top"]] == [j for j, _, _ in preds[0].top]
    rows = list(csv.DictReader(io.StringIO(serve.render(preds, "csv"))))
    assert len(rows) == 2 * len(files) and rows[1]["rank"] == "2" and rows[0]["class"] == preds[0].top[0][1]
    with pytest.raises(serve.ServeError, match="xml"):
        serve.render(preds, "xml")


def test_predict_errors(trained, folder, tmp_path):
    system, task = trained
    with pytest.raises(serve.ServeError, match=r"'nope'.*\['digits'\]"):
        serve.predict(system, "nope", [], [], S)
    with pytest.raises(data.MissingData, match="nothere.png"):
        serve.image_files([folder, tmp_path / "nothere.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad2.jpg").write_bytes(b"neither")
    with pytest.raises(data.DataError, match=r"2 image\(s\) cannot be decoded: .*bad.png.*bad2.jpg"):
        serve.predict(system, "digits", serve.image_files([tmp_path]), data.class_names(task.spec), S)


def test_export_then_load_augreg_gives_identical_logits(trained, tmp_path):
    system, task = trained
    m = system.models["digits"]
    npz, side = serve.export(system, "digits", tmp_path / "digits.npz", data.class_names(task.spec),
                             {"run": "test"})
    with np.load(npz) as z:
        assert all(k.split("/")[0] in ("embedding", "cls", "Transformer", "head") for k in z.files)
    meta = json.loads(side.read_text())
    assert meta["resolution"] == m.hp["resolution"] and meta["classes"] == [str(i) for i in range(10)]
    assert meta["config"] == dataclasses.asdict(CFG) and meta["source"] == {"run": "test"}
    loaded = vit.load_augreg(npz)  # no config given: inferred from the file
    x = jax.jit(augment.eval_preprocess, static_argnums=1)(task.examples("test", np.arange(8))[0], meta["resolution"])
    np.testing.assert_array_equal(_fwd(list(loaded.values()), x), _fwd(mu2net.assemble(system, m), x))
    with pytest.raises(serve.ServeError, match=r"\.npz"):
        serve.export(system, "digits", tmp_path / "digits.bin", data.class_names(task.spec))
    with pytest.raises(serve.ServeError, match="3 class names for a head of 10"):
        serve.export(system, "digits", tmp_path / "d.npz", ["a", "b", "c"])
