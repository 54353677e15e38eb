"""Flax Linen encoders: post-LayerNorm (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA,
DeBERTa-v2/v3) with MLM (generator), NSP, pooler, ELECTRA discriminator and classification heads;
ModernBERT's pre-LayerNorm modules (modernbert.py) plug into the same `Transformer` on the same
paths.

One module, `Transformer`, covers every family: they differ in position ids (RoBERTa counts from
`padding_idx + 1` and skips padding), token types (DistilBERT has none), ELECTRA's and DeBERTa's
narrower embeddings and their projection, DeBERTa's relative-position attention (deberta.py), the
MLM head's activation, the classification head, and the HF names (families.py). Parameter names
mirror BERT's Hugging Face module names (`encoder/layer_3/intermediate/dense/kernel` is
`bert.encoder.layer.3.intermediate.dense.weight`, DistilBERT's
`distilbert.transformer.layer.3.ffn.lin1.weight`), so conversion is a dict-to-dict map with
transposes. Every parameter carries logical axis names; `sharding.py` maps them onto the mesh.

Shape letters: B batch, L length, M masked positions, H hidden, F ffn, V vocab, N heads, D head dim;
the attention bias is `[B, 1, q, L]` with q = 1 (padding mask) or L (packed rows).

The architecture, `ModelConfig`, is read from `config.json` in arch.py:

    model = Transformer(ModelConfig.from_hf_config(json.load(open("config.json"))))
    logits_blv = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recipe_jax import deberta, modernbert
from recipe_jax.arch import ACTIVATIONS, ModelConfig
from recipe_jax.families import family


def _at_least_f32(x: jax.Array) -> jax.Array:
    """float32 outputs under bf16 compute; float64 stays float64 (exactness tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _dense(features: int, cfg: ModelConfig, axes: tuple[str, str], name: str,
           use_bias: bool = True) -> nn.Dense:
    init = nn.initializers.normal(cfg.initializer_range)
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.dtype(cfg.dtype),
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=jnp.dtype(cfg.dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def _embed(num: int, cfg: ModelConfig, axes: tuple[str, str], name: str,
           width: int = 0) -> nn.Embed:
    init = nn.initializers.normal(cfg.initializer_range)
    return nn.Embed(num, width or cfg.embedding_width,
                    embedding_init=nn.with_logical_partitioning(init, axes), name=name)


def position_ids(cfg: ModelConfig, input_ids_bl: jax.Array) -> jax.Array:
    """BERT: 0..L-1. RoBERTa: padding_idx+1 onwards over non-pad tokens, pad -> padding_idx."""
    if family(cfg.model_type).positions == "roberta":
        not_pad = (input_ids_bl != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids_bl.shape[1]), input_ids_bl.shape)


class Embeddings(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_bl, token_type_ids_bl, deterministic: bool, position_ids_bl=None):
        cfg = self.cfg
        words = _embed(cfg.vocab_size, cfg, ("vocab", "embed"), "word_embeddings")
        x_blh = words(input_ids_bl)
        if position_ids_bl is None:
            position_ids_bl = position_ids(cfg, input_ids_bl)
        if cfg.position_biased_input:  # DeBERTa-v3: relative positions only
            x_blh += _embed(cfg.max_position_embeddings, cfg, (None, "embed"),
                            "position_embeddings")(position_ids_bl)
        if cfg.type_vocab_size:  # DistilBERT has no token types
            x_blh += _embed(cfg.type_vocab_size, cfg, (None, "embed"), "token_type_embeddings")(
                token_type_ids_bl)
        if cfg.embedding_width != cfg.hidden_size and family(cfg.model_type).embed_proj:
            x_blh = _dense(cfg.hidden_size, cfg, ("embed", "embed_out"), "embed_proj",
                           use_bias=False)(x_blh)  # DeBERTa: before the LayerNorm, no bias
        x_blh = _layer_norm(cfg, "LayerNorm")(x_blh)
        return nn.Dropout(cfg.hidden_dropout_prob)(x_blh, deterministic=deterministic)


class SelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, deterministic: bool, relative=None):
        cfg = self.cfg
        split = lambda t: t.reshape(*t.shape[:-1], cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
        query = _dense(cfg.hidden_size, cfg, ("embed", "heads"), "query")
        key = _dense(cfg.hidden_size, cfg, ("embed", "heads"), "key")
        q_blnd, k_blnd = split(query(x_blh)), split(key(x_blh))
        v_blnd = split(_dense(cfg.hidden_size, cfg, ("embed", "heads"), "value")(x_blh))
        # sqrt(D), times the number of score terms (DeBERTa's c2p and p2c add one each).
        scale = jnp.sqrt(cfg.head_dim * (1 + len(deberta.attention_types(cfg))))
        scores_bnll = jnp.einsum("bqnd,bknd->bnqk", q_blnd, k_blnd) / scale
        if relative is not None:  # DeBERTa: (relative embeddings [R, H], positions [B, L, L])
            rel_rh, rel_bqk = relative
            rel_rh = nn.Dropout(cfg.hidden_dropout_prob)(rel_rh, deterministic=deterministic)
            types = deberta.attention_types(cfg)

            def project(dense: nn.Dense, name: str):  # [R, N, D] through query/key or pos_*
                if not cfg.share_att_key:
                    dense = _dense(cfg.hidden_size, cfg, ("embed", "heads"), name)
                return split(dense(rel_rh))

            pos_key_rnd = project(key, "pos_key_proj") if "c2p" in types else None
            pos_query_rnd = project(query, "pos_query_proj") if "p2c" in types else None
            scores_bnll += deberta.disentangled_scores(cfg, q_blnd, k_blnd, pos_query_rnd,
                                                       pos_key_rnd, rel_bqk, scale)
        # Softmax in float32 (or wider) even under bf16 compute: masked logits need the range.
        wide = jnp.promote_types(scores_bnll.dtype, jnp.float32)
        probs_bnll = jax.nn.softmax(scores_bnll.astype(wide) + bias_b1ql, axis=-1)
        probs_bnll = nn.Dropout(cfg.attention_probs_dropout_prob)(
            probs_bnll, deterministic=deterministic).astype(v_blnd.dtype)
        out_blnd = jnp.einsum("bnqk,bknd->bqnd", probs_bnll, v_blnd)
        return out_blnd.reshape(x_blh.shape[:-1] + (cfg.hidden_size,))


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, deterministic: bool, relative=None):
        cfg = self.cfg
        ctx_blh = SelfAttention(cfg, name="self")(x_blh, bias_b1ql, deterministic, relative)
        out = _AddNorm(cfg, ("heads", "embed"), name="output")(ctx_blh, x_blh, deterministic)
        return out


