"""Tests for augment.py: Table 1 preprocessing (paper Table 1, docs/method.md, "Data")."""
import colorsys
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import augment as A
from conftest import U32

F = jnp.float32


def _resize_tol(s: int) -> float:
    """How far a float32 resize of an s-pixel image (`resample`: two contractions of s terms with weights ≥ 0
    that sum to 1, Higham's γ_s each, plus the weights' own rounding) can be from the exact one, on the [-1, 1]
    scale (twice the [0, 1] one)."""
    return 2 * (2 * s + 4) * U32


def _images(b: int = 6, s: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth-ish random colour images (noise would make every resampling test trivially loose)."""
    r = np.random.default_rng(seed)
    low = r.integers(0, 256, (b, s // 4, s // 4, 3)).astype(np.float32)
    up = np.asarray(jax.image.resize(jnp.asarray(low), (b, s, s, 3), "linear"))
    return np.clip(np.round(up + r.normal(0, 8, up.shape)), 0, 255).astype(np.uint8)


def _china_crops() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg")
    # 80x90 exercises the edge padding to the 16-pixel MCU.
    return [img[100:228, 200:328], img[250:330, 300:390], img[230:422, 0:192]]


def _pil_jpeg(x: np.ndarray, q: int) -> np.ndarray:
    b = io.BytesIO()
    Image.fromarray(x).save(b, format="JPEG", quality=q, subsampling=2)  # 4:2:0
    return np.asarray(Image.open(b).convert("RGB"))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


AUGS = {
    "crop": {"crop_area_min": 0.05, "crop_aspect_min": 0.5},
    "flip": {"flip": True},
    "brightness": {"brightness": 0.2},
    "contrast": {"contrast": 0.2},
    "saturation": {"saturation": 0.2},
    "hue": {"hue": 0.2},
    "quality": {"quality": 0.2},
}
ALL_ON = {k: v for d in AUGS.values() for k, v in d.items()}

train = jax.jit(A.train_preprocess, static_argnums=3)
evaluate = jax.jit(A.eval_preprocess, static_argnums=1)


def test_from_hparams():
    a = A.Aug.from_hparams({"flip": True, "crop_area_min": 0.5})
    assert a.flip.dtype == jnp.float32 and a.flip.shape == () and float(a.flip) == 1.0
    assert float(a.area_min) == 0.5 and float(a.aspect_min) == 1.0 and float(a.quality) == 0.0
    with pytest.raises(KeyError, match="crop_min"):
        A.Aug.from_hparams({"crop_min": 0.5})


@pytest.mark.parametrize("s,res", [(32, 32), (32, 16), (48, 32), (24, 32)])
def test_defaults_are_identity(s, res):
    x = _images(5, s)
    ref = evaluate(x, res)
    out = train(jax.random.key(1), x, A.Aug.from_hparams({}), res)
    assert out.shape == (5, res, res, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=2 * _resize_tol(s), rtol=0)  # two resizes, each within the bound


def test_each_knob_acts():
    x = _images(5, 32)
    ref = evaluate(x, 16)
    for name, hp in AUGS.items():
        assert not np.allclose(train(jax.random.key(1), x, A.Aug.from_hparams(hp), 16), ref, atol=1e-3), name


def test_eval_is_plain_resize():
    x = _images(3, 48)
    for res in (16, 32, 64):
        ref = jax.image.resize(jnp.asarray(x, F), (3, res, res, 3), "linear", antialias=True) / 127.5 - 1.0
        np.testing.assert_allclose(evaluate(x, res), ref, rtol=0, atol=2 * _resize_tol(48))
    assert float(evaluate(x, 16).min()) >= -1.0 and float(evaluate(x, 16).max()) <= 1.0


def test_output_range_and_determinism():
    x = _images(8, 32)
    aug = A.Aug.from_hparams(ALL_ON)
    a, b = train(jax.random.key(3), x, aug, 24), train(jax.random.key(3), x, aug, 24)
    c = train(jax.random.key(4), x, aug, 24)
    assert a.shape == (8, 24, 24, 3) and bool(jnp.all(jnp.isfinite(a)))
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_no_recompile_on_values():
    f = jax.jit(lambda k, x, a: A.train_preprocess(k, x, a, 16))  # a fresh function: jit caches are per function
    x = _images(4, 32)
    f(jax.random.key(0), x, A.Aug.from_hparams({}))
    f(jax.random.key(0), x, A.Aug.from_hparams(ALL_ON))
    f(jax.random.key(1), x, A.Aug.from_hparams({"quality": 0.01, "crop_area_min": 0.95, "hue": 0.02}))
    assert f._cache_size() == 1


def test_box_bounds():
    keys = jax.random.split(jax.random.key(0), 4000)
    for amin, rmin in [(0.05, 0.5), (0.5, 0.75), (0.95, 0.5), (0.05, 1.0), (1.0, 0.5)]:
        b = np.asarray(jax.vmap(A.sample_box, in_axes=(0, None, None))(keys, F(amin), F(rmin)))
        y0, x0, h, w = b.T
        area, aspect = h * w, w / h
        e = 16 * U32  # values ≤ 2 through ≤ 8 float32 operations (log, exp, sqrt, products) from the uniform draws
        assert area.min() >= amin - e and area.max() <= 1 + e
        assert aspect.min() >= rmin - e and aspect.max() <= 1 / rmin + e
        assert y0.min() >= 0 and x0.min() >= 0 and (y0 + h).max() <= 1 + e and (x0 + w).max() <= 1 + e
        if amin < 1:  # the area spans its range
            assert area.min() < amin + 0.05 * (1 - amin) and area.max() > 1 - 0.05 * (1 - amin)
    full = A.sample_box(jax.random.key(7), F(1.0), F(1.0))
    np.testing.assert_array_equal(full, np.array([0, 0, 1, 1], np.float32))


def test_crop_is_a_zoom():
    """A crop of a known box resamples exactly that region: compare with cropping in numpy then resizing."""
    x = _images(1, 32)[0].astype(np.float32) / 255.0
    box = jnp.asarray([0.25, 0.5, 0.5, 0.5], F)  # rows 8..24, cols 16..32
    got = A.resample(jnp.asarray(x), box, jnp.asarray(False), 16)
    tol = _resize_tol(32) / 2  # on the [0, 1] scale
    np.testing.assert_allclose(got, x[8:24, 16:32], rtol=0, atol=tol)
    got = A.resample(jnp.asarray(x), box, jnp.asarray(True), 16)
    np.testing.assert_allclose(got, x[8:24, 16:32][:, ::-1], rtol=0, atol=tol)


def test_flip_rate():
    x = np.repeat(_images(1, 32), 400, axis=0)
    ref = np.asarray(evaluate(x[:1], 16))[0]
    out = np.asarray(train(jax.random.key(5), x, A.Aug.from_hparams({"flip": True}), 16))
    tol = 2 * _resize_tol(32)  # two resizes; a flip moves the image by far more
    same = np.all(np.abs(out - ref[None]) <= tol, axis=(1, 2, 3))
    flipped = np.all(np.abs(out - ref[None, :, ::-1]) <= tol, axis=(1, 2, 3))
    assert np.all(same ^ flipped)
    assert 0.4 < flipped.mean() < 0.6


def test_color_jitter_bounds():
    x = np.repeat(_images(1, 32), 200, axis=0)
    ref = np.asarray(evaluate(x[:1], 32))[0][None]
    slack = 2 * _resize_tol(32) + 8 * U32  # two resizes, then a few roundings of values ≤ 2 (shift, scale, mean)
    for d in (0.05, 0.2):
        out = np.asarray(train(jax.random.key(2), x, A.Aug.from_hparams({"brightness": d}), 32))
        diff = np.abs(out - ref)  # [-1,1] scale: the [0,1] shift doubles
        assert diff.max() <= 2 * d + slack and diff.max() > 1.5 * d
        out = np.asarray(train(jax.random.key(2), x, A.Aug.from_hparams({"contrast": d}), 32))
        m = ref.mean(axis=(1, 2), keepdims=True)
        assert np.all(np.abs(out - ref) <= d * np.abs(ref - m) + slack)
        assert np.abs(out - ref).max() > 0.5 * d * np.abs(ref - m).max()
    for hp in ({"saturation": 0.2}, {"hue": 0.2}):
        out = np.asarray(train(jax.random.key(2), x, A.Aug.from_hparams(hp), 32))
        assert out.min() >= -1 and out.max() <= 1 and np.abs(out - ref).max() > 0.01
        # Saturation and hue keep the HSV value (max channel).
        np.testing.assert_allclose(out.max(-1), np.broadcast_to(ref.max(-1), out.shape[:-1]), rtol=0, atol=slack)


def test_gray_unaffected_by_saturation_hue():
    g = _images(4, 32)[..., :1]
    x = np.repeat(g, 3, axis=-1)
    out = train(jax.random.key(0), x, A.Aug.from_hparams({"saturation": 0.2, "hue": 0.2}), 16)
    np.testing.assert_allclose(out, evaluate(x, 16), rtol=0, atol=2 * _resize_tol(32))  # s = 0: v kept exactly


def test_hsv_matches_colorsys():
    rgb = np.random.default_rng(0).uniform(0, 1, (500, 3)).astype(np.float32)
    rgb[:10] = rgb[:10, :1]  # some grays
    hsv = np.asarray(A.rgb_to_hsv(jnp.asarray(rgb)))
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.astype(np.float64)])
    # v is exact (a max); s = c/v and the hue's (g - b)/c + offset (≤ 5), /6, take a few roundings each, and the
    # hue's divisor c = v - min carries v's rounding, U·v/c relative to it (large for nearly grey colours).
    c = ref[:, 1] * ref[:, 2]
    tol = np.stack([8 * U32 * (1 + ref[:, 2] / np.where(c > 0, c, 1.0)), np.full(len(c), 4 * U32),
                    np.zeros(len(c))], axis=1)
    assert np.all(np.abs(hsv - ref) <= tol)
    shifted = ref.copy()
    shifted[:, 0] = (shifted[:, 0] + 0.37) % 1.0
    back = np.asarray(A.hsv_to_rgb(jnp.asarray(shifted, F)))
    # k = (n + 6h) mod 6 is off by ≤ 6·U·2 (values ≤ 12), times v·s ≤ 1; the hue's own error carries over alike
    np.testing.assert_allclose(back, np.array([colorsys.hsv_to_rgb(*p) for p in shifted]), rtol=0, atol=16 * U32)
    assert np.all(np.abs(np.asarray(A.hsv_to_rgb(jnp.asarray(hsv))) - rgb) <= 16 * U32 + 6 * c[:, None] * tol[:, :1])


def test_quant_table_matches_libjpeg():
    def ijg(base, q):
        s = 5000 // q if q < 50 else 200 - 2 * q
        return np.clip((base.astype(np.int64) * s + 50) // 100, 1, 255)

    for q in (1, 10, 25, 49, 50, 51, 75, 80, 90, 99, 100):
        for base in (A._LUMA, A._CHROMA):
            np.testing.assert_array_equal(A.quant_table(jnp.asarray(base), F(q)), ijg(base, q))


def test_quality_sampling():
    keys = jax.random.split(jax.random.key(0), 3000)
    q = np.asarray(jax.vmap(A.sample_quality, in_axes=(0, None))(keys, F(0.2)))
    assert set(np.unique(q).tolist()) == set(range(80, 101))
    q = np.asarray(jax.vmap(A.sample_quality, in_axes=(0, None))(keys, F(0.01)))
    assert set(np.unique(q).tolist()) == {99.0, 100.0}


# Measured on these crops (q 50/75/90): ours vs Pillow 42.3-46.8 dB; Pillow vs original 24.9-32.5 dB.
@pytest.mark.parametrize("q", [50, 75, 90])
def test_jpeg_matches_pillow(q):
    f = jax.jit(A.jpeg)
    for c in _china_crops():
        ours = np.asarray(f(jnp.asarray(c, F), F(q)))
        pil = _pil_jpeg(c, q)
        assert ours.shape == c.shape
        assert _psnr(ours, pil) > 40.0, (c.shape, _psnr(ours, pil))
        # ...and much closer to Pillow than either is to the original.
        assert _psnr(ours, pil) > _psnr(pil, c) + 8.0
        assert abs(_psnr(ours, c) - _psnr(pil, c)) < 0.3


def test_jpeg_high_quality_close_to_identity():
    for c in _china_crops():
        ours = np.asarray(jax.jit(A.jpeg)(jnp.asarray(c, F), F(100)))
        assert _psnr(ours, c) > 32.0  # 4:2:0 chroma loss remains, as in libjpeg at q=100
        assert ours.min() >= 0 and ours.max() <= 255 and np.all(ours == np.round(ours))
