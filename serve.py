"""Using a trained system: a task's top-k labels for image files, and a task's model as a standalone checkpoint.

`predict` runs the retained model of one task (paper Section 3: a model is a path through the system's shared
components) on images prepared exactly as its test split was at training time: decoded with Pillow, resized to
the task's image size S on the host (data.to_rgb; the identity for an image already of that size), then to the
model's resolution on device (augment.eval_preprocess). `export` writes that model as an AugReg `.npz` (the
layout `vit.load_augreg` and other AugReg readers load) with a JSON sidecar holding what the arrays cannot: its
resolution and class names.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import tyro

import augment
import checkpoint
import data
import manifest
import mu2net
import vit

FORMATS = ("table", "json", "csv")


class ServeError(ValueError):
    """A request the system cannot answer (no model for the task, a bad output path, ...)."""


def model_of(system: mu2net.System, task: str) -> mu2net.Model:
    m = system.models.get(task)
    if m is None:
        raise ServeError(f"--task {task!r}: the system has no model for it; its tasks are {sorted(system.models)}")
    return m


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named, and those under the folders named (recursively, in sorted order)."""
    out, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in data.IMAGE_EXT)
            if not found:
                raise data.DataError(f"{p}: no image files ({', '.join(data.IMAGE_EXT)}) in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            missing.append(str(p))
    if missing:
        raise data.MissingData(f"no such file or folder: {', '.join(missing)}")
    if not out:
        raise data.DataError("no images given")
    return out


def read_images(files: Sequence[Path], size: int) -> np.ndarray:
    """uint8 [N, size, size, 3], as data.py prepares training images; every unreadable file named in one error."""
    out, bad = [], []
    for f in files:
        try:
            out.append(data.to_rgb(data.load_image(f), size))
        except data.DataError as e:
            bad.append(str(e).removeprefix("cannot decode image "))
    if bad:
        raise data.DataError(f"{len(bad)} image(s) cannot be decoded: {data._listed(bad)}")
    return np.stack(out)


@functools.partial(jax.jit, static_argnums=2)
def _probs(components: list, x: jax.Array, res: int) -> jax.Array:
    return jax.nn.softmax(vit.forward(components, augment.eval_preprocess(x, res)), axis=-1)


def probabilities(system: mu2net.System, task: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """[N, classes] softmax of the task's model on uint8 [N, S, S, 3] images (fixed-size batches: one compile)."""
    model = model_of(system, task)
    comps = mu2net.assemble(system, model)
    res = int(model.hp["resolution"])
    out = []
    for a in range(0, len(images), batch):
        x = images[a:a + batch]
        n = len(x)
        x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)]) if n < batch else x
        out.append(np.asarray(_probs(comps, x, res))[:n])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class Prediction:
    file: str
    top: tuple[tuple[int, str, float], ...]  # (label, class name, probability), best first


def predict(system: mu2net.System, task: str, files: Sequence[Path], classes: Sequence[str], image_size: int,
            top_k: int = 5) -> list[Prediction]:
    """The top-k labels of the task's model for each image file."""
    model = model_of(system, task)
    k = int(system.params[model.components[-1]].bias.shape[0])
    if len(classes) != k:
        raise ServeError(f"task {task!r}: {len(classes)} class names for a head of {k} classes")
    if top_k < 1:
        raise ServeError(f"--top-k {top_k}: expected an integer ≥ 1")
    p = probabilities(system, task, read_images(files, image_size))
    best = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    return [Prediction(str(f), tuple((int(j), classes[j], float(p[i, j])) for j in best[i]))
            for i, f in enumerate(files)]