class _AddNorm(nn.Module):
    """HF's `*Output` block: dense -> dropout -> LayerNorm(x + residual)."""

    cfg: ModelConfig
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x, residual_blh, deterministic: bool):
        cfg = self.cfg
        y_blh = _dense(cfg.hidden_size, cfg, self.axes, "dense")(x)
        y_blh = nn.Dropout(cfg.hidden_dropout_prob)(y_blh, deterministic=deterministic)
        return _layer_norm(cfg, "LayerNorm")(y_blh + residual_blh)


class Intermediate(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh):
        # The pre-activation is sown so the selective-activation diagnostic can read it.
        pre_blf = _dense(self.cfg.intermediate_size, self.cfg, ("embed", "mlp"), "dense")(x_blh)
        self.sow("intermediates", "pre_activation", pre_blf)
        return ACTIVATIONS[self.cfg.hidden_act](pre_blf)


class Layer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, deterministic: bool, relative=None):
        cfg = self.cfg
        x_blh = Attention(cfg, name="attention")(x_blh, bias_b1ql, deterministic, relative)
        h_blf = Intermediate(cfg, name="intermediate")(x_blh)
        return _AddNorm(cfg, ("mlp", "embed"), name="output")(h_blf, x_blh, deterministic)


class Encoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh, bias_b1ql, deterministic: bool, positions_bl=None):
        cfg = self.cfg
        # `deterministic` (argument 3, counting self) is a Python bool: static under remat.
        layer_cls = nn.remat(Layer, static_argnums=(3,)) if cfg.remat else Layer
        relative = None
        if cfg.relative_attention:  # DeBERTa: one relative-position table for every layer
            rows = 2 * deberta.span(cfg)
            rel_rh = _embed(rows, cfg, (None, "embed"), "rel_embeddings", cfg.hidden_size)(
                jnp.arange(rows))
            if cfg.norm_rel_ebd == "layer_norm":
                rel_rh = _layer_norm(cfg, "LayerNorm")(rel_rh)
            if positions_bl is None:
                positions_bl = jnp.arange(x_blh.shape[1])[None]
            relative = (rel_rh.astype(x_blh.dtype), deberta.relative_positions(cfg, positions_bl))
        hidden = [x_blh]
        for i in range(cfg.num_hidden_layers):
            hidden.append(layer_cls(cfg, name=f"layer_{i}")(hidden[-1], bias_b1ql,
                                                            deterministic, relative))
        return hidden


