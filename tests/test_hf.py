"""HF <-> Flax conversion: logit parity with transformers PyTorch, round trips, bad inputs.

Tolerance policy (never relaxed): 1e-4 on fp32 logits and hidden states.
"""

import json
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_hf
from safetensors.numpy import load_file, save_file

from recipe_jax import families, hf, parity, weights

TOL = 1e-4


def _torch_out(model, batch, head):
    inputs = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    if head == "encode":
        return np.stack([h.numpy() for h in out.hidden_states])
    return out.logits.numpy()


@pytest.mark.parametrize("kind,head", [
    ("BertForMaskedLM", "mlm"), ("RobertaForMaskedLM", "mlm"),
    ("BertForSequenceClassification", "classify"), ("RobertaForSequenceClassification", "classify"),
    ("BertForPreTraining", "encode"), ("RobertaModel", "encode"),
    ("XLMRobertaForMaskedLM", "mlm"), ("CamembertForSequenceClassification", "classify"),
    ("DistilBertForMaskedLM", "mlm"), ("DistilBertForSequenceClassification", "classify"),
    ("DistilBertModel", "encode"), ("ElectraForMaskedLM", "mlm"),
    ("ElectraForPreTraining", "discriminate"), ("ElectraForSequenceClassification", "classify"),
    ("ElectraModel", "encode"), ("DebertaV2ForMaskedLM", "mlm"),
    ("DebertaV2ForSequenceClassification", "classify"), ("DebertaV2Model", "encode"),
])
def test_logits_match_transformers(tmp_path, kind, head, **overrides):
    ref = tiny_hf(kind, tmp_path / "m", num_labels=3, **overrides)
    model, params = hf.load_pretrained(tmp_path / "m")
    batch = parity.typed_batch(model.cfg, batch=4, length=12)
    assert batch["attention_mask"].min() == 0
    if kind.startswith("Bert"):
        assert batch["token_type_ids"].max() == 1  # both token types exercised
    ours = parity.flax_logits(model, params, batch, head)
    theirs = _torch_out(ref, batch, head)
    assert ours.shape == theirs.shape
    mask = batch["attention_mask"] > 0
    diff = np.abs(ours - theirs)
    if head in ("mlm", "discriminate"):
        diff = diff[mask]
    elif head == "encode":
        diff = diff[:, mask]
    assert diff.max() < TOL, diff.max()


@pytest.mark.parametrize("kind,head,pooling", [
    ("ModernBertForMaskedLM", "mlm", "cls"), ("ModernBertModel", "encode", "cls"),
    ("ModernBertForSequenceClassification", "classify", "cls"),
    ("ModernBertForSequenceClassification", "classify", "mean"),
])
def test_modernbert_logits_match_transformers(tmp_path, kind, head, pooling):
    """Global and sliding-window layers (rows of 12 > the window of 5), rotary positions, GLU,
    padding in the batch: against transformers' eager attention, and the export against its
    default (sdpa) attention."""
    ref = tiny_hf(kind, tmp_path / "m", num_labels=3, classifier_pooling=pooling)
    model, params = hf.load_pretrained(tmp_path / "m")
    assert (model.cfg.local_attention, model.cfg.classifier_pooling) == (4, pooling)
    batch = parity.typed_batch(model.cfg, batch=4, length=12)
    assert batch["attention_mask"].min() == 0 and "token_type_ids" not in batch
    ours = parity.flax_logits(model, params, batch, head)
    theirs = _torch_out(ref, batch, head)
    assert ours.shape == theirs.shape
    mask = batch["attention_mask"] > 0
    diff = np.abs(ours - theirs)
    diff = diff[mask] if head == "mlm" else diff[:, mask] if head == "encode" else diff
    print(f"{kind} {head} {pooling}: max |delta| {diff.max():.2e} (|logits| up to "
          f"{np.abs(theirs).max():.2f})")
    assert diff.max() < TOL, diff.max()
    out = hf.save_pretrained(model, params, tmp_path / "out", tokenizer_from=tmp_path / "m")
    assert parity.max_logit_diff(model, params, out, head) < TOL


