"""[CLS] pre-activations of every layer's intermediate dense, for pruning (FP-GA) and diagnose.

    model, params = hf.load_pretrained("path/to/hf_dir")
    enc = data.tokenize(data.load_tokenizer("path/to/hf_dir"), texts, max_length=64)
    acts_nlf = cls_preactivations(model, params, enc["input_ids"], enc["attention_mask"],
                                  batch_size=64)                       # float32 [N, L, F]
    post_nlf = post_activation(model.cfg, acts_nlf)                    # the activation function

A gated FFN (ModernBERT) sows both halves of its [H, 2F] dense: acts are [N, L, 2F] and
`post_activation` gives the neurons' values act(u) * g [N, L, F].

`Intermediate` sows its pre-activation under the "intermediates" collection; one jitted forward
per batch reads it at position 0 ([CLS] / <s>) of every layer. Shape letters: N examples,
B batch, S sequence length, L layers, F ffn.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recipe_jax.arch import ACTIVATIONS, ModelConfig
from recipe_jax.families import family
from recipe_jax.model import Transformer


@functools.partial(jax.jit, static_argnames=("model",))
def _cls_preactivations_batch(params, input_ids_bs, attention_mask_bs, *, model: Transformer):
    """float32 [B, L, F]: the pre-activation at position 0 of each layer's intermediate dense."""
    _, state = model.apply({"params": params}, input_ids_bs, attention_mask_bs,
                           method=Transformer.encode, mutable=["intermediates"])
    layers = state["intermediates"]["encoder"]
    # sow() appends to a tuple; encode runs each layer once, so the tuple has one entry.
    per_layer = [layers[f"layer_{i}"]["intermediate"]["pre_activation"][0][:, 0]
                 for i in range(model.cfg.num_hidden_layers)]
    return jnp.stack(per_layer, axis=1).astype(jnp.float32)


def cls_preactivations(model: Transformer, params, input_ids: np.ndarray,
                       attention_mask: np.ndarray, *, batch_size: int) -> np.ndarray:
    """float32 [N, L, F]: [CLS] pre-activations of all N rows, computed `batch_size` at a time.

    Always float32 (a bfloat16 compute dtype on `model` is overridden). Rows are batched in
    order of length and each batch is cut to the next power of two >= its longest row: trailing
    padding is masked out of attention, so [CLS] does not depend on it, and short aux sentences
    padded to max_length would otherwise cost several times the compute. A short last batch is
    filled with copies of its first row, so few shapes, hence few compilations, occur."""
    ids_ns = np.asarray(input_ids, dtype=np.int32)
    mask_ns = np.asarray(attention_mask, dtype=np.int32)
    if ids_ns.ndim != 2 or ids_ns.shape != mask_ns.shape or not len(ids_ns):
        raise ValueError(f"input_ids {ids_ns.shape} and attention_mask {mask_ns.shape} must be "
                         "the same non-empty [N, S] shape; pass data.tokenize(...) outputs")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use a positive integer")
    fp32 = Transformer(dataclasses.replace(model.cfg, dtype="float32"))
    params = jax.device_put(nn.unbox(params))  # once, not once per batch
    n, width = ids_ns.shape
    # Length up to the last attended position (anything after it is padding for every query).
    lengths_n = width - np.argmax(mask_ns[:, ::-1] != 0, axis=1)
    order = np.argsort(lengths_n, kind="stable")
    size = min(batch_size, n)
    out_nlf = None
    for start in range(0, n, size):
        rows = order[start:start + size]
        cut = min(width, max(8, 1 << int(lengths_n[rows].max() - 1).bit_length()))
        ids, mask = ids_ns[rows, :cut], mask_ns[rows, :cut]
        if len(rows) < size:
            fill = size - len(rows)
            ids = np.concatenate([ids, np.repeat(ids[:1], fill, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], fill, axis=0)])
        acts_blf = np.asarray(_cls_preactivations_batch(params, ids, mask, model=fp32))
        if out_nlf is None:
            out_nlf = np.empty((n, *acts_blf.shape[1:]), np.float32)
        out_nlf[rows] = acts_blf[:len(rows)]
    return out_nlf


def post_activation(cfg: ModelConfig, preactivations: np.ndarray) -> np.ndarray:
    """[..., F]: the model's activation function (exact GELU for "gelu") applied to
    pre-activations; for a gated FFN (ModernBERT's GLU, pre-activations [..., 2F] = input half
    u, gate half g) each neuron's value act(u) * g, what the output dense reads."""
    pre = jnp.asarray(preactivations, jnp.float32)
    if family(cfg.model_type).gated_ffn:
        u, g = jnp.split(pre, 2, axis=-1)
        return np.asarray(ACTIVATIONS[cfg.hidden_act](u) * g)
    return np.asarray(ACTIVATIONS[cfg.hidden_act](pre))


def per_neuron(cfg: ModelConfig, preactivations: np.ndarray) -> np.ndarray:
    """[..., F], one number per FFN neuron for the diagnostic: the pre-activation itself, or
    for a gated FFN (two pre-activations per neuron) its value act(u) * g."""
    if family(cfg.model_type).gated_ffn:
        return post_activation(cfg, preactivations)
    return preactivations
