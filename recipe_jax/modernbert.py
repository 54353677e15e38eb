"""ModernBERT (Answer.AI / LightOn, 2024): its Flax modules, its config.json keys and its HF
tensor layout, where they differ from the post-LayerNorm families of model.py.

ModernBERT is pre-LayerNorm (layer 0 has no attention norm: HF's Identity), has no position
embeddings (rotary positions, with one theta for global and one for local layers), attends
globally every `global_attn_every_n_layers` layers and within a sliding window of
`local_attention` tokens (|i - j| <= local_attention // 2) elsewhere, has a gated FFN (GLU:
`mlp.Wi` [2F, H] gives an input half u and a gate half g, the neuron value is act(u) * g), a
final LayerNorm, LayerNorms without bias and linears without bias by default
(`norm_bias`, `attention_bias`, `mlp_bias`, `classifier_bias`).

The Flax tree keeps BERT's paths, so aliases, sharding, pruning and the diagnostic read the same
names in every family: HF's fused `attn.Wqkv` [3H, H] is split into `attention/self/{query,key,
value}` on import and concatenated back on export (both exact); `mlp.Wi` is
`intermediate/dense` with a kernel [H, 2F] (u in columns 0..F-1, g in F..2F-1, so RECIPE's
||W||_F on `ffn_in` covers both GLU halves), `mlp.Wo` is `output/dense`. Their recipe_jax names
(`hf.hf_name`) are `model.layers.3.attn.Wqkv.query.weight` etc. for the three parts of Wqkv.

HF names one module `head` in every task class: the MLM head's transform (with `decoder.*`) and
the classifier's pooling head (with `classifier.*`). Here they are two Flax heads, `mlm/` and
`classifier_head/` (recipe_jax name `classifier.head.*`); `state_from_hf` / `state_to_hf` map
`head.*` to the right one (see there).

Shape letters as in model.py; D head dim, R rotary frequencies (D / 2).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from recipe_jax.arch import ModelConfig

log = logging.getLogger("recipe_jax.hf")

# ModernBertConfig's defaults (transformers), for keys a config.json leaves out.
DEFAULTS = dict(
    vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
    num_attention_heads=12, hidden_activation="gelu", max_position_embeddings=8192,
    initializer_range=0.02, norm_eps=1e-5, pad_token_id=50283, attention_dropout=0.0,
    embedding_dropout=0.0, classifier_dropout=0.0, norm_bias=False, attention_bias=False,
    mlp_bias=False, classifier_bias=False, decoder_bias=True, classifier_pooling="cls",
    classifier_activation="gelu", local_attention=128, global_attn_every_n_layers=3,
    global_rope_theta=160_000.0, local_rope_theta=10_000.0, mlp_dropout=0.0)
# ModelConfig fields only ModernBERT reads (same names as its config.json keys).
CONFIG_FIELDS = ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias", "decoder_bias",
                 "classifier_pooling", "classifier_activation", "local_attention",
                 "global_attn_every_n_layers", "global_rope_theta", "local_rope_theta",
                 "mlp_dropout")


def _activation(name: str):
    from recipe_jax.arch import ACTIVATIONS  # late: arch.py imports this module

    return ACTIVATIONS[name]


# ------------------------------------------------------------------------------ config.json

def read_hf_config(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json with ModernBertConfig's defaults filled in, and transformers 5's
    `layer_types` / `rope_parameters` read into `global_attn_every_n_layers` and the two
    rope thetas. What recipe_jax does not implement is a ValueError naming the key."""
    from recipe_jax.arch import ACTIVATIONS

    hf = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if hf.get("rope_scaling"):
        raise ValueError(f"config.json: rope_scaling={hf['rope_scaling']!r} is not supported; "
                         "ModernBERT loads with plain rotary positions only")
    for kind, key in (("full_attention", "global_rope_theta"),
                      ("sliding_attention", "local_rope_theta")):
        rope = (hf.get("rope_parameters") or {}).get(kind) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_parameters[{kind!r}] has rope_type="
                             f"{rope['rope_type']!r}; only 'default' rotary positions are "
                             "supported")
        hf[key] = float(rope.get("rope_theta", hf[key]))
    layers = hf["num_hidden_layers"]
    if hf.get("layer_types") is not None:
        types = list(hf["layer_types"])
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        every = (full[1] if len(full) > 1 else max(layers, 1)) if full else 0
        want = ["sliding_attention" if i % max(every, 1) else "full_attention"
                for i in range(layers)]
        if not full or types != want:
            raise ValueError(f"config.json: layer_types={types!r} is not supported; recipe_jax's "
                             "ModernBERT needs full_attention on every n-th layer from layer 0 "
                             "(global_attn_every_n_layers) and sliding_attention elsewhere")
        hf["global_attn_every_n_layers"] = every
    if hf["classifier_pooling"] not in ("cls", "mean"):
        raise ValueError(f"config.json: classifier_pooling={hf['classifier_pooling']!r} is not "
                         "supported; use 'cls' or 'mean'")
    if hf["classifier_activation"] not in ACTIVATIONS:
        raise ValueError(f"config.json: classifier_activation={hf['classifier_activation']!r} "
                         f"is not supported; use one of {', '.join(ACTIVATIONS)}")
    for key in ("global_attn_every_n_layers", "local_attention"):
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not a positive integer")
    return hf


