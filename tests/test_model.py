"""Model definition: parameter counts at full size (no allocation), configs, logical axes."""

import flax.linen as nn
import jax
import pytest
import torch
import transformers

from recipe_jax import families
from recipe_jax.model import ModelConfig, abstract_params, count_params

BERT_BASE_UNCASED = dict(  # bert-base-uncased's config.json (a BertForPreTraining checkpoint)
    model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
    type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, hidden_act="gelu")
ROBERTA_BASE = dict(  # roberta-base's config.json (a RobertaForMaskedLM checkpoint)
    model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
    type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    hidden_act="gelu")


XLM_ROBERTA_BASE = dict(ROBERTA_BASE, model_type="xlm-roberta", vocab_size=250002)
DISTILBERT_BASE = dict(  # distilbert-base-uncased's config.json (DistilBertForMaskedLM)
    model_type="distilbert", vocab_size=30522, dim=768, n_layers=6, n_heads=12,
    hidden_dim=3072, max_position_embeddings=512, activation="gelu", dropout=0.1,
    attention_dropout=0.1, seq_classif_dropout=0.2, pad_token_id=0, sinusoidal_pos_embds=False)
ELECTRA_BASE = dict(  # google/electra-base-discriminator's config.json (ElectraForPreTraining)
    model_type="electra", vocab_size=30522, embedding_size=768, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
MODERNBERT_BASE = dict(  # answerdotai/ModernBERT-base's sizes (a ModernBertForMaskedLM)
    model_type="modernbert", vocab_size=50368, hidden_size=768, num_hidden_layers=22,
    num_attention_heads=12, intermediate_size=1152, max_position_embeddings=8192,
    global_attn_every_n_layers=3, local_attention=128, global_rope_theta=160000.0,
    local_rope_theta=10000.0, hidden_activation="gelu", norm_eps=1e-5, norm_bias=False,
    pad_token_id=50283, classifier_pooling="mean")
ELECTRA_SMALL_GENERATOR = dict(  # google/electra-small-generator's (ElectraForMaskedLM)
    ELECTRA_BASE, embedding_size=128, hidden_size=256, num_attention_heads=4,
    intermediate_size=1024)
DEBERTA_V3_BASE = dict(  # microsoft/deberta-v3-base's config.json
    model_type="deberta-v2", vocab_size=128100, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=0,
    initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True,
    max_relative_positions=-1, pad_token_id=0, position_biased_input=False,
    pos_att_type=["p2c", "c2p"], position_buckets=256, norm_rel_ebd="layer_norm",
    share_att_key=True, pooler_hidden_size=768, pooler_dropout=0, pooler_hidden_act="gelu")


def _torch_count(cls_name, hf):
    family = families.CLASS_PREFIX[hf["model_type"]]
    config = getattr(transformers, f"{family}Config")(**hf)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = getattr(transformers, cls_name)(config)
    return sum(p.numel() for p in model.parameters())  # tied decoder counted once


@pytest.mark.parametrize("hf,cls_name,heads", [
    (BERT_BASE_UNCASED, "BertForPreTraining", dict(pooler=True, nsp_head=True)),
    (BERT_BASE_UNCASED, "BertForMaskedLM", dict()),
    (BERT_BASE_UNCASED, "BertModel", dict(mlm_head=False, pooler=True)),
    (BERT_BASE_UNCASED, "BertForSequenceClassification", dict(mlm_head=False, pooler=True,
                                                              num_labels=2)),
    (ROBERTA_BASE, "RobertaForMaskedLM", dict()),
    (ROBERTA_BASE, "RobertaForSequenceClassification", dict(mlm_head=False, num_labels=2)),
    (XLM_ROBERTA_BASE, "XLMRobertaForMaskedLM", dict()),
    (DISTILBERT_BASE, "DistilBertForMaskedLM", dict()),
    (DISTILBERT_BASE, "DistilBertModel", dict(mlm_head=False)),
    (DISTILBERT_BASE, "DistilBertForSequenceClassification", dict(mlm_head=False, num_labels=2)),
    (ELECTRA_BASE, "ElectraForPreTraining", dict(mlm_head=False, discriminator=True)),
    (ELECTRA_BASE, "ElectraForSequenceClassification", dict(mlm_head=False, num_labels=2)),
    (ELECTRA_SMALL_GENERATOR, "ElectraForMaskedLM", dict()),
    (ELECTRA_SMALL_GENERATOR, "ElectraModel", dict(mlm_head=False)),
    (MODERNBERT_BASE, "ModernBertForMaskedLM", dict()),
    (MODERNBERT_BASE, "ModernBertModel", dict(mlm_head=False)),
    (MODERNBERT_BASE, "ModernBertForSequenceClassification", dict(mlm_head=False, num_labels=2)),
    (DEBERTA_V3_BASE, "DebertaV2ForMaskedLM", dict()),
    (DEBERTA_V3_BASE, "DebertaV2Model", dict(mlm_head=False)),
    (DEBERTA_V3_BASE, "DebertaV2ForSequenceClassification", dict(mlm_head=False, num_labels=2)),
    (dict(DEBERTA_V3_BASE, share_att_key=False, position_biased_input=True, type_vocab_size=2,
          embedding_size=128), "DebertaV2ForMaskedLM", dict()),
])
def test_eval_shape_param_counts_match_transformers(hf, cls_name, heads):
    cfg = ModelConfig.from_hf_config(hf, **heads)
    abstract = abstract_params(cfg)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nn.unbox(abstract)))
    assert count_params(abstract) == _torch_count(cls_name, hf)