class MLMHead(nn.Module):
    """transform (dense, act, LayerNorm) -> decoder tied to the word embeddings + own bias.
    ELECTRA's generator head projects to the (narrower) embedding width."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bmh, word_embeddings_vh):
        cfg = self.cfg
        x_bmh = _dense(cfg.embedding_width, cfg, ("embed", "embed_out"), "dense")(x_bmh)
        act = family(cfg.model_type).mlm_act or cfg.hidden_act  # RoBERTa, ELECTRA: gelu
        x_bmh = _layer_norm(cfg, "LayerNorm")(ACTIVATIONS[act](x_bmh))
        bias_v = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                 ("vocab",)), (cfg.vocab_size,))
        logits_bmv = jnp.einsum("bmh,vh->bmv", x_bmh, word_embeddings_vh.astype(x_bmh.dtype))
        return _at_least_f32(logits_bmv) + bias_v


class Discriminator(nn.Module):
    """ELECTRA's replaced-token detection head: dense, hidden_act, dense to one logit."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_blh):
        cfg = self.cfg
        x_blh = ACTIVATIONS[cfg.hidden_act](
            _dense(cfg.hidden_size, cfg, ("embed", "embed_out"), "dense")(x_blh))
        return _at_least_f32(_dense(1, cfg, ("embed", None), "dense_prediction")(x_blh))[..., 0]


