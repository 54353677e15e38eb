"""The encoder families recipe_jax loads, and what differs between them.

Every family shares one Flax parameter tree (model.py): BERT's module names (`embeddings`,
`encoder/layer_3/intermediate/dense`, `mlm`, `pooler`, `classifier`, ...), so that training,
sharding, pruning and the diagnostics read the same paths for all. What differs is written here
once per family: the HF tensor names (BERT-style names rewritten by `renames`, and the heads),
the config.json keys, the position ids, the MLM head's activation, the classification head.

    FAMILIES["distilbert"].heads["mlm/dense"]      # 'vocab_transform'
    resolve_aliases(("ffn_in",))                   # the FFN input matrices, in any family

XLM-RoBERTa and CamemBERT are RoBERTa's tensors under their own `model_type` (FAMILY_OF).
ModernBERT (pre-LayerNorm, rotary, gated FFN) has its own modules (modernbert.py) on the same
paths: its FFN input `intermediate/dense` is the GLU's [H, 2F] `mlp.Wi`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.model_type, and the HF prefix of the encoder's tensors
    class_prefix: str  # HF classes: {class_prefix}ForMaskedLM, ...
    heads: dict[str, str]  # Flax head path -> HF name (without the leaf .weight/.bias)
    tied: str  # the MLM decoder weight HF serializes (a copy of the word embeddings)
    tied_bias: str | None = None  # the decoder bias where HF stores it apart from the head's
    positions: str = "absolute"  # "absolute": 0..L-1; "roberta": from padding_idx + 1
    mlm_act: str | None = None  # the MLM head's activation when it is not `hidden_act`
    # pooler | dense_tanh | dense_gelu | dense_relu | context_pooler (DeBERTa) | modernbert
    classifier: str = "pooler"
    has_pooler: bool = True  # checkpoints of this family may carry a pooler
    bare_roots: tuple[str, ...] = ("embeddings", "encoder", "pooler")  # *Model keys, no prefix
    renames: tuple[tuple[str, str], ...] = ()  # (regex over BERT-style names, HF replacement)
    config_keys: dict[str, str] = dataclasses.field(default_factory=dict)  # HF key -> ours
    fixed: dict[str, object] = dataclasses.field(default_factory=dict)  # fields HF hard-codes
    prefix: str = ""  # HF prefix of the encoder's tensors where it is not `name`
    gated_ffn: bool = False  # GLU: intermediate/dense is [H, 2F] (input half u, gate half g)
    embed_proj: bool = False  # embedding_size != hidden: projected inside the embeddings
    # legacy=false checkpoints' MLM head names -> the legacy ones the map above uses
    head_aliases: tuple[tuple[str, str], ...] = ()
    ignored: str = ""  # regex: tensors HF drops on load when the config does not use them

    @property
    def encoder_prefix(self) -> str:
        return self.prefix or self.name


FAMILIES = {
    "bert": Family(
        "bert", "Bert",
        heads={"mlm/dense": "cls.predictions.transform.dense",
               "mlm/LayerNorm": "cls.predictions.transform.LayerNorm",
               "mlm/bias": "cls.predictions.bias", "nsp": "cls.seq_relationship",
               "classifier": "classifier"},
        tied="cls.predictions.decoder.weight", tied_bias="cls.predictions.decoder.bias"),
    "roberta": Family(
        "roberta", "Roberta",
        heads={"mlm/dense": "lm_head.dense", "mlm/LayerNorm": "lm_head.layer_norm",
               "mlm/bias": "lm_head.bias", "classifier_dense": "classifier.dense",
               "classifier": "classifier.out_proj"},
        tied="lm_head.decoder.weight", tied_bias="lm_head.decoder.bias", positions="roberta",
        mlm_act="gelu", classifier="dense_tanh"),
    "distilbert": Family(
        "distilbert", "DistilBert",
        heads={"mlm/dense": "vocab_transform", "mlm/LayerNorm": "vocab_layer_norm",
               "mlm/bias": "vocab_projector.bias", "classifier_dense": "pre_classifier",
               "classifier": "classifier"},
        tied="vocab_projector.weight", classifier="dense_relu", has_pooler=False,
        bare_roots=("embeddings", "transformer"),
        renames=((r"^distilbert\.encoder\.layer\.", "distilbert.transformer.layer."),
                 (r"\.attention\.self\.query\.", ".attention.q_lin."),
                 (r"\.attention\.self\.key\.", ".attention.k_lin."),
                 (r"\.attention\.self\.value\.", ".attention.v_lin."),
                 (r"\.attention\.output\.dense\.", ".attention.out_lin."),
                 (r"\.attention\.output\.LayerNorm\.", ".sa_layer_norm."),
                 (r"\.intermediate\.dense\.", ".ffn.lin1."),
                 (r"\.output\.dense\.", ".ffn.lin2."),
                 (r"\.output\.LayerNorm\.", ".output_layer_norm.")),
        config_keys={"dim": "hidden_size", "n_layers": "num_hidden_layers",
                     "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",
                     "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                     "attention_dropout": "attention_probs_dropout_prob",
                     "seq_classif_dropout": "classifier_dropout"},
        fixed={"layer_norm_eps": 1e-12, "type_vocab_size": 0}),
    "electra": Family(
        "electra", "Electra",
        heads={"mlm/dense": "generator_predictions.dense",
               "mlm/LayerNorm": "generator_predictions.LayerNorm",
               "mlm/bias": "generator_lm_head.bias",
               "discriminator": "discriminator_predictions",
               "classifier_dense": "classifier.dense", "classifier": "classifier.out_proj"},
        tied="generator_lm_head.weight", mlm_act="gelu", classifier="dense_gelu",
        has_pooler=False, bare_roots=("embeddings", "embeddings_project", "encoder")),
    # modernbert.py: pre-LN, rotary, GLU. HF's fused attn.Wqkv is three Flax kernels, named
    # attn.Wqkv.{query,key,value}.weight here; HF's `head` is the MLM head's transform or, in
    # a classifier checkpoint, the classifier's pooling head (`classifier.head` here).
    "modernbert": Family(
        "modernbert", "ModernBert",
        heads={"mlm/dense": "head.dense", "mlm/LayerNorm": "head.norm", "mlm/bias": "decoder.bias",
               "classifier_head/dense": "classifier.head.dense",
               "classifier_head/LayerNorm": "classifier.head.norm", "classifier": "classifier"},
        tied="decoder.weight", classifier="modernbert", has_pooler=False, prefix="model",
        gated_ffn=True,
        bare_roots=("embeddings", "layers", "final_norm"),
        renames=((r"^model\.encoder\.layer\.", "model.layers."),
                 (r"^model\.encoder\.final_norm\.", "model.final_norm."),
                 (r"\.embeddings\.word_embeddings\.", ".embeddings.tok_embeddings."),
                 (r"\.embeddings\.LayerNorm\.", ".embeddings.norm."),
                 (r"\.attention\.self\.(query|key|value)\.", r".attn.Wqkv.\1."),
                 (r"\.attention\.output\.dense\.", ".attn.Wo."),
                 (r"\.intermediate\.dense\.", ".mlp.Wi."),
                 (r"\.output\.dense\.", ".mlp.Wo.")),
        config_keys={"hidden_activation": "hidden_act", "norm_eps": "layer_norm_eps",
                     "embedding_dropout": "hidden_dropout_prob",
                     "attention_dropout": "attention_probs_dropout_prob"},
        fixed={"type_vocab_size": 0}),
    # DeBERTa-v2/v3: BERT's module names except the attention's (query_proj ...) and the
    # ContextPooler of its classifier; the relative-position tensors under the encoder.
    "deberta-v2": Family(
        "deberta-v2", "DebertaV2",
        heads={"mlm/dense": "cls.predictions.transform.dense",
               "mlm/LayerNorm": "cls.predictions.transform.LayerNorm",
               "mlm/bias": "cls.predictions.bias", "classifier_dense": "pooler.dense",
               "classifier": "classifier"},
        tied="cls.predictions.decoder.weight", tied_bias="cls.predictions.decoder.bias",
        classifier="context_pooler", has_pooler=False, bare_roots=("embeddings", "encoder"),
        renames=((r"\.attention\.self\.(query|key|value)\.", r".attention.self.\1_proj."),),
        config_keys={"cls_dropout": "classifier_dropout"}, prefix="deberta", embed_proj=True,
        head_aliases=(("lm_predictions.lm_head.dense.", "cls.predictions.transform.dense."),
                      ("lm_predictions.lm_head.LayerNorm.",
                       "cls.predictions.transform.LayerNorm."),
                      ("lm_predictions.lm_head.bias", "cls.predictions.bias")),
        ignored=r"^deberta\.embeddings\.position_embeddings\.weight$"),
}

# HF model_type -> family. XLM-R and CamemBERT are RoBERTa's tensors under their own names.
FAMILY_OF = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta",
             "camembert": "roberta", "distilbert": "distilbert", "electra": "electra",
             "modernbert": "modernbert", "deberta-v2": "deberta-v2"}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_OF)
CLASS_PREFIX = {**{f.name: f.class_prefix for f in FAMILIES.values()},
                "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}

# Parameter selections a config can name once for every family (recipe.regularize,
# recipe.trainable, train.lr_scales, attack.recipe_regularize ...): regexes over the Flax path,
# which is the same in every family. Any other entry is a regex over the HF name.
ALIASES = {
    "ffn_in": r"^encoder/layer_\d+/intermediate/dense/kernel$",  # RECIPE's FFN input matrices
    "ffn_out": r"^encoder/layer_\d+/output/dense/kernel$",
    "query": r"^encoder/layer_\d+/attention/self/query/kernel$",
    "mlm_head": r"^mlm/",  # transform, LayerNorm and output bias (the decoder is tied)
}


def family(model_type: str) -> Family:
    return FAMILIES[FAMILY_OF.get(model_type, model_type)]


def selected(path: tuple[str, ...], hf_name: str, patterns: Sequence[str]) -> bool:
    """Whether a parameter (its Flax `path` and HF name) is one `patterns` select: an alias
    (ALIASES) matched on the path, or a regex searched in the HF name."""
    flax = "/".join(path)
    return any(re.search(ALIASES[p], flax) if p in ALIASES else re.search(p, hf_name)
               for p in patterns)