def write_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ModernBERT-only keys of config.json, in both the flat form transformers 4.x reads
    and transformers 5's `layer_types` / `rope_parameters` (which win when both are there)."""
    out = {k: getattr(cfg, k) for k in CONFIG_FIELDS}
    out["layer_types"] = ["full_attention" if is_global(cfg, i) else "sliding_attention"
                          for i in range(cfg.num_hidden_layers)]
    out["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}}
    return out


def is_global(cfg: ModelConfig, layer: int) -> bool:
    return layer % cfg.global_attn_every_n_layers == 0


# ----------------------------------------------------------------------------------- modules

def _dense(features: int, cfg: ModelConfig, axes: tuple, use_bias: bool, name: str) -> nn.Dense:
    init = nn.initializers.normal(cfg.initializer_range)
    return nn.Dense(features, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                    kernel_init=nn.with_logical_partitioning(init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (axes[1],)), name=name)


def _norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, use_bias=cfg.norm_bias, dtype=jnp.dtype(cfg.dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name)


class Embeddings(nn.Module):
    """tok_embeddings -> LayerNorm -> dropout; no position or token-type embeddings."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_bl, token_type_ids_bl, deterministic: bool, position_ids_bl=None):
        del token_type_ids_bl, position_ids_bl  # positions are rotary (Encoder)
        cfg = self.cfg
        init = nn.initializers.normal(cfg.initializer_range)
        x_blh = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings",
                         embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")))(
            input_ids_bl)
        x_blh = _norm(cfg, "LayerNorm")(x_blh)
        return nn.Dropout(cfg.hidden_dropout_prob)(x_blh, deterministic=deterministic)


def rotary(position_ids_bl, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, L, D] of the rotary angles position * theta^(-2r/D), r < D/2, as HF's
    ModernBertRotaryEmbedding (float32)."""
    inv_freq_r = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_blr = position_ids_bl[..., None].astype(jnp.float32) * inv_freq_r
    angles_bld = jnp.concatenate([angles_blr, angles_blr], axis=-1)
    return jnp.cos(angles_bld), jnp.sin(angles_bld)


def _rotate(x_blnd, cos_bld, sin_bld):
    wide = jnp.promote_types(x_blnd.dtype, jnp.float32)
    x = x_blnd.astype(wide)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_bld[:, :, None].astype(wide) + rotated * sin_bld[:, :, None].astype(wide)
    return out.astype(x_blnd.dtype)


class _Linear(nn.Module):
    """A module holding one Dense named `dense` (BERT's `*/output/dense` paths)."""

    cfg: ModelConfig
    features: int
    axes: tuple
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        return _dense(self.features, self.cfg, self.axes, self.use_bias, "dense")(x)


class SelfAttention(nn.Module):
    """q, k, v (HF's fused Wqkv, split) with rotary positions; softmax(q k^T / sqrt(D) + bias)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, cos_bld, sin_bld, deterministic: bool):
        cfg = self.cfg
        b, length, _ = x_blh.shape
        split = lambda t: t.reshape(b, length, cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
        project = lambda name: split(_dense(  # noqa: E731
            cfg.hidden_size, cfg, ("embed", "heads"), cfg.attention_bias, name)(x_blh))
        q_blnd = _rotate(project("query"), cos_bld, sin_bld)
        k_blnd = _rotate(project("key"), cos_bld, sin_bld)
        v_blnd = project("value")
        scores_bnll = jnp.einsum("bqnd,bknd->bnqk", q_blnd, k_blnd) / jnp.sqrt(cfg.head_dim)
        wide = jnp.promote_types(scores_bnll.dtype, jnp.float32)
        probs_bnll = jax.nn.softmax(scores_bnll.astype(wide) + bias_b1ql, axis=-1)
        probs_bnll = nn.Dropout(cfg.attention_probs_dropout_prob)(
            probs_bnll, deterministic=deterministic).astype(v_blnd.dtype)
        out_blnd = jnp.einsum("bnqk,bknd->bqnd", probs_bnll, v_blnd)
        return out_blnd.reshape(b, length, cfg.hidden_size)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, cos_bld, sin_bld, deterministic: bool):
        cfg = self.cfg
        ctx_blh = SelfAttention(cfg, name="self")(x_blh, bias_b1ql, cos_bld, sin_bld,
                                                  deterministic)
        out_blh = _Linear(cfg, cfg.hidden_size, ("heads", "embed"), cfg.attention_bias,
                          name="output")(ctx_blh)
        return nn.Dropout(cfg.attention_probs_dropout_prob)(out_blh, deterministic=deterministic)


class GatedIntermediate(nn.Module):
    """Wi [H, 2F] -> act(u) * g [.., F]. Sows the dense's output [.., 2F] (u and g, the
    pre-activations) as `pre_activation`; activations.post_activation applies the GLU."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh):
        cfg = self.cfg
        pre_bl2f = _dense(2 * cfg.intermediate_size, cfg, ("embed", "mlp"), cfg.mlp_bias,
                          "dense")(x_blh)
        self.sow("intermediates", "pre_activation", pre_bl2f)
        u_blf, g_blf = jnp.split(pre_bl2f, 2, axis=-1)
        return _activation(cfg.hidden_act)(u_blf) * g_blf


