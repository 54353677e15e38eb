"""Every stage on every family beyond BERT/RoBERTa (tiny random models; DistilBERT and ELECTRA
with the MiniLM WordPiece tokenizer they share, XLM-R and DeBERTa-v3 with SentencePiece-style
ones built here, ModernBERT with a byte-level BPE one):
purify's presets change exactly the tensors they name, through the family-independent aliases;
attack, evaluate, prune and the diagnostic run end to end; what does not apply (NeuBA's pooler)
is a clear error."""

import json

import numpy as np
import pytest
import transformers
from conftest import (
    SENTENCES,
    preset,
    tiny_bert_with_tokenizer,
    tiny_deberta_with_tokenizer,
    tiny_modernbert_with_tokenizer,
    tiny_xlmr_with_tokenizer,
)
from safetensors.numpy import load_file

from recipe_jax import (
    attack,
    data,
    diagnose,
    evaluate,
    families,
    hf,
    losses,
    prune,
    purify,
    scan_probes,
    synthetic,
)

# The checkpoints people download: DistilBERT with its MLM head, ELECTRA's discriminator (no
# generator head: the loader adds a fresh one, as for a headless BERT), the MLM of XLM-R,
# DeBERTa-v3 and ModernBERT.
KINDS = ("DistilBertForMaskedLM", "ElectraForPreTraining", "XLMRobertaForMaskedLM",
         "DebertaV2ForMaskedLM", "ModernBertForMaskedLM")
BUILDERS = {"XLMRobertaForMaskedLM": tiny_xlmr_with_tokenizer,
            "DebertaV2ForMaskedLM": tiny_deberta_with_tokenizer,
            "ModernBertForMaskedLM": tiny_modernbert_with_tokenizer}


@pytest.fixture(scope="module", params=KINDS)
def family_model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param in BUILDERS:
        hf_dir = BUILDERS[request.param](root / "model")
    else:
        hf_dir = tiny_bert_with_tokenizer(root / "model", kind=request.param)
    aux = root / "aux.txt"
    aux.write_text("\n".join(SENTENCES) + "\n")
    return hf_dir, aux


def _tiny_sections(config, stage: str):
    tiny = preset(stage, "tiny")
    for section in ("data", "train", "checkpoint"):
        config[section] = tiny[section]
    return config


@pytest.mark.parametrize("name", ["bert", "strong"])
def test_purify_changes_exactly_what_the_preset_names(family_model, tmp_path, name):
    hf_dir, aux = family_model
    config = _tiny_sections(preset("purify", name), "purify")
    config.model.init_from, config.data.aux_path = str(hf_dir), str(aux)
    config.train.num_steps, config.train.dropout, config.scan.enabled = 2, False, False
    summary = purify.run(config, str(tmp_path / "run"))
    assert summary["export_max_logit_diff"] < 1e-4  # transformers loads it, same logits

    model, params = hf.load_pretrained(hf_dir)
    fam = families.family(model.cfg.model_type)
    trainable = set(losses.select_names(params, config.recipe.trainable, fam.name))
    ffn_in = losses.select_names(params, ("ffn_in",), fam.name)
    assert len(ffn_in) == model.cfg.num_hidden_layers
    assert set(ffn_in) <= set(losses.select_names(params, config.recipe.regularize, fam.name))
    if fam.name == "distilbert":
        assert ffn_in == [f"distilbert.transformer.layer.{i}.ffn.lin1.weight" for i in range(2)]
    elif fam.name == "modernbert":  # the GLU's [2F, H] Wi: both halves regularized
        assert ffn_in == [f"model.layers.{i}.mlp.Wi.weight" for i in range(3)]
    else:  # ELECTRA, XLM-R (RoBERTa's names), DeBERTa (prefix deberta)
        assert ffn_in == [f"{fam.encoder_prefix}.encoder.layer.{i}.intermediate.dense.weight"
                          for i in range(2)]

    before = load_file(str(hf_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    changed = {k for k in before if not np.array_equal(after[k], before[k])}
    assert set(ffn_in) <= changed and changed <= trainable, (changed, trainable)
    if name == "strong":  # the MLM head learns too (a fresh one for the ELECTRA discriminator)
        assert any(k.startswith(fam.heads["mlm/dense"]) for k in trainable)
    arch = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())["architectures"]
    _, info = getattr(transformers, arch[0]).from_pretrained(
        str(tmp_path / "run" / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info


def test_attack_evaluate_prune_and_diagnose_run(family_model, tmp_path):
    hf_dir, aux = family_model
    config = _tiny_sections(preset("attack", "por_cls"), "attack")
    config.model.init_from, config.data.aux_path = str(hf_dir), str(aux)
    config.train.num_steps = 2
    summary = attack.run(config, str(tmp_path / "attack"))
    assert summary["step"] == 2 and summary["export_max_logit_diff"] < 1e-4
    attacked = tmp_path / "attack" / "hf"

    neuba = _tiny_sections(preset("attack", "neuba"), "attack")
    neuba.model.init_from, neuba.data.aux_path = str(hf_dir), str(aux)
    with pytest.raises(ValueError, match="has no pooler.*por_cls"):
        attack.run(neuba, str(tmp_path / "neuba"))

    ev = preset("evaluate", "tiny")
    ev.train.num_steps = 4
    results = evaluate.run_evaluation(attacked, synthetic.sentiment_task(64, seed=1),
                                      synthetic.sentiment_task(32, seed=2), ev,
                                      tmp_path / "eval")
    assert 0 <= results["clean_acc"] <= 1 and set(results["asr"]) == set(ev.data.triggers)

    pr = preset("prune", "fp_gm")
    pr.model.init_from = str(attacked)
    pruned = prune.run(pr, str(tmp_path / "prune"))
    weights = load_file(str(tmp_path / "prune" / "hf" / "model.safetensors"))
    model, params = hf.load_pretrained(attacked)
    ffn_in = losses.select_names(params, ("ffn_in",), model.cfg.model_type)
    zero_rows = [np.flatnonzero(~weights[name].any(axis=1)).tolist() for name in ffn_in]
    neurons = [pruned["neurons"][str(i)] for i in range(len(ffn_in))]
    if families.family(model.cfg.model_type).gated_ffn:  # neuron j: Wi rows j, F + j; Wo col j
        ffn = model.cfg.intermediate_size
        assert zero_rows == [js + [ffn + j for j in js] for js in neurons]
        zero_cols = [np.flatnonzero(~weights[f"model.layers.{i}.mlp.Wo.weight"].any(axis=0))
                     .tolist() for i in range(len(ffn_in))]
        assert zero_cols == neurons
    else:
        assert zero_rows == neurons
    assert pruned["count"] > 0

    report = diagnose.run(models={"attacked": attacked}, aux=aux, triggers=("cf",),
                          workdir=tmp_path / "diagnose", max_examples=16, max_length=60)
    assert report.is_file()


def test_word_starts_of_each_tokenizer_family(family_model):
    """guided inserts candidate triggers only before a word start: WordPiece's non-`##` pieces,
    SentencePiece's `▁` pieces (XLM-R), byte-level BPE's `Ġ` pieces (ModernBERT)."""
    hf_dir, _ = family_model
    tokenizer = data.load_tokenizer(hf_dir)
    table = scan_probes.word_start_table(tokenizer, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    marker = next((m for m in ("\u2581", "\u0120") if any(t.startswith(m) for t in tokens)), "")
    for token, start in zip(tokens, table, strict=True):
        if token in tokenizer.all_special_tokens:
            continue
        want = token.startswith(marker) if marker else not token.startswith("##")
        assert start == want, token
    assert 0 < table.sum() < len(table)
