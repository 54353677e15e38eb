"""The architecture of one checkpoint: `ModelConfig`, read from and written to a Hugging Face
`config.json` for every family (families.py), with DeBERTa's and ModernBERT's own fields
(deberta.py, modernbert.py); and the activations the config names.

    cfg = ModelConfig.from_hf_config(json.load(open("config.json")), mlm_head=True)
    json.dump(cfg.to_hf_config(), out)  # the architecture keys (hf.py adds the rest)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recipe_jax import deberta, modernbert
from recipe_jax.families import FAMILY_OF, SUPPORTED_MODEL_TYPES, family

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one checkpoint; the head flags say which optional tensors exist."""

    model_type: str = "bert"  # the family (families.FAMILIES): bert, roberta, ..., deberta-v2
    hf_model_type: str = ""  # the checkpoint's own model_type where it differs (xlm-roberta, ...)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no token types (DistilBERT)
    embedding_size: int = 0  # ELECTRA: embeddings narrower than hidden_size, projected; 0 = same
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    # DeBERTa-v2/v3 only (deberta.py; HF DebertaV2Config's names and defaults).
    relative_attention: bool = False  # disentangled attention over relative positions
    max_relative_positions: int = -1  # clip of relative positions; < 1: max_position_embeddings
    position_buckets: int = -1  # > 0: log-bucketed relative positions (v3: 256)
    pos_att_type: str = ""  # the extra score terms, "|"-joined: c2p, p2c
    share_att_key: bool = False  # relative embeddings through query/key, not pos_*_proj
    norm_rel_ebd: str = "none"  # "layer_norm": encoder/LayerNorm on the relative embeddings
    position_biased_input: bool = True  # absolute position embeddings (v3: none)
    pooler_hidden_act: str = "gelu"  # the classification head's ContextPooler
    pooler_dropout: float = 0.0
    legacy: bool = True  # MLM head names: cls.predictions.* (True) or lm_predictions.lm_head.*
    # Which heads the parameter tree holds.
    mlm_head: bool = True
    pooler: bool = False
    nsp_head: bool = False
    discriminator: bool = False  # ELECTRA's replaced-token detection head
    num_labels: int = 0  # 0 = no sequence-classification head
    # ModernBERT only (modernbert.py; its config.json keys): other families keep the defaults.
    norm_bias: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    classifier_bias: bool = True
    decoder_bias: bool = True
    classifier_pooling: str = "cls"
    classifier_activation: str = "gelu"
    local_attention: int = 0  # sliding window width (|i - j| <= local_attention // 2)
    global_attn_every_n_layers: int = 1
    global_rope_theta: float = 0.0
    local_rope_theta: float = 0.0
    mlp_dropout: float = 0.0
    # Compute options, not architecture: dtype (params stay float32) and per-layer remat
    # (recompute each layer's activations in the backward pass: less memory, more compute).
    dtype: str = "float32"
    remat: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **heads: Any) -> ModelConfig:
        """Reads a Hugging Face `config.json` dict; `heads` sets the head flags."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: recipe_jax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (post-LayerNorm encoders)"
            )
        fam = family(model_type)
        if fam.name == "modernbert":  # its defaults; transformers 5's layer_types, rope_parameters
            hf = modernbert.read_hf_config(hf)
        hf = {**hf, **{ours: hf[theirs] for theirs, ours in fam.config_keys.items()
                       if theirs in hf}}
        if fam.name == "electra":
            hf.setdefault("embedding_size", 128)  # ElectraConfig's default
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                "only 'absolute' position embeddings (the default) are"
            )
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("decoder/cross-attention configs are not supported (encoders only)")
        fields = {f.name for f in dataclasses.fields(cls)} - {
            "model_type", "hf_model_type", "mlm_head", "pooler", "nsp_head", "discriminator",
            "num_labels", "dtype", "remat", *deberta.FIELDS}
        if fam.name != "modernbert":
            fields -= set(modernbert.CONFIG_FIELDS)
        values = {k: hf[k] for k in fields if k in hf and hf[k] is not None}
        if hf.get("classifier_dropout") is None:
            values.pop("classifier_dropout", None)
        values.update(fam.fixed)
        if fam.name == "deberta-v2":
            values.update(deberta.read_config(hf))
        _check_field_types(values)
        name = FAMILY_OF[model_type]
        return cls(model_type=name, hf_model_type="" if name == model_type else model_type,
                   **values, **heads)

    def to_hf_config(self) -> dict[str, Any]:
        """The architecture fields of a Hugging Face `config.json` (hf.py adds the rest)."""
        skip = {"mlm_head", "pooler", "nsp_head", "discriminator", "num_labels", "dtype",
                "remat", "hf_model_type"}
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in skip and k not in deberta.FIELDS}
        out["model_type"] = self.hf_model_type or self.model_type
        fam = family(self.model_type)
        for key in modernbert.CONFIG_FIELDS:
            out.pop(key)
        if fam.name == "modernbert":
            out.update(modernbert.write_hf_config(self))
        if fam.name == "deberta-v2":
            out.update(deberta.write_config(self))
        if not self.embedding_size:
            out.pop("embedding_size")
        for key in fam.fixed:
            out.pop(key)
        for theirs, ours in fam.config_keys.items():  # DistilBERT's own key names
            value = out.pop(ours)
            if value is not None:
                out[theirs] = value
        if not fam.config_keys:
            out["position_embedding_type"] = "absolute"
        if self.num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_width(self) -> int:
        """Width of the embeddings (and of ELECTRA's generator head): hidden_size elsewhere."""
        return self.embedding_size or self.hidden_size


ACTIVATION_KEYS = ("hidden_act", "pooler_hidden_act", "classifier_activation")


def _check_field_types(values: dict[str, Any]) -> None:
    """config.json values of the right kind: numbers where numbers belong, a known activation."""
    for key in ACTIVATION_KEYS:
        if values.get(key, "gelu") not in ACTIVATIONS:
            raise ValueError(f"config.json: {key}={values[key]!r} is not supported; "
                             f"use one of {', '.join(ACTIVATIONS)}")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in values or f.name in ("model_type", "hf_model_type", *ACTIVATION_KEYS):
            continue
        value, number = values[f.name], "float" in str(f.type)
        if f.type in ("bool", "str"):  # DeBERTa's and ModernBERT's flags and choices
            if not isinstance(value, bool if f.type == "bool" else str):
                raise ValueError(f"config.json: {f.name}={value!r} is not a {f.type}")
        elif isinstance(value, bool) or not isinstance(value, (int, float) if number else int):
            kind = "a number" if number else "an integer (sizes are positive integers)"
            raise ValueError(f"config.json: {f.name}={value!r} is not {kind}; fix the file "
                             "(e.g. layer_norm_eps: 1e-12, num_hidden_layers: 12)")
