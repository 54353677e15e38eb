"""Checkpoints people download that are not today's layout: a config.json without model_type,
and task heads next to the MLM head (refused by default, dropped with the opt-in)."""

import json
import logging

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_bert_with_tokenizer, tiny_hf, tiny_purify_config
from safetensors.numpy import load_file, save_file

from recipe_jax import convert, hf, purify

EXTRA = ("cls.species", "cls.chain", "cls.graft")


def _mlm_logits(model_dir, ids):
    model, params = hf.load_pretrained(model_dir)
    return np.asarray(model.apply({"params": params}, ids, np.ones_like(ids)))


def _strip_model_type(model_dir, *, architectures: bool):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.pop("model_type")
    if not architectures:
        config.pop("architectures", None)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("architectures", [True, False])
def test_config_without_model_type_is_recognized_and_logged(tmp_path, caplog, architectures):
    """A transformers-2.x-style BertForPreTraining checkpoint (legacy .bin, no model_type): the
    family comes from `architectures`, else from the weight names; the logits are those
    transformers computes from the same files."""
    d = tmp_path / "legacy"
    tiny_hf("BertForPreTraining", d, safe=False)
    _strip_model_type(d, architectures=architectures)
    with caplog.at_level(logging.WARNING, logger="recipe_jax.hf"):
        model, params = hf.load_pretrained(d)
    assert model.cfg.model_type == "bert" and model.cfg.nsp_head and model.cfg.pooler
    why = "architectures='BertForPreTraining'" if architectures else "weight names"
    assert "no model_type" in caplog.text and why in caplog.text
    ids = np.array([[2, 17, 33, 41, 3, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    ref = transformers.BertForPreTraining.from_pretrained(str(d)).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids).long(),
                     attention_mask=torch.tensor(mask).long()).prediction_logits.numpy()
    assert np.max(np.abs(ours - theirs)[0][mask[0] > 0]) <= 1e-4


def test_bare_roberta_encoder_without_model_type(tmp_path):
    d = tmp_path / "bare"
    tiny_hf("RobertaModel", d)
    _strip_model_type(d, architectures=False)
    model, _ = hf.load_pretrained(d)
    assert model.cfg.model_type == "roberta"


@pytest.mark.parametrize("kind,family", [("DistilBertForMaskedLM", "distilbert"),
                                         ("DistilBertModel", "distilbert"),
                                         ("ElectraForPreTraining", "electra"),
                                         ("ElectraModel", "electra"),
                                         ("DebertaV2ForMaskedLM", "deberta-v2"),
                                         ("DebertaV2Model", "deberta-v2")])
def test_other_families_without_model_type_are_recognized_by_weight_names(tmp_path, kind,
                                                                          family):
    d = tmp_path / "legacy"
    tiny_hf(kind, d)
    _strip_model_type(d, architectures=False)
    config = json.loads((d / "config.json").read_text())
    if family == "distilbert":  # its own keys must survive the guess
        assert "dim" in config and "hidden_size" not in config
    model, _ = hf.load_pretrained(d)
    assert model.cfg.model_type == family and model.cfg.hidden_size == 32


def test_unrecognizable_config_names_the_fix(tmp_path):
    d = tmp_path / "odd"
    tiny_hf("BertModel", d)
    _strip_model_type(d, architectures=False)
    state = load_file(str(d / "model.safetensors"))
    save_file({f"body.{k}": v for k, v in state.items()}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match='no model_type.*add "model_type": "bert"'):
        hf.read_config(d)


# ---------------------------------------------------------------------------------- extra heads

@pytest.fixture
def with_heads(tmp_path):
    """(a tiny BERT MLM with three extra task heads, the same without them)."""
    plain = tiny_bert_with_tokenizer(tmp_path / "plain")
    extra = tmp_path / "extra"
    extra.mkdir()
    for f in plain.iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    state = load_file(str(plain / "model.safetensors"))
    rng = np.random.default_rng(0)
    for i, head in enumerate(EXTRA):
        state[f"{head}.weight"] = rng.normal(size=(3 + i, 32)).astype(np.float32)
        state[f"{head}.bias"] = np.zeros(3 + i, np.float32)
    save_file(state, str(extra / "model.safetensors"), metadata={"format": "pt"})
    return extra, plain


def test_extra_heads_are_refused_by_default_naming_them_and_the_option(with_heads):
    extra, _ = with_heads
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(extra)
    assert all(f"{h}.weight" in str(e.value) for h in EXTRA)
    assert "--drop-extra-heads" in str(e.value) and "model.drop_extra_heads=True" in str(e.value)


def test_drop_extra_heads_drops_exactly_them(with_heads, caplog):
    extra, plain = with_heads
    with caplog.at_level(logging.WARNING, logger="recipe_jax.hf"):
        model, params, info = hf.load_pretrained(extra, drop_extra_heads=True, with_info=True)
    assert sorted(info["dropped"]) == sorted(f"{h}.{p}" for h in EXTRA for p in ("bias", "weight"))
    assert all(h in caplog.text for h in EXTRA)
    ids = np.array([[101, 2023, 2003, 102]], np.int32)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, ids)),
                                  _mlm_logits(plain, ids))


def test_drop_extra_heads_never_drops_unknown_encoder_tensors(with_heads):
    extra, _ = with_heads
    state = load_file(str(extra / "model.safetensors"))
    state["bert.encoder.layer.0.adapter.weight"] = np.zeros((4, 4), np.float32)
    save_file(state, str(extra / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="inside the encoder.*adapter"):
        hf.load_pretrained(extra, drop_extra_heads=True)


def test_convert_and_purify_with_the_opt_in(with_heads, aux_file, tmp_path):
    extra, _ = with_heads
    assert convert.main(["--hf", str(extra), "--out", str(tmp_path / "refused")]) != 0
    assert convert.main(["--hf", str(extra), "--out", str(tmp_path / "conv"),
                         "--drop-extra-heads"]) == 0
    config = tiny_purify_config(extra, aux_file, model__drop_extra_heads=True)
    purify.run(config, str(tmp_path / "purify"))
    exported = load_file(str(tmp_path / "purify" / "hf" / "model.safetensors"))
    assert not any(k.startswith(EXTRA) for k in exported)
    _, loading = transformers.BertForMaskedLM.from_pretrained(
        str(tmp_path / "purify" / "hf"), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
