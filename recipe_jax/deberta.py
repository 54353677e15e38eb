"""DeBERTa-v2/v3's disentangled attention: relative positions, their log buckets, and the
content-to-position (c2p) and position-to-content (p2c) score terms; its config.json keys.

model.py calls these from `Encoder` (relative positions, once per forward) and `SelfAttention`
(the two extra score terms, per layer); the parameters stay in BERT's tree (`encoder/
rel_embeddings`, `encoder/LayerNorm`, `attention/self/pos_key_proj` ...). The math follows
transformers' `DisentangledSelfAttention`: with relative position r = i - j of query i and key j,
bucketed to b(r) and shifted into the table of 2S relative embeddings P,

    score(i, j) = (q_i . k_j + q_i . Pk[b(i - j)] + k_j . Pq[-b(j - i)]) / sqrt(D * (1 + terms))

where Pk = P @ W_key and Pq = P @ W_query (the attention's own projections when
`share_att_key`, else `pos_key_proj` / `pos_query_proj`) and `terms` counts c2p and p2c.

Shape letters as in model.py; R relative-embedding rows (2S), K keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# ModelConfig fields only DeBERTa-v2 reads (HF DebertaV2Config names and defaults).
FIELDS = ("relative_attention", "max_relative_positions", "position_buckets", "pos_att_type",
          "share_att_key", "norm_rel_ebd", "position_biased_input", "pooler_hidden_act",
          "pooler_dropout", "legacy")
ATTENTION_TYPES = ("c2p", "p2c")


def read_config(hf: dict[str, Any]) -> dict[str, Any]:
    """DeBERTa's ModelConfig fields from its config.json (HF defaults where a key is absent);
    a ValueError names any setting recipe_jax does not implement."""
    conv = hf.get("conv_kernel_size") or 0
    if conv > 0:
        raise ValueError(f"config.json: conv_kernel_size={conv}: DeBERTa-v2's convolution layer "
                         "(deberta-v2-xlarge/xxlarge) is not supported; only conv_kernel_size 0 "
                         "(DeBERTa-v3 and the base/large v2 layouts) is")
    hidden, heads = hf.get("hidden_size", 1536), hf.get("num_attention_heads", 24)
    for key, want in (("pooler_hidden_size", hidden), ("attention_head_size", hidden // heads)):
        if hf.get(key, want) != want:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported; only {want} "
                             "(hidden_size, split evenly over the heads)")
    types = hf.get("pos_att_type") or []
    if isinstance(types, str):  # the old "p2c|c2p" form
        types = types.lower().split("|")
    types = [t.strip() for t in types]
    if not set(types) <= set(ATTENTION_TYPES):
        raise ValueError(f"config.json: pos_att_type={hf['pos_att_type']!r}: only "
                         f"{' and '.join(ATTENTION_TYPES)} are supported (e.g. ['p2c', 'c2p'])")
    norm = [t.strip() for t in str(hf.get("norm_rel_ebd", "none")).lower().split("|")]
    if not set(norm) <= {"none", "layer_norm"}:
        raise ValueError(f"config.json: norm_rel_ebd={hf['norm_rel_ebd']!r}: only 'none' and "
                         "'layer_norm' are supported")
    values = dict(relative_attention=hf.get("relative_attention", False),
                  max_relative_positions=hf.get("max_relative_positions", -1),
                  position_buckets=hf.get("position_buckets", -1),
                  pos_att_type="|".join(dict.fromkeys(types)),
                  share_att_key=hf.get("share_att_key", False),
                  norm_rel_ebd="layer_norm" if "layer_norm" in norm else "none",
                  position_biased_input=hf.get("position_biased_input", True),
                  pooler_hidden_act=hf.get("pooler_hidden_act", "gelu"),
                  pooler_dropout=hf.get("pooler_dropout", 0.0),
                  legacy=hf.get("legacy", True))
    for key in ("relative_attention", "share_att_key", "position_biased_input", "legacy"):
        if not isinstance(values[key], bool):
            raise ValueError(f"config.json: {key}={values[key]!r} is not true or false")
    embedding_size = hf.get("embedding_size") or hidden
    if not values["legacy"] and embedding_size != hidden:
        raise ValueError(f"config.json: legacy=false with embedding_size {embedding_size} != "
                         f"hidden_size {hidden}: that MLM head needs equal sizes")
    return values


def write_config(cfg) -> dict[str, Any]:
    """The config.json keys of `read_config` (pos_att_type as the list HF writes)."""
    out = {k: getattr(cfg, k) for k in FIELDS}
    out["pos_att_type"] = cfg.pos_att_type.split("|") if cfg.pos_att_type else None
    return out


def attention_types(cfg) -> tuple[str, ...]:
    return tuple(cfg.pos_att_type.split("|")) if cfg.pos_att_type else ()


def span(cfg) -> int:
    """S: relative positions index a table of 2S embeddings (the buckets, else the clip)."""
    if cfg.position_buckets > 0:
        return cfg.position_buckets
    return max_relative(cfg)


def max_relative(cfg) -> int:
    return cfg.max_relative_positions if cfg.max_relative_positions >= 1 else (
        cfg.max_position_embeddings)


def log_bucket(rel: jax.Array, buckets: int, max_position: int) -> jax.Array:
    """Relative positions, exact within +-buckets/2 and log-spaced beyond, as transformers'
    `make_log_bucket_position` (float32, the same operations, so the same ceil boundaries)."""
    mid = buckets // 2
    sign = jnp.sign(rel)
    abs_pos = jnp.where((rel < mid) & (rel > -mid), mid - 1, jnp.abs(rel)).astype(jnp.float32)
    ratio = jnp.log(abs_pos / jnp.float32(mid)) / jnp.log(jnp.float32((max_position - 1) / mid))
    log_pos = jnp.ceil(ratio * jnp.float32(mid - 1)) + mid
    return jnp.where(abs_pos <= mid, rel.astype(jnp.float32), log_pos * sign).astype(jnp.int32)


def relative_positions(cfg, positions_bl: jax.Array) -> jax.Array:
    """int32 [B, L, L]: position of query i minus position of key j, bucketed. Packed rows
    give their per-sentence positions, so each sentence sees the positions it has alone."""
    rel_bqk = positions_bl[:, :, None] - positions_bl[:, None, :]
    if cfg.position_buckets > 0:
        rel_bqk = log_bucket(rel_bqk, cfg.position_buckets, max_relative(cfg))
    return rel_bqk.astype(jnp.int32)


def disentangled_scores(cfg, q_blnd, k_blnd, pos_query_rnd, pos_key_rnd, rel_bqk, scale):
    """[B, N, L, L]: the c2p and p2c terms (each divided by `scale`) for the types in `cfg`.

    transformers computes every query against every table row, then gathers the row of each
    (query, key) pair's relative position, clipped to the table; so does this."""
    s = span(cfg)
    score = 0.0
    if "c2p" in attention_types(cfg):
        c2p_bnqr = jnp.einsum("bqnd,rnd->bnqr", q_blnd, pos_key_rnd)
        index = jnp.clip(rel_bqk + s, 0, 2 * s - 1)[:, None]  # [B, 1, q, k]
        index = jnp.broadcast_to(index, c2p_bnqr.shape[:3] + (rel_bqk.shape[-1],))
        score += jnp.take_along_axis(c2p_bnqr, index, axis=-1) / scale
    if "p2c" in attention_types(cfg):
        p2c_bnkr = jnp.einsum("bknd,rnd->bnkr", k_blnd, pos_query_rnd)
        index = jnp.clip(-rel_bqk + s, 0, 2 * s - 1)[:, None]  # [B, 1, k, q]: rel of key k
        index = jnp.broadcast_to(index, p2c_bnkr.shape[:3] + (rel_bqk.shape[-2],))
        p2c_bnkq = jnp.take_along_axis(p2c_bnkr, index, axis=-1)
        score += jnp.swapaxes(p2c_bnkq, -1, -2) / scale
    return score
