"""The Vision Transformer as named components (paper Section 3, Figure 1; docs/method.md, "Components").

A model ("path") is an ordered list of components; `forward` runs any such list. Every component is a small
Equinox module whose field names follow the AugReg checkpoint layout (big_vision / vision_transformer), so that
loading a checkpoint is a rename: `Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel` is
`components["encoderblock_3"].MlpBlock_3.Dense_0.kernel`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from jaxtyping import Array, Float, PRNGKeyArray

EPS = 1e-6  # AugReg LayerNorm epsilon


def _lift(p: Array, x: Array) -> Array:
    """`p` with leading unit axes up to x's rank: the broadcast made explicit, so strict rank promotion holds."""
    return jax.lax.broadcast_to_rank(p, x.ndim)


@dataclasses.dataclass(frozen=True)
class Config:
    width: int
    depth: int
    mlp_dim: int
    heads: int
    patch: int = 16


CONFIGS: dict[str, Config] = {
    "Ti/16": Config(192, 12, 768, 3),
    "S/16": Config(384, 12, 1536, 6),
    "B/16": Config(768, 12, 3072, 12),
    "L/16": Config(1024, 24, 4096, 16),
    # Test and quickstart sizes: 4-px patches so 8-32 px images give a few tokens.
    "tiny": Config(32, 2, 64, 2, patch=4),
    "tiny4": Config(64, 4, 128, 4, patch=4),
    # The quickstart's root: tiny's width at 4 blocks, so dropping the top block is a real option (Table 1's layer
    # removal) at the cost of a quarter of the blocks, not half.
    "tiny-deep": Config(32, 4, 64, 2, patch=4),
}


# --- components --------------------------------------------------------------------------------------------


class Dense(eqx.Module):
    kernel: Array  # (..in, ..out) as in the checkpoint
    bias: Array

    def __call__(self, x: Array) -> Array:
        y = x @ self.kernel
        return y + _lift(self.bias, y)


class LayerNorm(eqx.Module):
    scale: Array
    bias: Array

    def __call__(self, x: Array) -> Array:
        xc = x - x.mean(-1, keepdims=True)  # one centring feeds both uses: 7 flops per element in the HLO
        var = jnp.square(xc).mean(-1, keepdims=True)
        return xc * jax.lax.rsqrt(var + EPS) * _lift(self.scale, x) + _lift(self.bias, x)


class MultiHeadDotProductAttention(eqx.Module):
    query: Dense  # kernel (D, H, D/H), bias (H, D/H)
    key: Dense
    value: Dense
    out: Dense  # kernel (H, D/H, D), bias (D,)

    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n d"]:
        q, k, v = (_proj(x, p) for p in (self.query, self.key, self.value))
        a = jnp.einsum("bqhk,bnhk->bhqn", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
        o = jnp.einsum("bhqn,bnhk->bqhk", jax.nn.softmax(a, axis=-1), v)
        y = jnp.einsum("bqhk,hkd->bqd", o, self.out.kernel)
        return y + _lift(self.out.bias, y)


def _proj(x: Float[Array, "b n d"], p: Dense) -> Float[Array, "b n h k"]:
    y = jnp.einsum("bnd,dhk->bnhk", x, p.kernel)
    return y + _lift(p.bias, y)


class MlpBlock(eqx.Module):
    Dense_0: Dense
    Dense_1: Dense

    def __call__(self, x: Array) -> Array:
        return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=True))


class EncoderBlock(eqx.Module):
    """Pre-LN transformer layer: `encoderblock_{i}`."""

    LayerNorm_0: LayerNorm
    MultiHeadDotProductAttention_1: MultiHeadDotProductAttention
    LayerNorm_2: LayerNorm
    MlpBlock_3: MlpBlock

    def __call__(self, x: Array) -> Array:
        x = x + self.MultiHeadDotProductAttention_1(self.LayerNorm_0(x))
        return x + self.MlpBlock_3(self.LayerNorm_2(x))