def render(preds: Sequence[Prediction], fmt: str = "table") -> str:
    """Predictions as an aligned table, JSON (one object per file) or CSV (one row per file and rank)."""
    if fmt == "json":
        return json.dumps([{"file": p.file, "top": [{"label": j, "class": c, "prob": round(q, 6)} for j, c, q in p.top]}
                           for p in preds], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", "rank", "label", "class", "prob"])
        w.writerows([p.file, r + 1, j, c, f"{q:.6f}"] for p in preds for r, (j, c, q) in enumerate(p.top))
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ServeError(f"--format {fmt!r}: expected one of {FORMATS}")
    k = max(len(p.top) for p in preds)
    rows = [["file", *(f"top-{r + 1}" for r in range(k))]]
    rows += [[p.file, *(f"{c} ({q:.1%})" for _, c, q in p.top)] for p in preds]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def export(system: mu2net.System, task: str, out: str | os.PathLike, classes: Sequence[str],
           source: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Writes the task's model as an AugReg `.npz` (`embedding/…`, `cls`, `Transformer/…`, `head/…`; a model with
    residual adapters adds `Transformer/residual_adapter_{i}/…`) and `<out>.json` beside it (task, resolution,
    class names, config). Returns both paths."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ServeError(f"{out}: expected an output path ending in .npz")
    if not out.parent.is_dir():
        raise ServeError(f"{out}: the folder {out.parent} does not exist")
    model = model_of(system, task)
    comps = {mu2net.kind(c): system.params[c] for c in model.components}
    k = int(comps["head"].bias.shape[0])
    if len(classes) != k:
        raise ServeError(f"task {task!r}: {len(classes)} class names for a head of {k} classes")
    buf = io.BytesIO()
    vit.save_augreg(buf, comps)
    checkpoint.write_atomic(out, buf.getvalue())  # whole or not at all; an unwritable path is one error line
    cfg = vit.infer_config(vit.to_flat(comps))
    side = out.with_suffix(".json")
    checkpoint.write_atomic(side, (json.dumps({
        "format": "AugReg ViT .npz (big_vision / vision_transformer key layout); load with vit.load_augreg",
        "task": task, "resolution": int(model.hp["resolution"]), "num_classes": k, "classes": list(classes),
        "config": dataclasses.asdict(cfg), "preprocessing": "RGB in [-1, 1] (x / 127.5 - 1), bilinear resize",
        "model": model.id, "components": list(model.components), "metrics": dict(model.metrics),
        **({"source": source} if source else {})}, indent=2) + "\n").encode())
    return out, side


# --- from a run directory (`evolve.py predict`, `evolve.py export`) ---------------------------------------------


def served(run: str, task: str) -> tuple[mu2net.System, list[str], int, checkpoint.Checkpoint]:
    """A run's committed system, the task's class names and the size S its images were stored at in training."""
    d = Path(run)
    if not checkpoint.exists(d):
        raise checkpoint.CheckpointError(f"{d}: no committed run here (expected the --out directory of evolve.py)")
    ck = checkpoint.load(d)
    model = model_of(ck.system, task)
    m = manifest.validate(ck.extra["manifest"], str(d / "manifest.json"))
    classes = ck.extra.get("classes", {}).get(task)
    if classes is None:  # a run from before class names were kept: the catalog's, else the label numbers
        spec = None if task in m.tasks else data.resolve_tasks([task], m.catalog or None)[0]
        k = int(ck.system.params[model.components[-1]].bias.shape[0])
        classes = data.class_names(spec, m.data_dir or None) if spec else [str(i) for i in range(k)]
    # The size its images were stored at in training; a run from before sizes were kept stored every task at S.
    return ck.system, list(classes), int(ck.extra.get("sizes", {}).get(task, manifest.image_size(m))), ck


@dataclasses.dataclass
class PredictArgs:
    """The top-k labels, with class names, of one task's model for image files or folders (searched recursively),
    using the latest commit of a run directory."""

    run: tyro.conf.Positional[str]
    """Run directory of evolve.py."""
    paths: tyro.conf.Positional[tuple[str, ...]]
    """Image files or folders."""
    task: str
    """The task whose model answers."""
    top_k: int = 5
    """How many labels per image."""
    format: Literal["table", "json", "csv"] = "table"
    """Output format (to stdout)."""


@dataclasses.dataclass
class ExportArgs:
    """One task's model as a standalone AugReg-format .npz (vit.load_augreg and other AugReg readers load it),
    with OUT.json beside it: the model's resolution, class names and config."""

    run: tyro.conf.Positional[str]
    """Run directory of evolve.py."""
    out: tyro.conf.Positional[str]
    """Output path, ending in .npz."""
    task: str
    """The task whose model is exported."""


def predict_cli(a: PredictArgs) -> int:
    """`python evolve.py predict RUN PATH... --task T`: `predict` with the run's last commit."""
    if not a.paths:
        raise ServeError("predict: expected image files or folders after the run directory")
    system, classes, size, _ = served(a.run, a.task)
    print(render(predict(system, a.task, image_files(a.paths), classes, size, a.top_k), a.format))
    return 0


def export_cli(a: ExportArgs) -> int:
    """`python evolve.py export RUN OUT.npz --task T`: `export` of the run's last commit, its source (run, state,
    code version) recorded beside it."""
    system, classes, _, ck = served(a.run, a.task)
    npz, side = export(system, a.task, a.out, classes, {"run": str(Path(a.run).resolve()), "state": ck.state,
                                                        "version": ck.extra.get("version")})
    print(f"wrote {npz} and {side}")
    return 0