@pytest.mark.parametrize("hf,heads", [
    (BERT_BASE_UNCASED, dict(pooler=True, nsp_head=True, num_labels=2)),
    (DISTILBERT_BASE, dict(num_labels=2)),
    (dict(ELECTRA_BASE, embedding_size=128), dict(discriminator=True, num_labels=2)),
    (dict(DEBERTA_V3_BASE, share_att_key=False, embedding_size=128), dict(num_labels=2)),
])
def test_every_parameter_has_logical_axes(hf, heads):
    cfg = ModelConfig.from_hf_config(hf, **heads)
    boxed = jax.tree.leaves(abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    for box in boxed:
        assert len(box.names) == box.value.ndim
    kernels = {tuple(b.names) for b in boxed if b.value.shape == (768, 3072)}
    assert kernels == {("embed", "mlp")}


def test_modernbert_parameters_have_logical_axes_and_bert_paths():
    """The GLU's [H, 2F] input kernel, split q/k/v, bias-free norms: all logically named, on the
    paths the aliases and tools read."""
    cfg = ModelConfig.from_hf_config(MODERNBERT_BASE, num_labels=2)
    boxed = abstract_params(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    paths = {"/".join(k.key for k in path): box for path, box in leaves}
    assert all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim
               for b in paths.values())
    layer = "encoder/layer_1/"
    assert paths[layer + "intermediate/dense/kernel"].value.shape == (768, 2 * 1152)
    assert paths[layer + "intermediate/dense/kernel"].names == ("embed", "mlp")
    assert paths[layer + "output/dense/kernel"].names == ("mlp", "embed")
    assert paths[layer + "attention/self/query/kernel"].names == ("embed", "heads")
    assert layer + "attn_norm/scale" in paths and "encoder/layer_0/attn_norm/scale" not in paths
    biases = {p for p in paths if p.endswith("/bias")}
    assert biases == {"mlm/bias", "classifier/bias"}  # decoder_bias; HF's classifier has one
    assert {"encoder/final_norm/scale", "classifier_head/dense/kernel",
            "classifier/bias"} <= set(paths)


def test_modernbert_config_keys():
    """transformers 5's layer_types / rope_parameters read like the flat keys; variants not
    implemented are errors naming the key."""
    cfg = ModelConfig.from_hf_config(MODERNBERT_BASE)
    assert (cfg.global_attn_every_n_layers, cfg.local_attention, cfg.type_vocab_size) == (3, 128, 0)
    written = cfg.to_hf_config()
    assert written["layer_types"][:4] == ["full_attention", "sliding_attention",
                                          "sliding_attention", "full_attention"]
    v5 = {k: v for k, v in written.items() if not k.endswith(("rope_theta", "n_layers"))}
    assert ModelConfig.from_hf_config(v5) == cfg
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf_config({**written, "layer_types": ["sliding_attention"] * 22})
    with pytest.raises(ValueError, match="rope_parameters.*yarn"):
        ModelConfig.from_hf_config({**written, "rope_parameters": {
            "full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}})
    with pytest.raises(ValueError, match="classifier_pooling"):
        ModelConfig.from_hf_config({**MODERNBERT_BASE, "classifier_pooling": "max"})
    assert "norm_bias" not in ModelConfig.from_hf_config(BERT_BASE_UNCASED).to_hf_config()


@pytest.mark.parametrize("hf", [ROBERTA_BASE, DISTILBERT_BASE, ELECTRA_SMALL_GENERATOR,
                                MODERNBERT_BASE, DEBERTA_V3_BASE])
def test_config_round_trip(hf):
    """to_hf_config writes the family's own keys (DistilBERT: dim, n_layers, ...) and reads back
    to the same config, on its own and over the original file."""
    cfg = ModelConfig.from_hf_config(hf)
    written = cfg.to_hf_config()
    assert ModelConfig.from_hf_config({**hf, **written}) == cfg
    assert ModelConfig.from_hf_config(written) == cfg
    assert set(hf) - {"bos_token_id", "eos_token_id", "sinusoidal_pos_embds",
                      "pooler_hidden_size"} <= set(written)
    if hf["model_type"] == "distilbert":
        assert "hidden_size" not in written and written["dim"] == 768
        assert cfg.type_vocab_size == 0 and cfg.classifier_dropout == 0.2


def test_config_errors():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf_config({**BERT_BASE_UNCASED, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="relative_key"):
        ModelConfig.from_hf_config({**BERT_BASE_UNCASED, "position_embedding_type": "relative_key"})


def _loss_and_grads(cfg, params, ids, **options):
    import dataclasses

    import jax.numpy as jnp

    from recipe_jax.model import Transformer

    model = Transformer(dataclasses.replace(cfg, **options))

    def loss(p):
        logits = model.apply({"params": p}, ids, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(3)})
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, ids[..., None], -1)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
def test_remat_is_exact_and_bf16_is_close_with_float32_params():
    import numpy as np

    from recipe_jax.model import init_params

    cfg = ModelConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=32)
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, 101)
    ref_loss, ref_grads = _loss_and_grads(cfg, params, ids)
    loss, grads = _loss_and_grads(cfg, params, ids, remat=True)
    jaxpr = lambda **o: str(jax.make_jaxpr(lambda p: _loss_and_grads(cfg, p, ids, **o))(params))
    assert "remat" in jaxpr(remat=True) and "remat" not in jaxpr()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, ref_grads)
    loss, grads = _loss_and_grads(cfg, params, ids, dtype="bfloat16")
    assert abs(float(loss) - float(ref_loss)) < 0.02 * abs(float(ref_loss))
    assert {x.dtype for x in jax.tree.leaves(grads)} == {np.dtype("float32")}
    k = ("encoder", "layer_1", "intermediate", "dense", "kernel")
    g, ref = grads, ref_grads
    for key in k:
        g, ref = g[key], ref[key]
    cos = float(np.sum(g * ref) / (np.linalg.norm(g) * np.linalg.norm(ref)))
    assert cos > 0.95, cos
