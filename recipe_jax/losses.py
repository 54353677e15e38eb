"""Losses of RECIPE: masked-LM cross-entropy, the Frobenius-norm regularizer, and the
token-state distance to a frozen reference model (the optional `recipe.distill` anchor).

Both are pure. The MLM loss returns sums and a count, so that the mean over masked tokens is
exact across devices and batches; the reduction is visible at the call site.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from recipe_jax import hf


def mlm_loss(logits_bmv: jax.Array, labels_bm: jax.Array, weights_bm: jax.Array
             ) -> dict[str, jax.Array]:
    """Sums over the masked slots: `loss_sum`, `correct`, `count` (weights sum)."""
    per_token_bm = optax.softmax_cross_entropy_with_integer_labels(
        logits_bmv.astype(jnp.float32), labels_bm)
    correct_bm = (jnp.argmax(logits_bmv, axis=-1) == labels_bm).astype(jnp.float32)
    return {"loss_sum": jnp.sum(per_token_bm * weights_bm),
            "correct": jnp.sum(correct_bm * weights_bm),
            "count": jnp.sum(weights_bm)}


def token_state_mse(hidden_blh: jax.Array, reference_blh: jax.Array, attention_mask_bl: jax.Array,
                    *, skip_first: bool = False) -> jax.Array:
    """Mean over attended tokens of the per-token mean squared difference of hidden states.

    `skip_first` leaves position 0 ([CLS] / <s>) out, for losses that constrain it separately.
    """
    tokens_bl = attention_mask_bl.astype(jnp.float32)
    if skip_first:
        tokens_bl = tokens_bl.at[:, 0].set(0.0)
    diff_bl = jnp.mean(jnp.square(hidden_blh.astype(jnp.float32)
                                  - reference_blh.astype(jnp.float32)), axis=-1)
    return jnp.sum(diff_bl * tokens_bl) / jnp.maximum(jnp.sum(tokens_bl), 1.0)


def relative_state_distance(hidden: Sequence[jax.Array], reference: Sequence[jax.Array],
                            attention_mask_bl: jax.Array) -> jax.Array:
    """Mean over layers of token_state_mse(h, r) / token_state_mse(r, 0): each layer's squared
    drift relative to its own scale (BERT layers differ in scale by 20x), 0 when equal, about
    2 for unrelated states. The denominators are constants (no gradient)."""
    per_layer = []
    for h_blh, r_blh in zip(hidden, reference, strict=True):
        scale = jax.lax.stop_gradient(token_state_mse(r_blh, jnp.zeros_like(r_blh),
                                                      attention_mask_bl))
        per_layer.append(token_state_mse(h_blh, r_blh, attention_mask_bl)
                         / jnp.maximum(scale, 1e-12))
    return jnp.mean(jnp.stack(per_layer))


def matches(patterns: Sequence[str], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def select_names(params, patterns: Sequence[str], model_type: str) -> list[str]:
    """HF-style names (e.g. `bert.encoder.layer.0.intermediate.dense.weight`) matching any regex."""
    return sorted(n for n in hf.named_params(params, model_type) if matches(patterns, n))


def frobenius_norm(w: jax.Array) -> jax.Array:
    """Unsquared ||W||_F, with a zero (not NaN) gradient at W = 0."""
    sq = jnp.sum(jnp.square(w.astype(jnp.float32)))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def neuron_reduce_axis(w: jax.Array, ffn_size: int) -> int:
    """The axis summed over to get one norm per neuron (see `neuron_norms`)."""
    return 1 if w.shape[0] == ffn_size and w.shape[-1] != ffn_size else 0


def neuron_norms(w: jax.Array, ffn_size: int) -> jax.Array:
    """Unsquared L2 norm of each neuron's weights in a Flax kernel [in, out]: along the FFN axis
    when the matrix has one (FFN-in [H, F]: each neuron's input weights; FFN-out [F, H]: its
    output weights), else per output unit. Zero (not NaN) gradient at a zero neuron."""
    sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=neuron_reduce_axis(w, ffn_size))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def frobenius_penalty(params, patterns: Sequence[str], model_type: str, *,
                      groups: str = "matrix", ffn_size: int = 0) -> jax.Array:
    """sum_l ||W_l||_F over the parameters whose HF-style name matches any of `patterns`
    (`groups="matrix"`, the paper's), or the sum of their neurons' norms (`groups="neuron"`,
    a group lasso that drives whole neurons to zero; needs `ffn_size`, see `neuron_norms`).

    The norm does not depend on layout, so Flax kernels [H, F] give the PyTorch [F, H] value.
    """
    named = hf.named_params(params, model_type)
    chosen = [w for n, w in sorted(named.items()) if matches(patterns, n)]
    if groups == "neuron":
        norms = [jnp.sum(neuron_norms(w, ffn_size)) for w in chosen]
    elif groups == "matrix":
        norms = [frobenius_norm(w) for w in chosen]
    else:
        raise ValueError(f"groups={groups!r}: use 'matrix' or 'neuron'")
    return jnp.sum(jnp.stack(norms)) if norms else jnp.zeros((), jnp.float32)