class Transformer(nn.Module):
    """An encoder with the heads named in `cfg`.

    `__call__` gives MLM logits (`[B, L, V]`, or `[B, M, V]` at `masked_positions`); `classify`
    gives sequence-classification logits; `discriminate` ELECTRA's per-token logits; `encode`
    gives every layer's hidden states.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        mb = cfg.model_type == "modernbert"  # its own pre-LN modules, on the same paths
        self.embeddings = (modernbert.Embeddings if mb else Embeddings)(cfg)
        if self._projects_embeddings:  # ELECTRA
            self.embeddings_project = _dense(cfg.hidden_size, cfg, ("embed", "embed_out"),
                                             "embeddings_project")
        self.encoder = (modernbert.Encoder if mb else Encoder)(cfg)
        if cfg.pooler:
            self.pooler = _dense(cfg.hidden_size, cfg, ("embed", "embed_out"), "pooler")
        if cfg.mlm_head:
            self.mlm = (modernbert.MLMHead if mb else MLMHead)(cfg)
        if cfg.nsp_head:
            self.nsp = _dense(2, cfg, ("embed", None), "nsp")
        if cfg.discriminator:
            self.discriminator = Discriminator(cfg)
        if cfg.num_labels:
            if mb:
                self.classifier_head = modernbert.Head(cfg)
            elif family(cfg.model_type).classifier != "pooler":  # a dense layer on [CLS] / <s>
                self.classifier_dense = _dense(cfg.hidden_size, cfg, ("embed", "embed_out"),
                                               "classifier_dense")
            self.classifier = _dense(cfg.num_labels, cfg, ("embed", None), "classifier")
            rate = cfg.classifier_dropout
            self.classifier_dropout = nn.Dropout(cfg.hidden_dropout_prob if rate is None else rate)
            if family(cfg.model_type).classifier == "context_pooler":  # DeBERTa
                self.pooler_dropout = nn.Dropout(cfg.pooler_dropout)

    @property
    def _projects_embeddings(self) -> bool:
        """ELECTRA's embeddings_project after the embeddings (DeBERTa's is inside them)."""
        cfg = self.cfg
        return cfg.embedding_width != cfg.hidden_size and not family(cfg.model_type).embed_proj

    def encode(self, input_ids_bl, attention_mask_bl=None, token_type_ids_bl=None,
               deterministic: bool = True, position_ids_bl=None,
               segment_ids_bl=None) -> list[jax.Array]:
        """Hidden states `[B, L, H]` after the embeddings and after each layer.

        Packed rows (recipe_jax/packing.py) pass `position_ids_bl` (restarting per sentence)
        and `segment_ids_bl` (sentence index, -1 on padding): a token then attends only to its
        own sentence, and `attention_mask_bl` is not read."""
        if attention_mask_bl is None:
            attention_mask_bl = jnp.ones_like(input_ids_bl)
        if token_type_ids_bl is None:
            token_type_ids_bl = jnp.zeros_like(input_ids_bl)
        x_blh = self.embeddings(input_ids_bl, token_type_ids_bl, deterministic, position_ids_bl)
        if self._projects_embeddings:
            x_blh = self.embeddings_project(x_blh)
        x_blh = x_blh.astype(jnp.dtype(self.cfg.dtype))
        neg = jnp.finfo(jnp.float32).min
        if segment_ids_bl is None:
            bias = jnp.where(attention_mask_bl[:, None, None, :] > 0, 0.0, neg)  # [B, 1, 1, L]
        else:
            same_bll = (segment_ids_bl[:, :, None] == segment_ids_bl[:, None, :]) & (
                segment_ids_bl[:, None, :] >= 0)
            bias = jnp.where(same_bll[:, None], 0.0, neg)  # [B, 1, L, L]: block-diagonal
        return self.encoder(x_blh, bias.astype(jnp.float32), deterministic, position_ids_bl)

    def __call__(self, input_ids_bl, attention_mask_bl=None, token_type_ids_bl=None,
                 deterministic: bool = True, masked_positions_bm=None) -> jax.Array:
        x_blh = self.encode(input_ids_bl, attention_mask_bl, token_type_ids_bl, deterministic)[-1]
        return self.mlm_logits(x_blh, masked_positions_bm)

    def mlm_logits(self, x_blh, masked_positions_bm=None) -> jax.Array:
        """MLM logits from final hidden states (all positions, or only `masked_positions`)."""
        if masked_positions_bm is not None:
            # Gather before the vocab projection: the [H, V] matmul runs only where a label is.
            x_blh = jnp.take_along_axis(x_blh, masked_positions_bm[..., None], axis=1)
        words_vh = nn.unbox(self.embeddings.variables["params"]["word_embeddings"]["embedding"])
        return self.mlm(x_blh, words_vh)

    def pool(self, x_blh) -> jax.Array:
        return jnp.tanh(self.pooler(x_blh[:, 0]))

    def classify(self, input_ids_bl, attention_mask_bl=None, token_type_ids_bl=None,
                 deterministic: bool = True) -> jax.Array:
        """Sequence-classification logits `[B, num_labels]`, as HF's *ForSequenceClassification:
        BERT pooler -> linear; RoBERTa dense-tanh, ELECTRA dense-gelu, DeBERTa dense-
        pooler_hidden_act on <s> / [CLS] (dropout before each); DistilBERT dense-ReLU on [CLS];
        ModernBERT its head on [CLS] or the mean."""
        x_blh = self.encode(input_ids_bl, attention_mask_bl, token_type_ids_bl, deterministic)[-1]
        drop = self.classifier_dropout
        style = family(self.cfg.model_type).classifier
        if style == "pooler":
            x_bh = self.pool(x_blh)
        elif style == "modernbert":  # [CLS] or mean pooling, then HF's `head` transform
            x_bh = self.classifier_head(modernbert.pool(self.cfg, x_blh, attention_mask_bl))
        elif style == "dense_relu":
            x_bh = jax.nn.relu(self.classifier_dense(x_blh[:, 0]))
        else:
            first = self.pooler_dropout if style == "context_pooler" else drop
            x_bh = self.classifier_dense(first(x_blh[:, 0], deterministic=deterministic))
            act = {"dense_tanh": "tanh", "dense_gelu": "gelu"}.get(style,
                                                                   self.cfg.pooler_hidden_act)
            x_bh = ACTIVATIONS[act](x_bh)
        logits = self.classifier(drop(x_bh, deterministic=deterministic))
        return _at_least_f32(logits)

    def discriminate(self, input_ids_bl, attention_mask_bl=None, token_type_ids_bl=None,
                     deterministic: bool = True) -> jax.Array:
        """ELECTRA discriminator logits `[B, L]` (replaced or not), as ElectraForPreTraining."""
        x_blh = self.encode(input_ids_bl, attention_mask_bl, token_type_ids_bl, deterministic)[-1]
        return self.discriminator(x_blh)

    def init_all(self, input_ids_bl):
        """Touches every configured head so that `init` creates all their parameters."""
        hidden_blh = self.encode(input_ids_bl)[-1]
        outs = []
        if self.cfg.mlm_head:
            outs.append(self(input_ids_bl))
        if self.cfg.pooler:
            pooled = self.pool(hidden_blh)
            if self.cfg.nsp_head:
                outs.append(self.nsp(pooled))
        elif self.cfg.nsp_head:
            outs.append(self.nsp(hidden_blh[:, 0]))
        if self.cfg.discriminator:
            outs.append(self.discriminator(hidden_blh))
        if self.cfg.num_labels:
            outs.append(self.classify(input_ids_bl))
        return outs


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh boxed (logically partitioned) parameters for every head in `cfg`."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return Transformer(cfg).init(rng, ids, method=Transformer.init_all)["params"]


def abstract_params(cfg: ModelConfig) -> dict:
    """Shapes and logical axes of all parameters, without allocating (`jax.eval_shape`)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