class Layer(nn.Module):
    """x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)); layer 0 has no attn_norm."""

    cfg: ModelConfig
    first: bool

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, cos_bld, sin_bld, deterministic: bool):
        cfg = self.cfg
        h_blh = x_blh if self.first else _norm(cfg, "attn_norm")(x_blh)
        x_blh = x_blh + Attention(cfg, name="attention")(h_blh, bias_b1ql, cos_bld, sin_bld,
                                                          deterministic)
        h_blf = GatedIntermediate(cfg, name="intermediate")(_norm(cfg, "mlp_norm")(x_blh))
        h_blf = nn.Dropout(cfg.mlp_dropout)(h_blf, deterministic=deterministic)
        return x_blh + _Linear(cfg, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias,
                               name="output")(h_blf)


class Encoder(nn.Module):
    """The layers and the final LayerNorm. Hidden states as HF's `hidden_states`: the
    embeddings, then each layer's output, the last one after `final_norm`.

    Local layers see |pos_q - pos_k| <= local_attention // 2, measured on the position ids:
    packed rows restart them per sentence and attention never leaves a sentence, so the window
    is the one the sentence has alone."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, deterministic: bool, position_ids_bl=None):
        cfg = self.cfg
        if position_ids_bl is None:
            position_ids_bl = jnp.broadcast_to(jnp.arange(x_blh.shape[1]), x_blh.shape[:2])
        far_bll = jnp.abs(position_ids_bl[:, :, None] - position_ids_bl[:, None, :]) > (
            cfg.local_attention // 2)
        local_bias = jnp.where(far_bll[:, None], jnp.finfo(jnp.float32).min, bias_b1ql)
        rope = {True: rotary(position_ids_bl, cfg.head_dim, cfg.global_rope_theta),
                False: rotary(position_ids_bl, cfg.head_dim, cfg.local_rope_theta)}
        # `deterministic` (argument 5, counting self) is a Python bool: static under remat.
        layer_cls = nn.remat(Layer, static_argnums=(5,)) if cfg.remat else Layer
        hidden = [x_blh]
        for i in range(cfg.num_hidden_layers):
            full = is_global(cfg, i)
            layer = layer_cls(cfg, first=i == 0, name=f"layer_{i}")
            hidden.append(layer(hidden[-1], bias_b1ql if full else local_bias, *rope[full],
                                deterministic))
        hidden[-1] = _norm(cfg, "final_norm")(hidden[-1])
        return hidden


def _transform(cfg: ModelConfig, x):
    """HF's ModernBertPredictionHead: dense -> classifier_activation -> norm, created in the
    scope of the compact method that calls this (`mlm/dense`, `classifier_head/dense`)."""
    x = _dense(cfg.hidden_size, cfg, ("embed", "embed_out"), cfg.classifier_bias, "dense")(x)
    return _norm(cfg, "LayerNorm")(_activation(cfg.classifier_activation)(x))


class Head(nn.Module):
    """The classifier's pooling head (HF `head` of *ForSequenceClassification)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bh):
        return _transform(self.cfg, x_bh)


