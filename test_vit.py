"""The ViT as named components (paper Section 3, Figure 1): forward, AugReg maths, checkpoints, posembed resampling."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.special

import vit
from conftest import U32

CFG = vit.CONFIGS["tiny"]  # width 32, 2 blocks, mlp 64, 2 heads, 4-px patches
RES = 16
_fwd = jax.jit(vit.forward)  # eager would compile every op separately: jit keeps the file fast
_call = jax.jit(lambda m, x: m(x))


def _randomise(tree, seed: int):
    """Every leaf random (zero-initialised heads and biases would hide bugs in the maths they feed)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32) for x in leaves]
    )


@pytest.fixture(scope="module")
def model():
    comps = vit.init(CFG, jax.random.key(0), 5, RES)
    return {k: _randomise(v, i) for i, (k, v) in enumerate(comps.items())}


def _path(comps, depth, adapters=()):
    blocks = []
    for i in range(depth):
        if i in adapters:
            blocks.append(adapters[i])
        blocks.append(comps[f"encoderblock_{i}"])
    return [comps["embedding"], comps["cls"], comps["posembed_input"], *blocks, comps["encoder_norm"], comps["head"]]


def _images(n: int, res: int = RES, seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, res, res, 3)), jnp.float32)


# --- forward ---------------------------------------------------------------------------------------------


