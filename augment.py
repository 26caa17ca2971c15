"""Table 1 data preprocessing as pure, keyed JAX functions that run on device inside a jitted train step.

Paper Table 1 ("Data Preprocessing hyperparameters") and docs/method.md, "Data": train order is
JPEG quality -> crop -> flip -> colour jitter -> resize -> scale to [-1, 1]; evaluation is a plain resize.

Every hyperparameter is a traced float32 scalar (`Aug`), so changing a value never recompiles, and every
shape depends only on the input shape and the static `res`. To keep shapes static, crop, flip and resize are
one bilinear resampling of a traced box (two [res, S] weight matrices per example); the colour jitter is applied
to that resampled crop. Jitter is per-pixel plus a per-channel mean, and bilinear resampling is a per-pixel
convex combination, so this equals jitter-then-resize except for the clips and the (nonlinear) HSV step -- and it
is cheaper, since res <= S in practice.

All defaults (area_min = aspect_min = 1, flip off, deltas 0) are the identity up to the resize: the sampled box
is exactly the whole image, and each jitter is written as `x + (factor - 1) * (...)` with `factor - 1 == 0`
exactly; the HSV round trip and JPEG are skipped outright (lax.cond on the unbatched delta) at delta 0.
"""
from __future__ import annotations

from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

_F = jnp.float32
_HI = jax.lax.Precision.HIGHEST  # TF32/bf16 matmuls would move DCT coefficients across rounding boundaries

_KEYS = {"crop_area_min": "area_min", "crop_aspect_min": "aspect_min", "flip": "flip", "brightness": "brightness",
         "contrast": "contrast", "saturation": "saturation", "hue": "hue", "quality": "quality"}
_DEFAULTS = {"area_min": 1.0, "aspect_min": 1.0, "flip": 0.0, "brightness": 0.0, "contrast": 0.0,
             "saturation": 0.0, "hue": 0.0, "quality": 0.0}


class AugmentError(ValueError, KeyError):
    """An unknown augmentation hyperparameter."""

    __str__ = ValueError.__str__


class Aug(eqx.Module):
    """Table 1 data-preprocessing hyperparameters as float32 scalars (flip is 0./1.; quality is the image
    quality delta δ, JPEG quality ~ U[100(1-δ), 100])."""

    area_min: Array
    aspect_min: Array
    flip: Array
    brightness: Array
    contrast: Array
    saturation: Array
    hue: Array
    quality: Array

    @staticmethod
    def from_hparams(hp: Mapping[str, float | bool]) -> Aug:
        """Keys crop_area_min, crop_aspect_min, flip, brightness, contrast, saturation, hue, quality; a missing key
        takes its μ2Net+ default (Table 1 bold: every preprocessing off)."""
        unknown = sorted(set(hp) - set(_KEYS))
        if unknown:
            raise AugmentError(f"unknown augmentation hyperparameter(s) {unknown}; known: {sorted(_KEYS)}")
        v = dict(_DEFAULTS) | {_KEYS[k]: float(x) for k, x in hp.items()}
        return Aug(**{k: jnp.asarray(x, dtype=_F) for k, x in v.items()})


# ---------------------------------------------------------------------------------------------------- crop+resize

