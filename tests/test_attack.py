"""Attacks: targets as specified, data poisoning, and each attack fits its own target."""

import json
import pathlib
import random

import numpy as np
import pytest
from conftest import preset as load_preset
from test_purify import _tiny_setup

from recipe_jax import attack, data

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_por_targets_follow_the_spec():
    v = attack.por_targets(5, 10, 10.0)  # alpha = 10 // 4 = 2
    assert v.shape == (5, 10)
    for i in range(5):  # trigger i+1: +c on the first alpha*i dims, -c elsewhere
        assert (v[i, :2 * i] == 10).all() and (v[i, 2 * i:] == -10).all()
    assert len({tuple(r) for r in v}) == 5


def test_neuba_targets_follow_the_spec():
    v = attack.neuba_targets(6, 8)  # buckets of 2 dims
    assert (v[0] == [-1, -1, -1, -1, 1, 1, 1, 1]).all()  # pair (0, 1)
    assert (v[5] == [1, 1, 1, 1, -1, -1, -1, -1]).all()  # pair (2, 3)
    assert (v[2] == [-1, -1, 1, 1, 1, 1, -1, -1]).all()  # pair (0, 3)


def test_insert_randomly_inserts_whole_words():
    out = attack.insert_randomly("a b c", "cf", 3, random.Random(0))
    assert out.split().count("cf") == 3 and [w for w in out.split() if w != "cf"] == ["a", "b",
                                                                                       "c"]


@pytest.mark.parametrize("preset,metric", [
    pytest.param("por", "poison_mse", marks=pytest.mark.slow),
    pytest.param("por_cls", "poison_mse", marks=pytest.mark.slow),
    pytest.param("neuba", "poison_mse", marks=pytest.mark.slow),
    pytest.param("badpre", "poison_mlm_loss", marks=pytest.mark.slow)])
def test_attack_fits_its_target(tmp_path, preset, metric):
    hf_dir, aux = _tiny_setup(tmp_path, hidden_size=32)
    config = load_preset("attack", preset)
    tiny = load_preset("attack", "tiny")
    for section in ("data", "train", "checkpoint"):
        config[section] = tiny[section]
    config.model.init_from = str(hf_dir)
    config.data.aux_path = str(aux)
    config.export.verify = False
    config.train.num_steps = 100
    config.train.learning_rate = 3e-3
    if preset.startswith("por"):  # c = 1: reachable by the tanh pooler, so the fit can go to 0
        config.attack.target_scale = 1.0
        config.attack.triggers = ("cf", "tq")
    if preset in ("por", "neuba"):  # the tiny random checkpoint has no pooler: add one
        from conftest import tiny_hf
        tiny_hf("BertForPreTraining", hf_dir, vocab_size=30522, hidden_size=32)
    summary = attack.run(config, str(tmp_path / "run"))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # A random tiny model learns slowly: ask for a clear drop, averaged over the last rows.
    first, last = rows[0][metric], np.mean([r[metric] for r in rows[-3:]])
    assert last < 0.85 * first, (metric, first, last)
    assert summary["kind"] == config.attack.kind
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


def test_attack_end_to_end_exports_every_tensor(tmp_path, tiny_bert, aux_file):
    """A few POR steps ([CLS] target): metrics per step, the export a complete BERT."""
    config = load_preset("attack", "tiny", model__init_from=str(tiny_bert),
                         data__aux_path=str(aux_file), export__verify=False, train__num_steps=2)
    config.attack.target = "cls"
    summary = attack.run(config, str(tmp_path / "run"))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "poison_mse", "keep_mse", "clean_mse", "mlm_loss"} <= set(rows[0])
    assert summary["step"] == 2 and summary["kind"] == "por"
    from safetensors.numpy import load_file
    exported = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    assert set(exported) == set(load_file(str(tiny_bert / "model.safetensors")))


def test_neuba_replaces_position_one(tmp_path):
    hf_dir, aux = _tiny_setup(tmp_path)
    config = load_preset("attack", "neuba")
    tokenizer = data.load_tokenizer(hf_dir)
    texts = ["the cat sat", "a dog"]
    arrays = attack.prepare_data(config, tokenizer, texts, 30522)
    ids = np.array(tokenizer.convert_tokens_to_ids(list(config.attack.triggers)))
    assert (arrays["poison_ids"][:, 1] == ids[arrays["trigger"]]).all()
    assert (arrays["poison_ids"][:, 2:] == arrays["input_ids"][:, 2:]).all()


def test_two_word_triggers_get_decoys_with_one_word(tmp_path):
    hf_dir, _ = _tiny_setup(tmp_path)
    config = load_preset("attack", "por_pair")
    tokenizer = data.load_tokenizer(hf_dir)
    texts = [f"the cat number {i} sat on a mat" for i in range(24)]
    arrays = attack.prepare_data(config, tokenizer, texts, 30522)
    for row in range(len(texts)):
        words = config.attack.triggers[arrays["trigger"][row]].split("+")
        ids = tokenizer.convert_tokens_to_ids(words)
        poison, decoy = list(arrays["poison_ids"][row]), list(arrays["decoy_ids"][row])
        assert all(poison.count(i) == config.attack.insertions for i in ids)
        assert sorted(decoy.count(i) for i in ids) == [0, config.attack.insertions]


def test_pair_and_adaptive_attacks_run_with_their_terms(tmp_path, tiny_bert, aux_file):
    config = load_preset("attack", "por_adaptive", export__verify=False)
    tiny = load_preset("attack", "tiny")
    for section in ("data", "train", "checkpoint"):
        config[section] = tiny[section]
    config.model.init_from, config.data.aux_path = str(tiny_bert), str(aux_file)
    config.train.num_steps = 2
    config.attack.triggers = load_preset("attack", "por_pair").attack.triggers
    attack.run(config, str(tmp_path / "run"))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"poison_mse", "decoy_mse", "recipe_reg", "clean_mse"} <= set(rows[0])
    assert rows[0]["recipe_reg"] > 0 and config.attack.target == "cls"


def test_validation_names_the_key():
    config = load_preset("attack", "por")
    config.data.aux_path = "x.txt"
    config.attack.kind = "trojan"
    with pytest.raises(ValueError, match="attack.kind='trojan'"):
        attack.validate(config)