def test_init_names_and_augreg_shapes():
    comps = vit.init(CFG, jax.random.key(0), 5, RES)
    assert list(comps) == ["embedding", "cls", "posembed_input", "encoderblock_0", "encoderblock_1",
                           "encoder_norm", "head"]
    d, h, p = CFG.width, CFG.heads, CFG.patch
    att = comps["encoderblock_0"].MultiHeadDotProductAttention_1
    assert comps["embedding"].kernel.shape == (p, p, 3, d)
    assert comps["cls"].cls.shape == (1, 1, d)
    assert comps["posembed_input"].pos_embedding.shape == (1, 1 + (RES // p) ** 2, d)
    assert att.query.kernel.shape == (d, h, d // h) and att.query.bias.shape == (h, d // h)
    assert att.out.kernel.shape == (h, d // h, d) and att.out.bias.shape == (d,)
    assert comps["encoderblock_1"].MlpBlock_3.Dense_0.kernel.shape == (d, CFG.mlp_dim)
    assert not np.any(np.asarray(comps["head"].kernel)) and not np.any(np.asarray(comps["head"].bias))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(comps))
    # blocks are drawn independently
    k0 = comps["encoderblock_0"].MlpBlock_3.Dense_0.kernel
    assert not np.allclose(k0, comps["encoderblock_1"].MlpBlock_3.Dense_0.kernel)
    assert 0.5 < float(jnp.std(k0)) * math.sqrt(CFG.width) < 1.5  # lecun scale


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_forward_shapes_any_depth(model, depth):
    out = jax.jit(vit.forward)(_path(model, depth), _images(3))
    assert out.shape == (3, 5) and out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_forward_depths_differ(model):
    x = _images(3)
    outs = [np.asarray(_fwd(_path(model, d), x)) for d in range(3)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


@pytest.mark.numeric
def test_adapters_before_blocks(model):
    """`residual_adapter_{i}` sits before block i (Section 4 baseline); a fresh one is the identity."""
    x = _images(3)
    fresh = {i: vit.init_adapter(CFG, jax.random.key(i), 8) for i in range(2)}
    h = _fwd(_path(model, 0)[:3], x)
    np.testing.assert_array_equal(_call(fresh[0], h), h)
    np.testing.assert_array_equal(_fwd(_path(model, 2, fresh), x), _fwd(_path(model, 2), x))
    trained = {i: _randomise(a, 10 + i) for i, a in fresh.items()}
    out = jax.jit(vit.forward)(_path(model, 2, trained), x)
    assert out.shape == (3, 5) and not np.allclose(out, _fwd(_path(model, 2), x))
    # an adapter at index 1 acts between block 0 and block 1
    manual = _call(model["encoderblock_1"], _call(trained[1], _call(model["encoderblock_0"], h)))
    path = [model["encoderblock_0"], trained[1], model["encoderblock_1"]]
    # One program against three: the same float32 maths, fused otherwise. Each of the ~10 sums on the way (3 stages
    # of attention/MLP, at most 64 terms each) may round differently: ≤ 10·64·U of the values' scale.
    np.testing.assert_allclose(_fwd(path, h), manual, rtol=0, atol=10 * 64 * U32 * float(jnp.abs(manual).max()))


# --- AugReg maths against a direct numpy implementation ---------------------------------------------------


def _np_ln(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_gelu_erf(x):
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def _np_block(b, x, eps=1e-6, gelu=_np_gelu_tanh):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), b)
    a = p.MultiHeadDotProductAttention_1
    y = _np_ln(x, p.LayerNorm_0.scale, p.LayerNorm_0.bias, eps)
    q, k, v = (np.einsum("bnd,dhk->bnhk", y, m.kernel) + m.bias for m in (a.query, a.key, a.value))
    logits = np.einsum("bqhk,bnhk->bhqn", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    x = x + np.einsum("bqhk,hkd->bqd", np.einsum("bhqn,bnhk->bqhk", w, v), a.out.kernel) + a.out.bias
    y = _np_ln(x, p.LayerNorm_2.scale, p.LayerNorm_2.bias, eps)
    m = p.MlpBlock_3
    return x + gelu(y @ m.Dense_0.kernel + m.Dense_0.bias) @ m.Dense_1.kernel + m.Dense_1.bias


@pytest.mark.numeric
def test_block_matches_augreg_maths(model):
    b = model["encoderblock_0"]
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (2, 5, CFG.width))
    x[0, 1] = 1e-3 * rng.normal(size=CFG.width)  # variance ~1e-6: LayerNorm epsilon matters here
    got = np.asarray(_call(b, jnp.asarray(x, jnp.float32)), np.float64)
    ref = _np_block(b, x)
    # float32 against float64: 8 sums in sequence (LN, q/k/v, logits, softmax, values, out, LN, 2 MLP layers), at
    # most 64 terms each, on values of the output's scale: ≤ 8·64·U relative to it (≈ 1e-4 here).
    tol = 8 * 64 * U32 * np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    # the reference is sharp enough to see the wrong epsilon or the erf gelu
    assert not np.allclose(got, _np_block(b, x, eps=1e-5), rtol=0, atol=tol)
    assert not np.allclose(got, _np_block(b, x, gelu=_np_gelu_erf), rtol=0, atol=tol)


@pytest.mark.numeric
def test_stem_and_head_match_augreg_maths(model):
    """Patch embedding is a stride-p conv (HWIO kernel); cls is prepended, then posembed added; head reads cls."""
    x = np.asarray(_images(3), np.float64)
    p = CFG.patch
    k = np.asarray(model["embedding"].kernel, np.float64)
    conv = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32), model["embedding"].kernel, (p, p), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    tok = np.asarray(conv, np.float64).reshape(3, -1, CFG.width) + np.asarray(model["embedding"].bias)
    # the same by hand for one patch: rows i..i+p, cols j..j+p of image 0. A float32 sum of n = p·p·3 = 48 products
    # is within n·U·Σ|products| of the exact one (Higham's γ_n), + U of the bias.
    patch, n = x[0, :p, p:2 * p], p * p * 3
    bias = np.asarray(model["embedding"].bias, np.float64)
    bound = n * U32 * np.einsum("pqc,pqcd->d", np.abs(patch), np.abs(k)) + U32 * np.abs(bias)
    assert np.all(np.abs(tok[0, 1] - (np.einsum("pqc,pqcd->d", patch, k) + bias)) <= bound)
    cls = np.broadcast_to(np.asarray(model["cls"].cls, np.float64), (3, 1, CFG.width))
    h = np.concatenate([cls, tok], 1) + np.asarray(model["posembed_input"].pos_embedding)
    got = _fwd(_path(model, 0)[:3], jnp.asarray(x, jnp.float32))
    # as a matmul of patches: the same 48-term sums (then two additions), on tokens of h's scale
    np.testing.assert_allclose(got, h, rtol=0, atol=(n + 2) * U32 * np.abs(h).max())
    n = model["encoder_norm"]
    logits = _np_ln(h, np.asarray(n.scale), np.asarray(n.bias), 1e-6)[:, 0] @ np.asarray(model["head"].kernel)
    logits += np.asarray(model["head"].bias)
    # + LayerNorm (two 32-term means) and the head (a 32-term sum), on the logits' scale
    np.testing.assert_allclose(_fwd(_path(model, 0), jnp.asarray(x, jnp.float32)), logits, rtol=0,
                               atol=(48 + 3 * 32) * U32 * np.abs(logits).max())


# --- AugReg checkpoints ----------------------------------------------------------------------------------


def test_augreg_keys_follow_checkpoint_layout(model):
    flat = vit.to_flat(model)
    for k in ["embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
              "Transformer/encoderblock_1/LayerNorm_0/scale",
              "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel",
              "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/bias",
              "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel", "Transformer/encoder_norm/bias",
              "head/kernel", "head/bias"]:
        assert k in flat, k
    assert len(flat) == 4 + 4 + 2 * 16  # embedding, cls, posembed; encoder_norm, head; 16 arrays per block


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_augreg_roundtrip(model, tmp_path, prefix):
    path = tmp_path / "ckpt.npz"
    if prefix:
        np.savez(path, **{prefix + k: np.asarray(v) for k, v in vit.to_flat(model).items()})
    else:
        vit.save_augreg(path, model)
    loaded = vit.load_augreg(path, CFG)  # head size taken from the file
    assert list(loaded) == list(model)
    for k in model:
        assert type(loaded[k]) is type(model[k])
        assert bool(eqx.tree_equal(loaded[k], model[k])), k
    x = _images(3, seed=1)
    np.testing.assert_array_equal(_fwd(_path(loaded, 2), x), _fwd(_path(model, 2), x))
    with pytest.raises(ValueError, match="head/kernel"):
        vit.load_augreg(path, CFG, num_classes=7)


def _load_error(tmp_path, arrays) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as e:
        vit.load_augreg(path, CFG)
    return str(e.value)


def test_augreg_mismatch_lists_both_sides(model, tmp_path):
    arrays = {k: np.asarray(v) for k, v in vit.to_flat(model).items()}
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    arrays["Transformer/encoderblock_0/LayerNorm_2/gamma"] = arrays.pop("Transformer/encoderblock_0/LayerNorm_2/scale")
    arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"] = np.zeros((3, 3), np.float32)
    msg = _load_error(tmp_path, arrays)
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias" in msg.split("extra in file")[0]  # missing side
    assert "Transformer/encoderblock_0/LayerNorm_2/scale" in msg.split("extra in file")[0]
    assert "Transformer/encoderblock_0/LayerNorm_2/gamma" in msg.split("extra in file")[1]  # extra side
    assert "MultiHeadDotProductAttention_1/key/kernel" in msg and "(3, 3)" in msg  # shape mismatch


def test_augreg_pre_logits_is_reported_not_dropped(model, tmp_path):
    """The original (2020) ViT i21k files carry a `pre_logits` Dense (representation layer) the AugReg model
    lacks; loading must say so, not silently drop it."""
    arrays = {k: np.asarray(v) for k, v in vit.to_flat(model).items()}
    arrays["pre_logits/kernel"] = np.zeros((CFG.width, CFG.width), np.float32)
    arrays["pre_logits/bias"] = np.zeros((CFG.width,), np.float32)
    msg = _load_error(tmp_path, arrays)
    assert "pre_logits/kernel" in msg and "representation" in msg


def test_augreg_too_deep_or_shallow_file(model, tmp_path):
    arrays = {k: np.asarray(v) for k, v in vit.to_flat(model).items()}
    deeper = {k.replace("encoderblock_1", "encoderblock_2"): v for k, v in arrays.items() if "encoderblock_1" in k}
    msg = _load_error(tmp_path, arrays | deeper)
    assert "Transformer/encoderblock_2/LayerNorm_0/scale" in msg
    msg = _load_error(tmp_path, {k: v for k, v in arrays.items() if "encoderblock_1" not in k})
    assert "Transformer/encoderblock_1/LayerNorm_0/scale" in msg


@pytest.mark.parametrize("name", sorted(vit.CONFIGS))
@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_config_inferred_from_augreg_layout(name, prefix):
    """Width, depth, heads, MLP width and patch come from the arrays alone (Ti/S/B/L shapes via eval_shape)."""
    cfg = vit.CONFIGS[name]
    res = 224 if cfg.patch == 16 else 16
    abstract = jax.eval_shape(lambda: vit.init(cfg, jax.random.key(0), 1000, res))
    assert vit.infer_config({prefix + k: v.shape for k, v in vit.to_flat(abstract).items()}) == cfg
    cut = {k: v for k, v in vit.to_flat(abstract).items() if "encoderblock_" not in k}  # a 0-block file
    assert vit.infer_config(cut) == vit.Config(cfg.width, 0, 0, 0, cfg.patch)


def test_load_augreg_infers_the_config(tmp_path):
    """An AugReg file of a config no `CONFIGS` entry names (3 blocks, 6 heads) loads without one."""
    cfg = vit.Config(width=48, depth=3, mlp_dim=96, heads=6, patch=4)
    comps = {k: _randomise(v, i) for i, (k, v) in enumerate(vit.init(cfg, jax.random.key(1), 7, 12).items())}
    vit.save_augreg(tmp_path / "x.npz", comps)
    assert vit.augreg_config(tmp_path / "x.npz") == cfg  # from the .npy headers alone
    loaded = vit.load_augreg(tmp_path / "x.npz")
    assert list(loaded) == list(comps)
    x = _images(2, 12)
    np.testing.assert_array_equal(_fwd(list(loaded.values()), x), _fwd(list(comps.values()), x))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    for f in (vit.load_augreg, vit.augreg_config):
        with pytest.raises(ValueError, match="bad.npz"):
            f(tmp_path / "bad.npz")


def test_load_augreg_keeps_adapters_in_path_order(model, tmp_path):
    adapters = {f"residual_adapter_{i}": _randomise(vit.init_adapter(CFG, jax.random.key(i), 8), 20 + i)
                for i in range(2)}
    vit.save_augreg(tmp_path / "a.npz", model | adapters)
    loaded = vit.load_augreg(tmp_path / "a.npz")
    assert list(loaded) == ["embedding", "cls", "posembed_input", "residual_adapter_0", "encoderblock_0",
                            "residual_adapter_1", "encoderblock_1", "encoder_norm", "head"]
    want = _path(model, 2, {i: adapters[f"residual_adapter_{i}"] for i in range(2)})
    np.testing.assert_array_equal(_fwd(list(loaded.values()), _images(2)), _fwd(want, _images(2)))


def test_forward_refuses_images_of_another_size(model):
    with pytest.raises(ValueError, match=r"images are 12x12 px.*position embedding is for 16x16 px"):
        vit.forward(_path(model, 1), _images(1, 12))
    with pytest.raises(ValueError, match=r"images are 16x20 px"):
        vit.forward(_path(model, 1), jnp.zeros((1, 16, 20, 3), jnp.float32))


# --- position embeddings ---------------------------------------------------------------------------------


def test_resolution_inverts_grid():
    for cfg, res in [(CFG, 8), (CFG, 16), (CFG, 32), (vit.CONFIGS["L/16"], 224), (vit.CONFIGS["L/16"], 384)]:
        pe = jax.eval_shape(lambda c=cfg, r=res: vit.init(c, jax.random.key(0), 2, r))["posembed_input"]
        assert pe.pos_embedding.shape[1] == 1 + vit.grid(res, cfg.patch) ** 2
        assert vit.resolution(pe, cfg.patch) == res
    with pytest.raises(ValueError):
        vit.grid(18, 4)


def test_resample_posembed_matches_scipy_zoom(model):
    pe = model["posembed_input"]  # 16 px, 4x4 grid
    out = vit.resample_posembed(pe, 24, CFG.patch)  # 6x6 grid
    a, b = np.asarray(pe.pos_embedding), np.asarray(out.pos_embedding)
    assert b.shape == (1, 1 + 36, CFG.width) and b.dtype == np.float32
    np.testing.assert_array_equal(b[0, 0], a[0, 0])  # class-token row kept
    ref = scipy.ndimage.zoom(a[0, 1:].reshape(4, 4, -1), (6 / 4, 6 / 4, 1), order=1)
    # scipy on both sides (float64 inside, float32 out): the same numbers; the corners keep their value, and so
    # does a zoom by 1, up to one float32 rounding (U relative)
    np.testing.assert_array_equal(b[0, 1:], ref.reshape(36, -1))
    np.testing.assert_allclose(b[0, 1:].reshape(6, 6, -1)[[0, 0, -1, -1], [0, -1, 0, -1]],
                               a[0, 1:].reshape(4, 4, -1)[[0, 0, -1, -1], [0, -1, 0, -1]], rtol=U32)  # corners
    assert vit.resolution(out, CFG.patch) == 24
    same = vit.resample_posembed(pe, RES, CFG.patch)
    np.testing.assert_allclose(same.pos_embedding, pe.pos_embedding, rtol=U32)


def test_resample_posembed_up_then_down():
    """Order-1 zoom reproduces a position embedding that is linear in (row, col) exactly, both ways (as for
    224 px -> 384 px -> 224 px on ViT-L/16: 14x14 -> 24x24 -> 14x14)."""
    g, d = 14, 8
    i, j = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    w = np.random.default_rng(0).normal(size=(3, d))
    lin = (i[..., None] * w[0] + j[..., None] * w[1] + w[2]).reshape(g * g, d)
    pe = vit.PosEmbed(jnp.asarray(np.concatenate([np.full((1, d), 7.0), lin])[None], jnp.float32))
    up = vit.resample_posembed(pe, 384, 16)
    u = np.asarray(up.pos_embedding)[0, 1:].reshape(24, 24, d)
    s = (g - 1) / (24 - 1)  # corners align
    ii, jj = np.meshgrid(np.arange(24) * s, np.arange(24) * s, indexing="ij")
    # float32 in and out, float64 inside: the input's rounding (U relative) and the output's (U), each on values
    # of |lin|'s scale; the way back adds two more
    scale = np.abs(lin).max()
    np.testing.assert_allclose(u, ii[..., None] * w[0] + jj[..., None] * w[1] + w[2], rtol=0, atol=2 * U32 * scale)
    back = vit.resample_posembed(up, 224, 16)
    np.testing.assert_allclose(back.pos_embedding, pe.pos_embedding, rtol=0, atol=4 * U32 * scale)
    assert float(back.pos_embedding[0, 0, 0]) == 7.0