def sample_box(key: Array, area_min: Array, aspect_min: Array) -> Array:
    """Inception crop box (y0, x0, h, w) as fractions of the side, like TF's sample_distorted_bounding_box.

    Rule: area fraction a ~ U[area_min, 1]; aspect r = w/h log-uniform in [aspect_min, 1/aspect_min]; r is then
    clipped to [a, 1/a], the exact set where w = sqrt(a r) <= 1 and h = sqrt(a / r) <= 1, so the box fits with
    its area exactly a and its aspect still inside the bounds (TF instead retries up to 100 times and falls back
    to the whole image). Offsets are uniform over the positions that keep the box inside. Boxes are continuous
    (no snapping to pixels). area_min = aspect_min = 1 gives exactly (0, 0, 1, 1).
    """
    ka, kr, ky, kx = jax.random.split(key, 4)
    a = area_min + (1.0 - area_min) * jax.random.uniform(ka, (), _F)
    r = jnp.exp(jnp.log(aspect_min) * jax.random.uniform(kr, (), _F, -1.0, 1.0))
    r = jnp.clip(r, a, 1.0 / a)
    h, w = jnp.minimum(jnp.sqrt(a / r), 1.0), jnp.minimum(jnp.sqrt(a * r), 1.0)
    y0 = (1.0 - h) * jax.random.uniform(ky, (), _F)
    x0 = (1.0 - w) * jax.random.uniform(kx, (), _F)
    return jnp.stack([y0, x0, h, w])


def _weights(start: Array, extent: Array, n_in: int, n_out: int) -> Array:
    """[n_out, n_in] bilinear (triangle) weights sampling [start, start+extent] (fractions) onto n_out pixels;
    the kernel widens by the downsampling factor (antialias), as jax.image.resize(method="linear")."""
    step = extent * n_in / n_out
    p = start * n_in + (jnp.arange(n_out, dtype=_F) + 0.5) * step - 0.5  # sample centres, input index space
    d = jnp.abs(jnp.arange(n_in, dtype=_F)[None, :] - p[:, None]) / jnp.maximum(step, 1.0)
    w = jnp.maximum(0.0, 1.0 - d)
    return w / jnp.sum(w, axis=1, keepdims=True)  # renormalising at the borders = edge clamping


def resample(image: Array, box: Array, flip: Array, res: int) -> Array:
    """Crop `box` (y0, x0, h, w fractions) of image [S,S',C], flip it left/right if `flip`, resize to [res,res,C]."""
    wy = _weights(box[0], box[2], image.shape[0], res)
    wx = _weights(box[1], box[3], image.shape[1], res)
    wx = jnp.where(flip, wx[::-1], wx)  # the kernel is symmetric, so reversing output columns = flipping the crop
    return jnp.einsum("ys,stc,xt->yxc", wy, image, wx, precision=_HI)


# -------------------------------------------------------------------------------------------------- colour jitter

def rgb_to_hsv(x: Array) -> Array:
    """[..., 3] RGB in [0,1] -> HSV in [0,1] (hue as a fraction of a turn), as tf.image.rgb_to_hsv."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, mn = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    c = v - mn
    s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
    cs = jnp.where(c > 0, c, 1.0)
    h = jnp.where(v == r, (g - b) / cs, jnp.where(v == g, (b - r) / cs + 2.0, (r - g) / cs + 4.0))
    h = jnp.where(c > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(x: Array) -> Array:
    """[..., 3] HSV in [0,1] -> RGB; channel n is v - v s clip(min(k, 4-k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    n = jnp.asarray([5.0, 3.0, 1.0], _F).reshape((1,) * (h.ndim - 1) + (3,))
    k = jnp.mod(n + 6.0 * h, 6.0)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def color_jitter(key: Array, x: Array, aug: Aug) -> Array:
    """tf.image.random_{brightness, contrast, saturation, hue} with Table 1 max deltas, on x [H,W,3] in [0,1].

    brightness: + U[-δ, δ]; contrast: factor U[1-δ, 1+δ] about the per-channel mean; saturation: HSV S times
    U[1-δ, 1+δ] (as TF, not a grayscale blend); hue: HSV H + U[-δ, δ] turns. Fixed order, clip to [0,1] after
    each. Delta 0 is the exact identity; a gray input (S = 0) is left unchanged by saturation and hue.
    """
    kb, kc, ks, kh = jax.random.split(key, 4)
    u = lambda k: jax.random.uniform(k, (), _F, -1.0, 1.0)  # noqa: E731
    x = jnp.clip(x + aug.brightness * u(kb), 0.0, 1.0)
    m = jnp.mean(x, axis=(0, 1), keepdims=True)
    x = jnp.clip(x + aug.contrast * u(kc) * (x - m), 0.0, 1.0)

    def hsv_jitter(z: Array) -> Array:
        hsv = rgb_to_hsv(z)
        h = jnp.mod(hsv[..., 0:1] + aug.hue * u(kh), 1.0)
        s = jnp.clip(hsv[..., 1:2] * (1.0 + aug.saturation * u(ks)), 0.0, 1.0)
        return jnp.clip(hsv_to_rgb(jnp.concatenate([h, s, hsv[..., 2:3]], axis=-1)), 0.0, 1.0)

    # Skipped at delta 0 because the HSV round trip is not bit-exact; a real branch unless `aug` is batched.
    return jax.lax.cond((aug.saturation > 0) | (aug.hue > 0), hsv_jitter, lambda z: z, x)


# ----------------------------------------------------------------------------------------------------------- JPEG

# IJG / JPEG Annex K base quantisation tables, natural (row-major) order.
_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32).reshape(8, 8)
_CHROMA = np.full((8, 8), 99.0, np.float32)
_CHROMA[:4, :4] = np.array([17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99], np.float32).reshape(4, 4)
_DCT = (np.cos(np.pi * (2 * np.arange(8)[None, :] + 1) * np.arange(8)[:, None] / 16)
        * np.where(np.arange(8) == 0, np.sqrt(1 / 8), np.sqrt(2 / 8))[:, None]).astype(np.float32)  # orthonormal
_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], np.float32)
_CHROMA_OFFSET = np.array([0.0, 128.0, 128.0], np.float32)


