"""Peak memory of `published.read` on a generated μ2Net state (the notebook's layout, published.py) of a given size.

    python bench/published_memory.py [--gb 1.0] [--config B/16] [--zip stored|deflated] [--dir DIR]

Writes, one component at a time, a state in a temp folder (or DIR): a root without optimizer state and tasks whose
models clone all but the root's first block (parameters float32, momentum bfloat16), until the checkpoint's arrays
take --gb GB; --zip also packs the folder into a .zip. A fresh Python process then imports published, resets its
peak resident set size (/proc/self/clear_refs), reads the state and prints, as one JSON line: the checkpoint's
array bytes, the bytes the read System holds, and the process's peak RSS above what it was before the read. The
reader streams the checkpoint, so that peak stays within the arrays it keeps plus about one checkpoint entry.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import vit  # noqa: E402

HP = {"opt_lr": 0.01, "opt_lr_warmup_ratio": 0.05, "opt_momentum": 0.9, "opt_nesterov": False, "ds_image_size": None,
      "ds_crop": True, "ds_area_range_min": 0.05, "ds_aspect_ratio_range_min": 0.75, "ds_flip_left_right": True,
      "ds_brightness_delta": 0.0, "ds_contrast_delta": 0.0, "ds_saturation_delta": 0.0, "ds_hue_delta": 0.0,
      "_mu_": 0.2, "num_layers": None}


def _flax(tree, dtype, rng) -> dict | msgpack.ExtType:
    """A component's shapes -> the Flax msgpack value of random arrays (ExtType 1 per array, nested by name)."""
    if isinstance(tree, dict):
        return {k: _flax(v, dtype, rng) for k, v in tree.items()}
    a = rng.standard_normal(tree.shape, np.float32).astype(dtype)
    return msgpack.ExtType(1, msgpack.packb((a.shape, a.dtype.name, a.tobytes()), use_bin_type=True))


def _nested(module) -> dict:
    """A component's abstract arrays nested by AugReg name (`cls` bare, as the notebook stores it)."""
    flat = vit.flat(module)
    if list(flat) == ["cls"]:
        return flat["cls"]
    out: dict = {}
    for k, a in flat.items():
        *parents, leaf = k.split("/")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = a
    return out


def _nbytes(module, dtype) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(dtype).itemsize for a in vit.flat(module).values())


def generate(d: Path, gb: float, config: str) -> int:
    """Writes state_1_0/{population.csv, checkpoint_1_0} under `d`; returns the checkpoint's array bytes."""
    import ml_dtypes
    cfg, res = vit.CONFIGS[config], 224 if config.endswith("/16") else 16
    root = jax.eval_shape(lambda: vit.init(cfg, jax.random.key(0), 10, res))
    ids = {name: i for i, name in enumerate(root)}
    entries = [(f"{n}:{i}", root[n], np.float32) for n, i in ids.items()]
    total = sum(_nbytes(m, np.float32) for _, m, _ in entries)
    rows = [dict(task_name="NOT_TRAINABLE", id=0, parent_id=-1, components="_".join(map(str, ids.values())))]
    nxt, t = len(ids), 0
    trained = [n for n in root if n not in ("embedding", "cls", "encoderblock_0")]
    while total < gb * 1e9:
        comps = dict(ids)
        for n in trained:
            comps[n] = nxt
            entries += [(f"{n}:{nxt}", root[n], np.float32), (f"opt_state:{n}:{nxt}", root[n], ml_dtypes.bfloat16)]
            total += _nbytes(root[n], np.float32) + _nbytes(root[n], ml_dtypes.bfloat16)
            nxt += 1
        rows.append(dict(task_name=f"task_{t}", id=nxt, parent_id=0, components="_".join(map(str, comps.values()))))
        nxt, t = nxt + 1, t + 1
    state = d / "state_1_0"
    state.mkdir(parents=True)
    with open(state / "population.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [*rows[0], *(f"hparams.{k}" for k in HP), "score"])
        w.writeheader()
        for r in rows:
            hp = dict(HP, ds_image_size=res, num_layers=cfg.depth)
            w.writerow({**r, **{f"hparams.{k}": v for k, v in hp.items()}, "score": 0.5})
    with open(state / "checkpoint_1_0", "wb") as f:
        pk = msgpack.Packer(use_bin_type=True)
        f.write(pk.pack_map_header(len(entries)))
        for i, (key, module, dt) in enumerate(entries):  # one component in memory at a time
            f.write(pk.pack(key))
            f.write(pk.pack(_flax(_nested(module), dt, np.random.default_rng(i))))
    return total


MEASURE = r"""
import json, os, resource, sys, time
import jax
import published
def status(k):
    for line in open("/proc/self/status"):
        if line.startswith(k + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak, to the current RSS
    how = "VmHWM after clear_refs"
except OSError:
    how = "ru_maxrss (includes the imports)"
t = time.perf_counter()
s = published.read(sys.argv[1])
sec = time.perf_counter() - t
peak = status("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(a.nbytes for t in (s.params, s.momentum) for a in jax.tree.leaves(t))
print(json.dumps(dict(rss_before=before, peak=peak, peak_above_before=peak - before, held=held, how=how,
                      seconds=round(sec, 2))))
"""


def measure(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path)], cwd=path.parent, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(HERE))))
    if r.returncode:
        raise SystemExit(f"the reading process failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="array bytes of the generated checkpoint, in GB")
    ap.add_argument("--config", default="B/16", help="ViT config of the components (vit.CONFIGS)")
    ap.add_argument("--zip", choices=("stored", "deflated"), help="also read the state as a .zip of its folder")
    ap.add_argument("--dir", help="where to write the state (default: a temp folder, removed afterwards)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mu2net-bench-", dir=a.dir) as tmp:
        d = Path(tmp) / "experiment"
        t = time.perf_counter()
        arrays = generate(d, a.gb, a.config)
        out = {"config": a.config, "array_bytes": arrays,
               "file_bytes": sum(p.stat().st_size for p in d.rglob("*") if p.is_file()),
               "generated_s": round(time.perf_counter() - t, 1), "folder": measure(d)}
        if a.zip:
            z = Path(tmp) / "state.zip"
            with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED if a.zip == "stored" else zipfile.ZIP_DEFLATED) as f:
                for p in sorted(d.rglob("*")):
                    if p.is_file():
                        f.write(p, p.relative_to(d.parent))
            out[f"zip_{a.zip}"] = measure(z)
    for k in ("folder", "zip_stored", "zip_deflated"):
        if k in out:
            m = out[k]
            print(f"{k}: peak RSS {m['peak_above_before'] / 1e9:.3f} GB above the {m['rss_before'] / 1e9:.3f} GB "
                  f"before the read; checkpoint arrays {arrays / 1e9:.3f} GB, held by the system "
                  f"{m['held'] / 1e9:.3f} GB; read in {m['seconds']} s ({m['how']})", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
