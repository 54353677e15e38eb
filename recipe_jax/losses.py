"""Losses: masked-LM cross-entropy, RECIPE's Frobenius-norm regularizer over regex-selected
weights, and the token-state distance the POR attack holds clean text to.

All are pure. The MLM loss returns sums and a count, so that the mean over masked tokens is
exact across devices and batches; the reduction is visible at the call site.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from recipe_jax import hf


def mlm_loss(logits_bmv: jax.Array, labels_bm: jax.Array, weights_bm: jax.Array
             ) -> dict[str, jax.Array]:
    """Sums over the masked slots: `loss_sum`, `correct`, `count` (weights sum)."""
    per_token_bm = optax.softmax_cross_entropy_with_integer_labels(
        logits_bmv.astype(jnp.promote_types(logits_bmv.dtype, jnp.float32)), labels_bm)
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
    wide = jnp.promote_types(hidden_blh.dtype, jnp.float32)
    diff_bl = jnp.mean(jnp.square(hidden_blh.astype(wide) - reference_blh.astype(wide)), axis=-1)
    return jnp.sum(diff_bl * tokens_bl) / jnp.maximum(jnp.sum(tokens_bl), 1.0)


def _selected(params, patterns: Sequence[str], model_type: str) -> dict[str, Any]:
    """{HF name: leaf} of the parameters `patterns` select (aliases such as "ffn_in", or
    regexes over HF names: families.py), in name order."""
    return dict(sorted((hf.hf_name(p, model_type), leaf) for p, leaf in
                       hf.flat_params(params).items() if hf.selected(p, patterns, model_type)))


def select_names(params, patterns: Sequence[str], model_type: str) -> list[str]:
    """HF names (e.g. `bert.encoder.layer.0.intermediate.dense.weight`) `patterns` select."""
    return list(_selected(params, patterns, model_type))


def frobenius_norm(w: jax.Array) -> jax.Array:
    """Unsquared ||W||_F, with a zero (not NaN) gradient at W = 0."""
    sq = jnp.sum(jnp.square(w.astype(jnp.float32)))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def frobenius_penalty(params, patterns: Sequence[str], model_type: str) -> jax.Array:
    """sum_l ||W_l||_F over the parameters whose HF-style name matches any of `patterns`.

    The norm does not depend on layout, so Flax kernels [H, F] give the PyTorch [F, H] value.
    """
    norms = [frobenius_norm(w) for w in _selected(params, patterns, model_type).values()]
    return jnp.sum(jnp.stack(norms)) if norms else jnp.zeros((), jnp.float32)