def quant_table(base: Array, q: Array) -> Array:
    """libjpeg's jpeg_set_quality scaling of a base table at integer quality q in [1, 100], baseline-clamped."""
    s = jnp.where(q < 50, jnp.floor(5000.0 / q), 200.0 - 2.0 * q)
    return jnp.clip(jnp.floor((base * s + 50.0) / 100.0), 1.0, 255.0)


def _dct_roundtrip(x: Array, table: Array) -> Array:
    """Level-shifted plane [H,W] (multiples of 8) -> 8x8 DCT-II, quantise, dequantise, inverse DCT."""
    hb, wb = x.shape[0] // 8, x.shape[1] // 8
    d = jnp.asarray(_DCT)
    c = jnp.einsum("uy,aybx,vx->aubv", d, x.reshape(hb, 8, wb, 8), d, precision=_HI)
    t = table[None, :, None, :]
    c = jnp.round(c / t) * t
    return jnp.einsum("uy,aubv,vx->aybx", d, c, d, precision=_HI).reshape(x.shape)


def _upsample2(c: Array, axis: int) -> Array:
    """libjpeg's "fancy" (triangle) 2x upsampling along axis: 3/4 nearer + 1/4 farther, edges replicated."""
    n = c.shape[axis]
    prev = jnp.concatenate([jax.lax.slice_in_dim(c, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(c, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(c, 1, n, axis=axis),
                           jax.lax.slice_in_dim(c, n - 1, n, axis=axis)], axis=axis)
    even, odd = 0.75 * c + 0.25 * prev, 0.75 * c + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(c.shape[:axis] + (2 * n,) + c.shape[axis + 1:])


def jpeg(x: Array, q: Array) -> Array:
    """JPEG's lossy steps (libjpeg defaults, 4:2:0) on x [H,W,3] in [0,255] at integer quality q; [0,255] out.

    RGB->YCbCr (JFIF) rounded to 8 bits, 2x2 chroma average, level shift, 8x8 orthonormal DCT-II, quantise with
    the IJG tables scaled by q, dequantise, inverse DCT, fancy chroma upsampling, YCbCr->RGB, round, clip.
    Sizes that are not multiples of 16 (the 4:2:0 MCU) are edge-padded and cropped back, as libjpeg does.
    """
    hh, ww = x.shape[0], x.shape[1]
    ph, pw = -hh % 16, -ww % 16
    x = jnp.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge")
    off = jnp.asarray(_CHROMA_OFFSET)[None, None, :]
    ycc = jnp.clip(jnp.round(jnp.einsum("hwc,dc->hwd", x, jnp.asarray(_TO_YCC), precision=_HI) + off), 0.0, 255.0)
    hp, wp = ycc.shape[0], ycc.shape[1]
    cc = jnp.round(jnp.mean(ycc[..., 1:].reshape(hp // 2, 2, wp // 2, 2, 2), axis=(1, 3)))
    lt, ct = quant_table(jnp.asarray(_LUMA), q), quant_table(jnp.asarray(_CHROMA), q)
    decode = lambda p, t: jnp.clip(jnp.round(_dct_roundtrip(p - 128.0, t) + 128.0), 0.0, 255.0)  # noqa: E731
    y = decode(ycc[..., 0], lt)
    cc = jnp.stack([decode(cc[..., 0], ct), decode(cc[..., 1], ct)], axis=-1)
    cc = jnp.round(_upsample2(_upsample2(cc, 0), 1))
    ycc = jnp.concatenate([y[..., None], cc], axis=-1) - off
    rgb = jnp.clip(jnp.round(jnp.einsum("hwc,dc->hwd", ycc, jnp.asarray(_TO_RGB), precision=_HI)), 0.0, 255.0)
    return rgb[:hh, :ww]


def sample_quality(key: Array, delta: Array) -> Array:
    """Integer JPEG quality uniform over {round(100(1-δ)), ..., 100} (docs/method.md: q ~ U[100(1-δ), 100])."""
    lo = jnp.clip(jnp.round(100.0 * (1.0 - delta)), 1.0, 100.0)
    return jnp.minimum(lo + jnp.floor(jax.random.uniform(key, (), _F) * (101.0 - lo)), 100.0)


# ------------------------------------------------------------------------------------------------------ pipelines

def _scale(x: Array) -> Array:
    return 2.0 * jnp.clip(x, 0.0, 1.0) - 1.0  # [0,1] -> [-1,1], same as x_uint8 / 127.5 - 1


def _train_one(key: Array, image: Array, aug: Aug, res: int) -> Array:
    kq, kb, kf, kc = jax.random.split(key, 4)
    x = image.astype(_F)
    # An unbatched predicate keeps this a real branch under vmap, so δ = 0 costs nothing and is exact.
    x = jax.lax.cond(aug.quality > 0, lambda z: jpeg(z, sample_quality(kq, aug.quality)), lambda z: z, x)
    box = sample_box(kb, aug.area_min, aug.aspect_min)
    flip = (aug.flip > 0.5) & (jax.random.uniform(kf, (), _F) < 0.5)
    x = resample(x / 255.0, box, flip, res)
    return _scale(color_jitter(kc, jnp.clip(x, 0.0, 1.0), aug))


def train_preprocess(key: Array, images: Array, aug: Aug, res: int) -> Array:
    """uint8 [B,S,S,3] -> float32 [B,res,res,3] in [-1,1] with the Table 1 augmentations, independent per example.

    Order (docs/method.md): JPEG quality -> crop -> flip -> colour jitter -> resize -> scale, with crop, flip and
    resize fused into one resampling (module docstring). `res` must be static; `aug` may be traced.
    """
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(_train_one, in_axes=(0, 0, None, None))(keys, images, aug, res)


def eval_preprocess(images: Array, res: int) -> Array:
    """uint8 [B,S,S,3] -> float32 [B,res,res,3] in [-1,1]: plain (antialiased bilinear) resize, no augmentation."""
    box = jnp.asarray([0.0, 0.0, 1.0, 1.0], _F)
    one = lambda im: _scale(resample(im.astype(_F) / 255.0, box, jnp.asarray(False), res))  # noqa: E731
    return jax.vmap(one)(images)