class Embedding(eqx.Module):
    """16x16 stride-16 patch convolution (`embedding`), written as patchify + matmul (identical maths)."""

    kernel: Array  # (p, p, 3, D), HWIO as in the checkpoint
    bias: Array

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b n d"]:
        p = self.kernel.shape[0]
        b, h, w, c = x.shape
        x = x.reshape(b, h // p, p, w // p, p, c)
        y = jnp.einsum("bipjqc,pqcd->bijd", x, self.kernel).reshape(b, (h // p) * (w // p), -1)
        return y + _lift(self.bias, y)


class Cls(eqx.Module):
    """The class token (`cls`), prepended to the patch tokens."""

    cls: Array  # (1, 1, D)

    def __call__(self, x: Array) -> Array:
        return jnp.concatenate([jnp.broadcast_to(self.cls, (x.shape[0], 1, x.shape[2])), x], axis=1)


class PosEmbed(eqx.Module):
    """`posembed_input`; its size fixes the model's input resolution."""

    pos_embedding: Array  # (1, 1 + g*g, D)

    def __call__(self, x: Array) -> Array:
        return x + self.pos_embedding


class Head(eqx.Module):
    """`head`: a Dense on the class token; zero-initialised (docs/method.md)."""

    kernel: Array  # (D, classes)
    bias: Array

    def __call__(self, x: Array) -> Array:
        y = x[:, 0] @ self.kernel
        return y + _lift(self.bias, y)


class ResidualAdapter(eqx.Module):
    """`residual_adapter_{i}`, the Section 4 baseline: x + up(gelu(down(LN(x)))), placed before block i."""

    LayerNorm_0: LayerNorm
    Dense_0: Dense
    Dense_1: Dense  # zero-initialised, so a fresh adapter is the identity

    def __call__(self, x: Array) -> Array:
        return x + self.Dense_1(jax.nn.gelu(self.Dense_0(self.LayerNorm_0(x)), approximate=True))


Component = Embedding | Cls | PosEmbed | EncoderBlock | LayerNorm | Head | ResidualAdapter


# A block's activations recomputed in the backward pass: only its input is kept (docs/hardware.md). The module is an
# argument, not a closure, so its parameters are differentiated through the recomputation.
_remat = jax.checkpoint(lambda c, x: c(x), policy=jax.checkpoint_policies.nothing_saveable)


def forward(components: Sequence[eqx.Module], images: Float[Array, "b h w 3"],
            on: Float[Array, " n"] | None = None, remat: bool = False) -> Float[Array, "b k"]:
    """Runs an ordered list of components (any depth 0..N, with or without adapters) on images in [-1, 1].

    `on` (traced, one flag per component): a block or adapter whose flag is 0 is skipped, as if absent. A path of
    any depth then runs as the root's full-depth list with its missing layers off (train.py), and every depth
    shares one compiled program. `remat`: a gradient through it keeps each encoder block's input only and
    recomputes the rest (the same values; memory per block b·n·d instead of the attention and MLP activations)."""
    check_size(components, images.shape)
    x = images
    for i, c in enumerate(components):
        # A closure over c: modules are unhashable, and lax.cond hashes its branches.
        f = (lambda z, c=c: _remat(c, z)) if remat and isinstance(c, EncoderBlock) else (lambda z, c=c: c(z))
        if on is not None and isinstance(c, (EncoderBlock, ResidualAdapter)):
            x = jax.lax.cond(on[i] > 0, f, lambda z: z, x)
        else:
            x = f(x)
    return x


def check_size(components: Sequence[eqx.Module], shape: Sequence[int]) -> None:
    """Images must tile into the patch grid the position embedding was made for: a wrong size would otherwise
    fail deep inside an einsum or a broadcast, or (same token count, other shape) run silently on wrong inputs."""
    emb = next((c for c in components if isinstance(c, Embedding)), None)
    pe = next((c for c in components if isinstance(c, PosEmbed)), None)
    if emb is None or pe is None:
        return
    p, (h, w) = emb.kernel.shape[0], tuple(shape[1:3])
    res = resolution(pe, p)
    if (h, w) != (res, res):
        raise ValueError(f"images are {h}x{w} px but this model's position embedding is for {res}x{res} px "
                         f"({res // p}x{res // p} patches of {p} px); resize the images to {res} px "
                         f"(augment.eval_preprocess)")


# --- initialisation ----------------------------------------------------------------------------------------


def grid(res: int, patch: int) -> int:
    if res % patch:
        raise ValueError(f"resolution {res} is not a multiple of the patch size {patch}")
    return res // patch


def _kernels(key: PRNGKeyArray, specs: Sequence[tuple[int, tuple[int, ...]]]) -> list[Array]:
    """LeCun truncated-normal kernels (flax `lecun_normal`: variance 1/fan_in, cut at 2σ) for (fan_in, shape)
    specs, all cut from ONE draw: XLA on CPU takes ~0.3 s to compile each random op, one op per block keeps
    `init` fast."""
    sizes = [math.prod(s) for _, s in specs]
    z = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32) / 0.87962566103423978
    parts = jnp.split(z, np.cumsum(sizes)[:-1].tolist())
    return [(w * math.sqrt(1.0 / f)).reshape(s) for w, (f, s) in zip(parts, specs, strict=True)]


def _zeros(*shape: int) -> Array:
    return jnp.zeros(shape, jnp.float32)


def _norm(d: int) -> LayerNorm:
    return LayerNorm(jnp.ones((d,), jnp.float32), _zeros(d))


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_block(cfg: Config, key: PRNGKeyArray) -> EncoderBlock:
    d, h, m = cfg.width, cfg.heads, cfg.mlp_dim
    q, k, v, o, w0, w1 = _kernels(key, [(d, (d, h, d // h))] * 3 + [(d, (h, d // h, d)), (d, (d, m)), (m, (m, d))])
    att = MultiHeadDotProductAttention(*(Dense(w, _zeros(h, d // h)) for w in (q, k, v)), Dense(o, _zeros(d)))
    return EncoderBlock(_norm(d), att, _norm(d), MlpBlock(Dense(w0, _zeros(m)), Dense(w1, _zeros(d))))


def init_head(cfg: Config, num_classes: int) -> Head:
    return Head(_zeros(cfg.width, num_classes), _zeros(num_classes))


@functools.partial(jax.jit, static_argnames=("cfg", "dim"))
def init_adapter(cfg: Config, key: PRNGKeyArray, dim: int) -> ResidualAdapter:
    (down,) = _kernels(key, [(cfg.width, (cfg.width, dim))])
    up = Dense(_zeros(dim, cfg.width), _zeros(cfg.width))  # zero: a fresh adapter is the identity
    return ResidualAdapter(_norm(cfg.width), Dense(down, _zeros(dim)), up)


@functools.partial(jax.jit, static_argnames=("cfg", "res"))
def _stem(cfg: Config, key: PRNGKeyArray, res: int) -> tuple[Embedding, Cls, PosEmbed]:
    p, d, g = cfg.patch, cfg.width, grid(res, cfg.patch)
    ke, kp = jax.random.split(key)
    (emb,) = _kernels(ke, [(p * p * 3, (p, p, 3, d))])
    pe = jax.random.normal(kp, (1, 1 + g * g, d), jnp.float32) * 0.02
    return Embedding(emb, _zeros(d)), Cls(_zeros(1, 1, d)), PosEmbed(pe)


def init(cfg: Config, key: PRNGKeyArray, num_classes: int, res: int) -> dict[str, eqx.Module]:
    """A fresh root model: {"embedding", "cls", "posembed_input", "encoderblock_0".., "encoder_norm", "head"}.

    Not jitted as a whole: the stem compiles once per (config, resolution) and `init_block` once per config, so
    models of another head size or depth reuse them.
    """
    ks, *kb = jax.random.split(key, 1 + cfg.depth)
    emb, cls, pe = _stem(cfg, ks, res)
    comps: dict[str, eqx.Module] = {"embedding": emb, "cls": cls, "posembed_input": pe}
    comps |= {f"encoderblock_{i}": init_block(cfg, k) for i, k in enumerate(kb)}
    comps |= {"encoder_norm": _norm(cfg.width), "head": init_head(cfg, num_classes)}
    return comps


def resolution(posembed: PosEmbed, patch: int) -> int:
    """The input resolution a position embedding fixes."""
    return math.isqrt(posembed.pos_embedding.shape[1] - 1) * patch


def resample_posembed(posembed: PosEmbed, res: int, patch: int) -> PosEmbed:
    """Position embedding for another resolution (docs/method.md): keep the class-token row, reshape the grid to
    (g, g, D) and zoom it by g_new/g_old with scipy's order-1 spline (`jax.image.resize` gives other values)."""
    pe = np.asarray(posembed.pos_embedding)
    g_old, g_new = math.isqrt(pe.shape[1] - 1), grid(res, patch)
    tok, grid_ = pe[0, :1], pe[0, 1:].reshape(g_old, g_old, -1)
    zoomed = scipy.ndimage.zoom(grid_, (g_new / g_old, g_new / g_old, 1), order=1)
    out = np.concatenate([tok, zoomed.reshape(g_new * g_new, -1)], axis=0)[None]
    return PosEmbed(jnp.asarray(out, dtype=posembed.pos_embedding.dtype))


# --- AugReg checkpoints ------------------------------------------------------------------------------------

_PREFIX = "opt/target/"  # older files store the parameters under the optimizer's target

# Keys real ViT files carry that this model has no place for. They are reported, never silently dropped.
_QUIRKS = {
    "pre_logits/": "`pre_logits` is the Dense+tanh representation layer of the original (2020) ViT i21k files; "
    "the AugReg files (Steiner et al., 2021) this project starts from have none, and this model has no such layer",
    "opt/state/": "optimizer state saved beside `opt/target/`: not part of the model",
}


def flat(tree: eqx.Module, prefix: str = "") -> dict[str, Array]:
    """'/'-joined AugReg key for every array of a component."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + "/".join(k.name for k in path)] = leaf
    return out


def _key_prefix(name: str) -> str:
    return "" if name in ("embedding", "cls", "head") else "Transformer/"


def to_flat(components: Mapping[str, eqx.Module]) -> dict[str, Array]:
    """Components -> AugReg '/'-keyed arrays (`cls` is a bare key in the checkpoint)."""
    out: dict[str, Array] = {}
    for name, c in components.items():
        keyed = flat(c, f"{_key_prefix(name)}{name}/")
        out |= {("cls" if k == "cls/cls" else k): v for k, v in keyed.items()}
    return out


def save_augreg(path: str | Path | BinaryIO, components: Mapping[str, eqx.Module]) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in to_flat(components).items()})


class AugRegError(ValueError):
    """An AugReg file that cannot be read or does not fit the model; the message names the file."""


def infer_config(shapes: Mapping[str, Any]) -> Config:
    """The ViT config an AugReg key → shape (or array) mapping implies: patch and width from `embedding/kernel`
    (p, p, 3, D), depth from the `Transformer/encoderblock_{i}` keys, heads from a query kernel (D, H, D/H), MLP
    width from `MlpBlock_3/Dense_0/kernel` (D, M). A file without blocks gets heads = mlp_dim = 0."""
    shape = {k.removeprefix(_PREFIX): tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    emb = shape.get("embedding/kernel")
    if emb is None or len(emb) != 4 or emb[0] != emb[1] or emb[2] != 3:
        raise ValueError(f"expected an `embedding/kernel` array of shape (p, p, 3, width), found {emb}")
    idx = sorted({int(m.group(1)) for k in shape if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    if idx != list(range(len(idx))):
        raise ValueError(f"encoder blocks {idx} are not numbered 0..{len(idx) - 1}")
    heads = mlp = 0
    if idx:
        b = "Transformer/encoderblock_0/"
        q, d0 = shape.get(b + "MultiHeadDotProductAttention_1/query/kernel"), shape.get(b + "MlpBlock_3/Dense_0/kernel")
        if q is None or d0 is None or len(q) != 3 or len(d0) != 2:
            raise ValueError(f"expected {b}MultiHeadDotProductAttention_1/query/kernel (width, heads, width/heads) "
                             f"and {b}MlpBlock_3/Dense_0/kernel (width, mlp), found {q} and {d0}")
        heads, mlp = q[1], d0[1]
    return Config(width=emb[3], depth=len(idx), mlp_dim=mlp, heads=heads, patch=emb[0])


def npz_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key → shape of every array of an `.npz`, read from the .npy headers only (no array data is loaded)."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                out[info.filename.removesuffix(".npy")] = tuple(read(f)[0])
    return out


def augreg_config(path: str | Path) -> Config:
    """The config of an AugReg `.npz` (see `infer_config`), naming the file when it is not one."""
    try:
        return infer_config(npz_shapes(path))
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise AugRegError(f"{path}: not an AugReg ViT checkpoint: {e}") from None


def load_augreg(path: str | Path, cfg: Config | None = None, num_classes: int | None = None,
                resolution: int | None = None) -> dict[str, eqx.Module]:
    """Loads an AugReg `.npz` (keys optionally under `opt/target/`) into named components, in path order.

    `cfg=None` infers the config from the file's arrays (`infer_config`), so any AugReg file loads without a
    `CONFIGS` entry. The expected key set and shapes come from `init` evaluated abstractly (plus the
    `residual_adapter_{i}` a model exported from this project may carry); a mismatch raises a ValueError listing
    the keys missing from the file, the keys in the file the model does not have, and every shape mismatch.
    `num_classes=None` takes the head size from the file. `resolution`: the position embedding is resampled
    (`resample_posembed`) for this input size, as a root is loaded at its benchmark's default size; None keeps
    the file's.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k.removeprefix(_PREFIX): z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise AugRegError(f"{path}: cannot read it as an .npz file: {e}") from None
    if cfg is None:
        try:
            cfg = infer_config(arrays)
        except ValueError as e:
            raise AugRegError(f"{path}: not an AugReg ViT checkpoint: {e}") from None
    if "head/bias" in arrays and num_classes is None:
        num_classes = int(arrays["head/bias"].shape[0])
    pe = arrays.get("Transformer/posembed_input/pos_embedding")
    res = cfg.patch * math.isqrt(pe.shape[1] - 1) if pe is not None and pe.ndim == 3 else 224
    adapters = {int(m.group(1)): v.shape[-1] for k, v in arrays.items()
                if (m := re.fullmatch(r"Transformer/residual_adapter_(\d+)/Dense_0/kernel", k)) and v.ndim == 2}

    def abstract():
        comps = init(cfg, jax.random.key(0), num_classes or 1000, res)
        return comps | {f"residual_adapter_{i}": init_adapter(cfg, jax.random.key(0), d) for i, d in adapters.items()}

    shapes = jax.eval_shape(abstract)
    want = to_flat(shapes)
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    bad = [f"{k}: file {arrays[k].shape} vs model {want[k].shape}" for k in want if k in arrays
           and tuple(arrays[k].shape) != tuple(want[k].shape)]
    if missing or extra or bad:
        hints = [h for prefix, h in _QUIRKS.items() if any(k.startswith(prefix) for k in extra)]
        raise AugRegError(
            f"{path}: checkpoint does not match ViT config {cfg}:\n  missing from file: {missing}\n"
            f"  extra in file: {extra}\n  shape mismatches: {bad}" + "".join(f"\n  note: {h}" for h in hints)
        )
    out = {}
    for name in path_order(shapes):  # eval_shape's dict comes back sorted
        shape = shapes[name]
        keys = to_flat({name: shape})
        leaves = [jnp.asarray(arrays[k], jnp.float32) for k in keys]
        out[name] = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), leaves)
    if resolution is not None and resolution != res:
        out["posembed_input"] = resample_posembed(out["posembed_input"], resolution, cfg.patch)
    return out


# --- component names (docs/method.md, "Components"): the AugReg keys, blocks and adapters carrying their index

CLASSES: dict[str, type] = {
    "embedding": Embedding, "cls": Cls, "posembed_input": PosEmbed, "encoderblock": EncoderBlock,
    "encoder_norm": LayerNorm, "head": Head, "residual_adapter": ResidualAdapter,
}


def block(i: int) -> str:
    return f"encoderblock_{i}"


def adapter(i: int) -> str:
    return f"residual_adapter_{i}"


def is_block(name: str) -> bool:
    return name.startswith("encoderblock_")


def is_adapter(name: str) -> bool:
    return name.startswith("residual_adapter_")


def block_index(name: str) -> int | None:
    """i of `encoderblock_{i}` or `residual_adapter_{i}`; None for the other components."""
    m = re.fullmatch(r"(?:encoderblock|residual_adapter)_(\d+)", name)
    return int(m.group(1)) if m else None


def component_class(name: str) -> type:
    """The module class of a component name, e.g. `encoderblock_3` -> EncoderBlock."""
    i = block_index(name)
    base = name if i is None else name.rsplit("_", 1)[0]
    if base not in CLASSES or (i is None and base in ("encoderblock", "residual_adapter")):
        raise ValueError(f"unknown component name {name!r}; known: {sorted(CLASSES)} (blocks as encoderblock_<i>)")
    return CLASSES[base]


_STEM = {"embedding": 0, "cls": 1, "posembed_input": 2}


def path_order(names: Sequence[str]) -> list[str]:
    """Component names in the order `forward` runs them: embedding, cls, posembed_input, then per block i its
    residual adapter and `encoderblock_i`, then encoder_norm and head (the Flax ViT's call order)."""

    def rank(name: str) -> tuple[int, int, int]:
        if name in _STEM:
            return (0, _STEM[name], 0)
        i = block_index(name)
        if i is not None:
            return (1, i, int(is_block(name)))
        if name in ("encoder_norm", "head"):
            return (2, int(name == "head"), 0)
        raise ValueError(f"unknown component name {name!r}")

    return sorted(names, key=rank)
