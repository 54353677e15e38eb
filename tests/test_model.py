"""Model definition: parameter counts at full size (no allocation), configs, logical axes."""

import flax.linen as nn
import jax
import pytest
import torch
import transformers

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


def _torch_count(cls_name, hf):
    family = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[hf["model_type"]]
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
])
def test_eval_shape_param_counts_match_transformers(hf, cls_name, heads):
    cfg = ModelConfig.from_hf_config(hf, **heads)
    abstract = abstract_params(cfg)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nn.unbox(abstract)))
    assert count_params(abstract) == _torch_count(cls_name, hf)


def test_every_parameter_has_logical_axes():
    cfg = ModelConfig.from_hf_config(BERT_BASE_UNCASED, pooler=True, nsp_head=True, num_labels=2)
    boxed = jax.tree.leaves(abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    for box in boxed:
        assert len(box.names) == box.value.ndim
    kernels = {tuple(b.names) for b in boxed if b.value.shape == (768, 3072)}
    assert kernels == {("embed", "mlp")}


def test_config_round_trip_and_errors():
    cfg = ModelConfig.from_hf_config(ROBERTA_BASE)
    again = ModelConfig.from_hf_config({**ROBERTA_BASE, **cfg.to_hf_config()})
    assert again == cfg
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