class MLMHead(nn.Module):
    """HF `head` (transform) -> `decoder` tied to the word embeddings (+ bias: decoder_bias)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bmh, word_embeddings_vh):
        cfg = self.cfg
        x_bmh = _transform(cfg, x_bmh)
        logits_bmv = jnp.einsum("bmh,vh->bmv", x_bmh, word_embeddings_vh.astype(x_bmh.dtype))
        logits_bmv = logits_bmv.astype(jnp.promote_types(logits_bmv.dtype, jnp.float32))
        if not cfg.decoder_bias:
            return logits_bmv
        return logits_bmv + self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("vocab",)), (cfg.vocab_size,))


def pool(cfg: ModelConfig, x_blh, attention_mask_bl):
    """classifier_pooling: the first token's state, or the mean over attended tokens (all
    tokens without a mask)."""
    if cfg.classifier_pooling == "cls":
        return x_blh[:, 0]
    if attention_mask_bl is None:
        return jnp.mean(x_blh, axis=1)
    mask_bl1 = attention_mask_bl[..., None].astype(x_blh.dtype)
    return jnp.sum(x_blh * mask_bl1, axis=1) / jnp.sum(mask_bl1, axis=1)


# ------------------------------------------------------------------------------ HF layout

_WQKV = re.compile(r"^(.*\.attn\.Wqkv)\.(weight|bias)$")
_PARTS = ("query", "key", "value")


def state_from_hf(state: dict[str, np.ndarray], where) -> dict[str, np.ndarray]:
    """HF names -> recipe_jax names: each `attn.Wqkv` [3H, ...] split into its query, key and
    value rows (`attn.Wqkv.query.weight`, ...); in a classifier checkpoint (`classifier.*`)
    `head.*` is the classifier's pooling head, renamed `classifier.head.*` (the MLM head is
    then absent and loads fresh). `head.*` beside `decoder.*` is the MLM head."""
    has_classifier = "classifier.weight" in state
    if has_classifier and any(k.startswith("decoder.") for k in state):
        raise ValueError(f"{where}: both decoder.* (MLM) and classifier.* tensors: ModernBERT "
                         "names both heads `head`, so one checkpoint cannot hold both; keep one")
    out = {}
    for key, value in state.items():
        match = _WQKV.match(key)
        if match:
            if value.shape[0] % 3:
                raise ValueError(f"{where}: {key} has {value.shape[0]} rows, not 3 x hidden")
            for part, chunk in zip(_PARTS, np.split(value, 3, axis=0), strict=True):
                out[f"{match.group(1)}.{part}.{match.group(2)}"] = chunk
        elif has_classifier and key.startswith("head."):
            out["classifier." + key] = value
        else:
            out[key] = value
    return out


def state_to_hf(tensors: dict[str, np.ndarray], num_labels: int) -> dict[str, np.ndarray]:
    """The inverse of `state_from_hf`: Wqkv concatenated back (bit-identical); with a
    classifier, `classifier.head.*` written as `head.*` and the MLM head left out (HF's
    ModernBertForSequenceClassification has no place for it)."""
    out, parts = {}, {}
    for key, value in tensors.items():
        match = re.match(r"^(.*\.attn\.Wqkv)\.(query|key|value)\.(weight|bias)$", key)
        if match:
            parts.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        elif num_labels and (key.startswith("head.") or key.startswith("decoder.")):
            continue
        elif key.startswith("classifier.head."):
            out[key[len("classifier."):]] = value
        else:
            out[key] = value
    for (prefix, leaf), by_part in parts.items():
        out[f"{prefix}.{leaf}"] = np.concatenate([by_part[p] for p in _PARTS], axis=0)
    dropped = sorted(k for k in tensors if num_labels and k.startswith(("head.", "decoder.")))
    if dropped:
        log.info("ModernBERT classifier export: the MLM head (%s) is not written; `head.*` "
                 "holds the classifier's pooling head", ", ".join(dropped))
    return out


def classifier_head_from_mlm(flat: dict, fresh_paths) -> list[tuple[str, ...]]:
    """A fresh classifier pooling head starts from the checkpoint's MLM head transform, as
    ModernBertForSequenceClassification.from_pretrained on an MLM checkpoint loads `head.*`
    into it. Returns the paths so initialized."""
    fresh = set(fresh_paths)
    copied = []
    for path in fresh:
        source = ("mlm", *path[1:])
        if path[0] == "classifier_head" and source in flat and source not in fresh:
            flat[path] = np.array(flat[source], copy=True)
            copied.append(path)
    return sorted(copied)