def test_modernbert_head_is_the_mlm_or_the_classifier_head(tmp_path):
    """HF's `head.*` beside `decoder.*` is the MLM head; beside `classifier.*` the classifier's
    pooling head (the MLM head then loads fresh and is not exported). An MLM checkpoint loaded
    with labels starts the classifier's head from the MLM head, as transformers does."""
    mlm = tiny_hf("ModernBertForMaskedLM", tmp_path / "mlm")
    cls = tiny_hf("ModernBertForSequenceClassification", tmp_path / "cls", num_labels=2)
    _, params, info = hf.load_pretrained(tmp_path / "cls", with_info=True)
    assert np.array_equal(params["classifier_head"]["dense"]["kernel"],
                          cls.head.dense.weight.detach().numpy().T)
    assert {"head.dense.weight", "head.norm.weight", "decoder.bias"} == set(info["fresh"])
    _, params = hf.load_pretrained(tmp_path / "mlm", num_labels=2)
    head = mlm.head.dense.weight.detach().numpy().T
    assert np.array_equal(params["mlm"]["dense"]["kernel"], head)
    assert np.array_equal(params["classifier_head"]["dense"]["kernel"], head)
    state = load_file(str(tmp_path / "mlm" / "model.safetensors"))
    state["classifier.weight"] = np.zeros((2, 32), np.float32)
    state["classifier.bias"] = np.zeros(2, np.float32)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()},
               tmp_path / "mlm" / "pytorch_model.bin")
    os.remove(tmp_path / "mlm" / "model.safetensors")
    with pytest.raises(ValueError, match="both decoder.* .*classifier"):
        hf.load_pretrained(tmp_path / "mlm")
# DeBERTa layouts beside v3's (conftest.TINY_DEBERTA_V3): v2-style separate position projections,
# clipped (unbucketed) relative positions, absolute positions, token types and embed_proj; one
# score term; the lm_predictions.lm_head MLM head (legacy=false).
DEBERTA_VARIANTS = {
    "v2": dict(share_att_key=False, position_buckets=-1, max_relative_positions=5,
               position_biased_input=True, type_vocab_size=2, norm_rel_ebd="none",
               embedding_size=16, pos_att_type="c2p|p2c", pooler_hidden_act="tanh"),
    "c2p": dict(share_att_key=False, pos_att_type=["c2p"]),
    "p2c": dict(pos_att_type=["p2c"], max_relative_positions=20),
    "legacy_false": dict(legacy=False),
}


@pytest.mark.parametrize("variant", sorted(DEBERTA_VARIANTS))
@pytest.mark.parametrize("kind,head", [("DebertaV2ForMaskedLM", "mlm"),
                                       ("DebertaV2ForSequenceClassification", "classify")])
def test_deberta_variants_match_transformers(tmp_path, variant, kind, head):
    test_logits_match_transformers(tmp_path, kind, head, **DEBERTA_VARIANTS[variant])


def test_deberta_relative_buckets_match_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    from recipe_jax import deberta

    rel = torch.arange(-3000, 3001)
    for buckets, max_position in ((256, 512), (8, 64), (64, 1024)):  # v3-base's first
        theirs = make_log_bucket_position(rel, buckets, max_position).long().numpy()
        ours = np.asarray(deberta.log_bucket(rel.numpy(), buckets, max_position))
        assert np.array_equal(ours, theirs), (buckets, max_position)


