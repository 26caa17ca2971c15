"""The multi-factor score of μ2Net+ (paper Section 3, eq. 1–2): quality discounted by size and compute.

    score(m) = q(m) · s^(#accounted-params(m) / P) · s^(#flops(m) / F)                          (eq. 1)
    #accounted-params(m) = Σ_{p ∈ P(m)} 1 / (#models(p) + 1)                                    (eq. 2)

#models(p) counts the retained models of tasks *other* than m's task that use parameter p. Since sharing is by
component, eq. 2 sums, over m's components, size / (sharers + 1).

#flops(m) is the forward cost of one image at m's resolution, a multiply-add counting 2 — the convention of
XLA's cost analysis, against which `flops` is tested (docs/method.md, "Score").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax

import vit


def param_count(tree) -> int:
    """Number of scalars in a component (or any pytree). Works on real arrays and on `jax.ShapeDtypeStruct`
    leaves from `jax.eval_shape`, so counting ViT-L/16 allocates nothing."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape"))


def accounted_params(sizes: Sequence[int], sharers: Sequence[int]) -> float:
    """#accounted-params (Section 3, eq. 2): Σ size / (sharers + 1) over a model's components.

    `sharers[i]` = number of retained models of *other* tasks using component i. With one retained model per
    task, a component used by k models counts size/k to each, and the sum over all models of a system is the
    number of distinct parameters in it.
    """
    if len(sizes) != len(sharers):
        raise ValueError(f"{len(sizes)} sizes but {len(sharers)} sharer counts")
    if any(k < 0 for k in sharers):
        raise ValueError(f"sharer counts must be >= 0, got {list(sharers)}")
    return float(sum(n / (k + 1) for n, k in zip(sizes, sharers, strict=True)))


# --- forward FLOPs -----------------------------------------------------------------------------------------
# Counted op by op as XLA's HloCostAnalysis counts the HLO that `vit.forward` lowers to: a dot is 2·M·N·K, an
# elementwise add/sub/mul/div is 1 per output element, a reduce is (inputs - outputs) adds, and transcendentals
# (exp, tanh, rsqrt) are a separate count, not flops. Elementwise terms matter only for tiny test models
# (≈1 % of ViT-L/16), but counting them lets the tests hold the formula to XLA's figure within 2 %.


def _layernorm(n: int, d: int) -> int:
    # mean: reduce + divide; centre; square; mean; + eps; (rsqrt is transcendental); × rsqrt; × scale; + bias.
    return 7 * n * d + n


def _gelu(n: int) -> int:
    # tanh form: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), x³ = two multiplies: 8 flops, 1 transcendental.
    return 8 * n


def _attention(n: int, d: int, h: int) -> int:
    proj = 4 * (2 * n * d * d + n * d)  # q, k, v and out, with biases
    logits = 2 * n * n * d + h * n * n  # QKᵀ over all heads, then / √(d/h)
    softmax = h * n * (4 * n - 1)  # max reduce, subtract, sum reduce, divide, and XLA's extra op per row
    return proj + logits + softmax + 2 * n * n * d  # + AV


def _mlp(n: int, d: int, m: int) -> int:
    return 2 * n * d * m + n * m + _gelu(n * m) + 2 * n * m * d + n * d


def _block(n: int, d: int, m: int, h: int) -> int:
    return 2 * _layernorm(n, d) + _attention(n, d, h) + _mlp(n, d, m) + 2 * n * d  # two residual adds


def _adapter(n: int, d: int, a: int) -> int:
    # LN → Dense(a) → gelu → Dense(d) → residual (Section 4 baseline).
    return _layernorm(n, d) + 2 * n * d * a + n * a + _gelu(n * a) + 2 * n * a * d + n * d + n * d


def flops(cfg: vit.Config, depth: int, res: int, num_classes: int, adapter_dim: int | Sequence[int] = 0) -> int:
    """#flops(m) of eq. 1: forward FLOPs for ONE image through embedding, cls, posembed, `depth` encoder blocks,
    residual adapters, encoder_norm and head. `adapter_dim`: an int > 0 puts an adapter of that width before
    every block (the Section 4 baseline); a sequence gives the width of each adapter the model has (muNet's
    adapter insertion places them before some blocks only).

    A multiply-add counts 2. Agrees with XLA's cost analysis of `vit.forward` (tested within 2 %); ViT-L/16 is
    ≈1.24e11 at 224 px and ≈3.84e11 at 384 px.
    """
    if not 0 <= depth <= cfg.depth:
        raise ValueError(f"depth {depth} outside 0..{cfg.depth}")
    widths = [adapter_dim] * depth if isinstance(adapter_dim, int) and adapter_dim else list(adapter_dim or ())
    if len(widths) > depth:
        raise ValueError(f"{len(widths)} adapters but only {depth} blocks to put them before")
    p, d = cfg.patch, cfg.width
    patches = vit.grid(res, p) ** 2
    n = patches + 1  # + class token
    total = 2 * patches * (p * p * 3) * d + patches * d  # patch embedding (a stride-p conv) + bias
    total += n * d  # position embedding
    total += depth * _block(n, d, cfg.mlp_dim, cfg.heads)
    total += sum(_adapter(n, d, a) for a in widths)
    total += _layernorm(n, d)  # encoder_norm runs on every token, as in the AugReg model
    total += 2 * d * num_classes + num_classes  # head on the class token
    return total


def score(q: float, A: float, Fm: float, s: float, P: float, F: float) -> float:
    """Eq. 1: q · s^(A/P) · s^(Fm/F). `s` in ]0, 1]; P or F = inf switches that penalty off (factor 1).

    With s = 0.99, a model accounted for P parameters (or needing F flops) loses 1 % of its quality (Section 3).
    """
    if not 0.0 < s <= 1.0:
        raise ValueError(f"s must be in ]0, 1], got {s}")
    return float(q * s ** (A / P) * s ** (Fm / F))