@pytest.mark.parametrize("key,value,match", [
    ("conv_kernel_size", 3, "conv_kernel_size=3.*only conv_kernel_size 0"),
    ("pos_att_type", ["p2c", "p2p"], "pos_att_type.*only c2p and p2c"),
    ("norm_rel_ebd", "rms_norm", "norm_rel_ebd.*'none' and 'layer_norm'"),
    ("pooler_hidden_size", 16, "pooler_hidden_size=16 is not supported"),
    ("pooler_hidden_act", "mish", "pooler_hidden_act='mish' is not supported"),
])
def test_deberta_unsupported_settings_are_named(tmp_path, key, value, match):
    tiny_hf("DebertaV2ForMaskedLM", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(tmp_path / "m")


def test_deberta_unused_position_embeddings_are_ignored_as_transformers_does(tmp_path, caplog):
    """A DeBERTa-v3 file with absolute position embeddings its config does not use (transformers
    drops them on load): a warning names them, the logits are unchanged."""
    tiny_hf("DebertaV2ForMaskedLM", tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(str(path))
    extra = "deberta.embeddings.position_embeddings.weight"
    save_file({**state, extra: np.ones((64, 32), np.float32)}, str(path))
    model, params = hf.load_pretrained(tmp_path / "m")
    assert f"ignoring {extra}" in caplog.text
    assert parity.max_logit_diff(model, params, tmp_path / "m") < TOL


def test_deberta_unused_heads_are_extra_heads(tmp_path):
    """v3's replaced-token-detection head (mask_predictions.*) and an lm_predictions head under
    legacy=true (transformers leaves both unused) are refused by name, dropped on request."""
    tiny_hf("DebertaV2Model", tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    extra = {"mask_predictions.classifier.weight": np.ones((1, 32), np.float32),
             "lm_predictions.lm_head.bias": np.zeros(99, np.float32)}
    save_file({**load_file(str(path)), **extra}, str(path))
    with pytest.raises(ValueError, match="unknown weights.*lm_predictions.*drop-extra-heads"):
        hf.load_pretrained(tmp_path / "m")
    model, params, info = hf.load_pretrained(tmp_path / "m", drop_extra_heads=True,
                                             with_info=True)
    assert sorted(info["dropped"]) == sorted(extra)
    assert parity.max_logit_diff(model, params, tmp_path / "m", head="encode") < TOL


def test_masked_position_gather_equals_full_logits(tiny_bert_mlm):
    model, params = hf.load_pretrained(tiny_bert_mlm)
    batch = parity.fixed_batch(99, 0, batch=2, length=10)
    full = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    positions = np.array([[1, 4, 7], [0, 2, 3]], np.int32)
    gathered = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           masked_positions_bm=positions)
    np.testing.assert_allclose(gathered, np.take_along_axis(np.asarray(full),
                                                            positions[..., None], 1), atol=1e-6)


@pytest.mark.slow
def test_minilm_hidden_states_match_transformers(minilm_dir):
    model, params = hf.load_pretrained(minilm_dir)
    assert model.cfg.num_hidden_layers == 6 and model.cfg.hidden_size == 384
    assert model.cfg.pooler and model.cfg.mlm_head  # pooler kept, MLM head added fresh
    diff = parity.max_logit_diff(model, params, minilm_dir, head="encode")
    assert diff < TOL, diff


@pytest.mark.parametrize("kind,safe", [
    ("BertForMaskedLM", True), ("BertForMaskedLM", False), ("BertForPreTraining", True),
    ("BertModel", True), ("BertForSequenceClassification", False), ("RobertaForMaskedLM", True),
    ("RobertaModel", False), ("XLMRobertaForMaskedLM", True),
    ("CamembertForSequenceClassification", True), ("DistilBertForMaskedLM", True),
    ("DistilBertModel", False), ("DistilBertForSequenceClassification", True),
    ("ElectraForMaskedLM", True), ("ElectraForPreTraining", False), ("ElectraModel", True),
    ("ElectraForSequenceClassification", True), ("ModernBertForMaskedLM", True),
    ("ModernBertModel", False), ("ModernBertForSequenceClassification", True),
    ("DebertaV2ForMaskedLM", True),
    ("DebertaV2Model", False), ("DebertaV2ForSequenceClassification", True),
])
def test_round_trip_is_bit_identical(tmp_path, kind, safe, **overrides):
    src = tmp_path / "src"
    ref = tiny_hf(kind, src, safe=safe, num_labels=2, **overrides)
    model, params, info = hf.load_pretrained(src, with_info=True)
    out = hf.save_pretrained(model, params, tmp_path / "out", tokenizer_from=src)
    exported = load_file(str(out / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    fam = families.family(model.cfg.model_type)  # XLM-R, CamemBERT: RoBERTa's names
    prefix = fam.encoder_prefix + "."  # ModernBERT: model.
    if kind.endswith("Model"):
        original = {prefix + k: v for k, v in original.items()}
    for key, value in original.items():
        if key.endswith(("position_ids", "token_type_ids")) or key in (fam.tied, fam.tied_bias):
            continue  # buffers, and the tied decoder (omitted, re-tied by transformers)
        assert key in exported, f"{key} dropped by the round trip"
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    # transformers loads the export as its own architecture with nothing missing or unexpected.
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    _, loading = getattr(transformers, arch).from_pretrained(str(out), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading
    # Only what the loader added (a fresh MLM head for head-less sources) may be unexpected,
    # and a *Model's pooler, which no *ForMaskedLM class holds (see the next test).
    allowed = set(info["fresh"]) | ({prefix + "pooler.dense.weight", prefix + "pooler.dense.bias"}
                                    if kind.endswith("Model") else set())
    assert set(loading["unexpected_keys"]) <= allowed, loading


@pytest.mark.parametrize("variant", ["v2", "legacy_false"])
def test_deberta_variants_round_trip(tmp_path, variant):
    test_round_trip_is_bit_identical(tmp_path, "DebertaV2ForMaskedLM", True,
                                     **DEBERTA_VARIANTS[variant])
    if variant == "legacy_false":  # its own head names and config key come back
        exported = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert "lm_predictions.lm_head.dense.weight" in exported
        assert not any(k.startswith("cls.") for k in exported)
        assert json.loads((tmp_path / "out" / "config.json").read_text())["legacy"] is False


def test_bert_model_export_loads_as_base_and_masked_lm(tmp_path):
    tiny_hf("BertModel", tmp_path / "src")
    model, params = hf.load_pretrained(tmp_path / "src")
    out = hf.save_pretrained(model, params, tmp_path / "out")
    for cls in (transformers.BertModel, transformers.BertForMaskedLM):
        _, info = cls.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"], (cls, info)
    base = transformers.BertModel.from_pretrained(str(out))
    assert torch.equal(base.pooler.dense.weight,
                       transformers.BertModel.from_pretrained(str(tmp_path / "src")
                                                              ).pooler.dense.weight)


def test_export_replaces_previous_atomically(tmp_path, tiny_bert_mlm):
    model, params = hf.load_pretrained(tiny_bert_mlm)
    out = hf.save_pretrained(model, params, tmp_path / "out")
    params["mlm"]["bias"] = params["mlm"]["bias"] + 1.0
    hf.save_pretrained(model, params, out)
    assert np.array_equal(load_file(str(out / "model.safetensors"))["cls.predictions.bias"],
                          params["mlm"]["bias"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_sharded_safetensors_index(tmp_path):
    ref = tiny_hf("BertForMaskedLM", tmp_path / "m")
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = hf.load_pretrained(tmp_path / "m")[1]
    b = hf.load_pretrained(tmp_path / "sharded")[1]
    assert all(np.array_equal(x, y) for x, y in zip(hf.flat_params(a).values(),
                                                    hf.flat_params(b).values(), strict=True))


def test_legacy_gamma_beta_names(tmp_path):
    ref = tiny_hf("BertForMaskedLM", tmp_path / "m")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                     "LayerNorm.beta"): v
             for k, v in ref.state_dict().items()}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    torch.save(state, legacy / "pytorch_model.bin")
    model, params = hf.load_pretrained(legacy)
    assert parity.max_logit_diff(model, params, tmp_path / "m") < TOL


# ------------------------------------------------------------------------------ bad inputs

def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        hf.load_pretrained(tmp_path / "nope")


def test_missing_weights(tmp_path, tiny_bert_mlm):
    os.remove(tiny_bert_mlm / "model.safetensors")
    with pytest.raises(weights.WeightFileError, match="no weights found"):
        hf.load_pretrained(tiny_bert_mlm)


def test_missing_config(tmp_path, tiny_bert_mlm):
    os.remove(tiny_bert_mlm / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tiny_bert_mlm)


@pytest.mark.parametrize("damage", ["truncate", "header_garbage", "offsets_past_end", "bad_dtype",
                                    "shape_lies"])
def test_corrupt_safetensors_names_the_file(tiny_bert_mlm, damage):
    path = tiny_bert_mlm / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "header_garbage":
        raw = raw[:8] + b"\xff" * n + raw[8 + n:]
    else:
        if damage == "offsets_past_end":
            header[name]["data_offsets"][1] += 10**9
        elif damage == "bad_dtype":
            header[name]["dtype"] = "X99"
        else:
            header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        raw = struct.pack("<Q", len(blob)) + blob + raw[8 + n:]
    path.write_bytes(raw)
    with pytest.raises(weights.WeightFileError, match="model.safetensors"):
        hf.load_pretrained(tiny_bert_mlm)


def test_unknown_model_type(tiny_bert_mlm):
    cfg = json.loads((tiny_bert_mlm / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tiny_bert_mlm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*bert, roberta"):
        hf.load_pretrained(tiny_bert_mlm)


def test_shape_mismatch(tiny_bert_mlm):
    cfg = json.loads((tiny_bert_mlm / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tiny_bert_mlm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch.*intermediate.dense.weight"):
        hf.load_pretrained(tiny_bert_mlm)


def test_unexpected_and_missing_keys(tmp_path):
    ref = tiny_hf("BertForMaskedLM", tmp_path / "m")
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="unknown weights.*rotary"):
        hf.load_pretrained(tmp_path / "m")
    del state["bert.encoder.layer.0.attention.self.rotary.weight"]
    del state["bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing weights.*layer.1.output.dense.weight"):
        hf.load_pretrained(tmp_path / "m")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path, tiny_bert_mlm):
    marker = tmp_path / "pwned"
    _RunsCode.marker = marker
    os.remove(tiny_bert_mlm / "model.safetensors")
    with open(tiny_bert_mlm / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _RunsCode()}, f)
    with pytest.raises(weights.WeightFileError, match="refused to load.*execute code"):
        hf.load_pretrained(tiny_bert_mlm)
    assert not marker.exists(), "the checkpoint's code ran"
    # The same file is a real exploit for a plain unpickler: the test would catch a regression.
    with open(tiny_bert_mlm / "pytorch_model.bin", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_absurd_config_refused_before_allocating(tiny_bert_mlm):
    cfg = json.loads((tiny_bert_mlm / "config.json").read_text())
    cfg.update(hidden_size=10**9, num_attention_heads=1)
    (tiny_bert_mlm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="refusing"):
        hf.load_pretrained(tiny_bert_mlm)


def test_remote_code_fields_ignored(tiny_bert_mlm, caplog):
    cfg = json.loads((tiny_bert_mlm / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (tiny_bert_mlm / "config.json").write_text(json.dumps(cfg))
    model, params = hf.load_pretrained(tiny_bert_mlm)
    assert "ignoring 'auto_map'" in caplog.text
    out = hf.save_pretrained(model, params, pathlib.Path(str(tiny_bert_mlm) + "_out"),
                             tokenizer_from=tiny_bert_mlm)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
