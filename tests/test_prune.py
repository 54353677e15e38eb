"""Pruning baselines: exactly the chosen neurons zeroed, the GM/GA rankings, budget, the CLI."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import transformers
from conftest import SENTENCES, preset, tiny_bert_with_tokenizer
from safetensors.numpy import load_file

from recipe_jax import activations, data, hf, prune
from recipe_jax.model import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

INTERMEDIATE = "bert.encoder.layer.{}.intermediate.dense.{}"


def _tiny_with_tokenizer(tmp_path):
    """A tiny BertForMaskedLM with the MiniLM tokenizer's vocab, and an aux text file."""
    hf_dir = tiny_bert_with_tokenizer(tmp_path / "model")
    aux = tmp_path / "aux.txt"
    aux.write_text("\n".join(SENTENCES) + "\n")
    return hf_dir, aux


def _check_export(exported: dict, source: dict, mask_lf: np.ndarray) -> None:
    """Masked rows/bias entries are zero, unmasked ones and every other tensor bitwise equal."""
    assert set(source) <= set(exported)
    for name, value in source.items():
        if ".intermediate.dense." in name:
            layer = int(name.split(".")[3])
            keep = ~mask_lf[layer]
            assert not exported[name][mask_lf[layer]].any(), name  # weight rows [F, H] / bias [F]
            assert np.array_equal(exported[name][keep], value[keep]), name
        else:
            assert np.array_equal(exported[name], value), name


# ------------------------------------------------------------------------- pure functions

def test_prune_neurons_zeroes_exactly_the_chosen_neurons(tiny_bert_mlm, tmp_path):
    model, params = hf.load_pretrained(tiny_bert_mlm)
    before = {k: np.array(v) for k, v in hf.flat_params(params).items()}
    cfg = model.cfg
    mask_lf = np.random.default_rng(0).random((cfg.num_hidden_layers,
                                               cfg.intermediate_size)) < 0.3
    pruned = prune.prune_neurons(params, mask_lf)
    for path, value in hf.flat_params(params).items():  # the input is not modified
        assert np.array_equal(value, before[path]), path
    out = hf.save_pretrained(model, pruned, tmp_path / "out", tokenizer_from=tiny_bert_mlm)
    exported = load_file(str(out / "model.safetensors"))
    _check_export(exported, load_file(str(tiny_bert_mlm / "model.safetensors")), mask_lf)
    assert exported[INTERMEDIATE.format(0, "weight")].shape == (cfg.intermediate_size,
                                                                 cfg.hidden_size)


def test_prune_neurons_rejects_a_wrong_mask(tiny_bert_mlm):
    _, params = hf.load_pretrained(tiny_bert_mlm)
    with pytest.raises(ValueError, match=r"mask must be bool \[L=2, F=37\]"):
        prune.prune_neurons(params, np.zeros((2, 36), bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        prune.prune_neurons(params, np.zeros((2, 37), int))


def _hand_params(norms_lf):
    """Two layers whose kernel column j has L2 norm norms_lf[l][j] (H = 3)."""
    params = {"encoder": {}}
    for layer, norms in enumerate(norms_lf):
        kernel_hf = np.zeros((3, len(norms)), np.float32)
        kernel_hf[layer % 3] = norms  # one non-zero entry per column: its norm is |entry|
        kernel_hf[(layer + 1) % 3] = 0.0
        params["encoder"][f"layer_{layer}"] = {"intermediate": {"dense": {
            "kernel": kernel_hf, "bias": np.full(len(norms), 100.0, np.float32)}}}
    return params


def test_magnitude_picks_the_smallest_weight_rows():
    norms_lf = [[5.0, 0.5, 3.0, 2.0], [-0.1, 4.0, 1.0, 6.0]]  # sign must not matter
    params = _hand_params(norms_lf)
    cfg = ModelConfig(hidden_size=3, num_hidden_layers=2, intermediate_size=4)
    scores_lf = prune.rank_by_magnitude(params, cfg)
    np.testing.assert_allclose(scores_lf, np.abs(norms_lf), rtol=1e-6)
    mask_lf = prune.select_lowest(scores_lf, 3)
    assert mask_lf.tolist() == [[False, True, False, False], [True, False, True, False]]
    # The bias (large here) plays no part in the ranking, but is zeroed with the row.
    pruned = prune.prune_neurons(params, mask_lf)
    dense = pruned["encoder"]["layer_1"]["intermediate"]["dense"]
    assert dense["bias"].tolist() == [0.0, 100.0, 0.0, 100.0]
    assert not dense["kernel"][:, [0, 2]].any() and dense["kernel"][:, [1, 3]].any()


def test_activation_picks_the_lowest_means():
    acts_nlf = np.zeros((4, 2, 3), np.float32)
    acts_nlf[:, 0] = [[1.0, -0.1, 2.0], [1.0, 0.1, 2.0], [1.0, -0.1, 2.0], [1.0, 0.1, 2.0]]
    acts_nlf[:, 1] = [[-0.17, 3.0, 0.5], [0.0, 3.0, 0.5], [0.0, 3.0, 0.3], [0.0, 3.0, 0.3]]
    scores_lf = prune.rank_by_activation(acts_nlf)
    np.testing.assert_allclose(scores_lf, [[1.0, 0.0, 2.0], [-0.0425, 3.0, 0.4]], atol=1e-7)
    assert prune.select_lowest(scores_lf, 2).tolist() == [[False, True, False],
                                                          [True, False, False]]
    assert prune.select_lowest(scores_lf, 0).sum() == 0
    assert prune.select_lowest(scores_lf, 6).all()
    with pytest.raises(ValueError, match="count=7"):
        prune.select_lowest(scores_lf, 7)


def test_ties_break_by_layer_then_index():
    assert prune.select_lowest(np.ones((2, 3)), 4).tolist() == [[True, True, True],
                                                                [True, False, False]]


def test_budget_is_the_papers_k_times_f_on_bert_base():
    for k in (4, 6, 8):  # FP-GM; FP-GA against POR/BadPre; FP-GA against NeuBA
        assert prune.neuron_budget(k / 12, 12, 3072) == k * 3072
    assert prune.neuron_budget(0.6666666666666666, 12, 3072) == 8 * 3072  # the documented override
    assert prune.neuron_budget(preset("prune", "fp_gm").prune.fraction, 6, 1536) == 3072
    assert prune.neuron_budget(preset("prune", "fp_ga").prune.fraction, 6, 1536) == 4608
    with pytest.raises(ValueError, match="fraction=1.5"):
        prune.neuron_budget(1.5, 12, 3072)


def test_validate_names_the_key():
    config = preset("prune", "fp_ga")
    config.model.init_from = "x"
    with pytest.raises(ValueError, match="data.aux_path=''"):
        prune.validate(config)
    config = preset("prune", "fp_gm")
    config.prune.fraction = 0.0
    with pytest.raises(ValueError, match=r"prune.fraction=0.0"):
        prune.validate(config)
    config.prune.method = "gm"
    with pytest.raises(ValueError, match="prune.method='gm': use one of fp, fp_gm, fp_ga"):
        prune.validate(config)
    with pytest.raises(ValueError, match="unknown prune preset"):
        preset("prune", "nope")


# --------------------------------------------------------------------------------- stage

def test_fp_zeroes_the_whole_last_intermediate_dense(tiny_bert_mlm, tmp_path):
    config = preset("prune", "fp")
    config.model.init_from = str(tiny_bert_mlm)
    summary = prune.run(config, str(tmp_path / "run"))
    assert summary["count_per_layer"] == [0, 37]
    exported = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    assert not exported[INTERMEDIATE.format(1, "weight")].any()
    assert not exported[INTERMEDIATE.format(1, "bias")].any()
    mask_lf = np.zeros((2, 37), bool)
    mask_lf[1] = True
    _check_export(exported, load_file(str(tiny_bert_mlm / "model.safetensors")), mask_lf)


def test_fp_ga_matches_the_direct_computation_across_chunks(tmp_path, monkeypatch):
    hf_dir, aux = _tiny_with_tokenizer(tmp_path)
    config = preset("prune", "tiny")
    config.model.init_from, config.data.aux_path = str(hf_dir), str(aux)
    monkeypatch.setattr(prune, "CHUNK", 40)  # 96 sentences: chunks of 40, 40, 16
    summary = prune.run(config, str(tmp_path / "run"))

    model, params = hf.load_pretrained(hf_dir)
    enc = data.tokenize(data.load_tokenizer(hf_dir), SENTENCES, config.data.max_length)
    pre_nlf = activations.cls_preactivations(model, params, enc["input_ids"],
                                             enc["attention_mask"], batch_size=96)
    scores_lf = prune.rank_by_activation(activations.post_activation(model.cfg, pre_nlf))
    mask_lf = prune.select_lowest(scores_lf, 37)  # 6/12 of 2 x 37 = 37
    assert summary["num_examples"] == 96 and summary["count"] == 37
    assert summary["neurons"] == {str(i): np.flatnonzero(r).tolist()
                                  for i, r in enumerate(mask_lf)}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "recipe_jax.prune", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_a_loadable_hf_dir(tmp_path):
    hf_dir, aux = _tiny_with_tokenizer(tmp_path)
    workdir = tmp_path / "run"
    result = _cli("--config", "configs/prune.py:tiny", "--workdir", str(workdir),
                  f"--config.model.init_from={hf_dir}", f"--config.data.aux_path={aux}",
                  "--config.prune.method=fp_gm")
    assert result.returncode == 0, result.stderr
    assert "prune: fp_gm zeroed 37 of 74" in result.stdout
    summary = json.loads((workdir / "pruned.json").read_text())
    assert summary["method"] == "fp_gm" and summary["budget"] == 37
    assert sum(summary["count_per_layer"]) == 37

    model, info = transformers.BertForMaskedLM.from_pretrained(str(workdir / "hf"),
                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert transformers.AutoTokenizer.from_pretrained(str(workdir / "hf")).vocab_size == 30522
    source = load_file(str(hf_dir / "model.safetensors"))
    for layer in range(2):
        dense = model.bert.encoder.layer[layer].intermediate.dense
        pruned = summary["neurons"][str(layer)]
        kept = sorted(set(range(37)) - set(pruned))
        weight, bias = dense.weight.detach().numpy(), dense.bias.detach().numpy()
        assert not weight[pruned].any() and not bias[pruned].any()
        name = INTERMEDIATE.format(layer, "weight")
        assert np.array_equal(weight[kept], source[name][kept])
    # GM: every pruned row's norm is <= every kept row's norm, across layers too.
    norms = {(layer, j): np.linalg.norm(source[INTERMEDIATE.format(layer, "weight")][j])
             for layer in range(2) for j in range(37)}
    pruned_norms = [norms[(int(layer), j)] for layer, js in summary["neurons"].items()
                    for j in js]
    kept_norms = [v for k, v in norms.items() if k[1] not in summary["neurons"][str(k[0])]]
    assert max(pruned_norms) <= min(kept_norms)


def test_cli_help_and_one_line_errors(tmp_path, tiny_bert_mlm):
    result = _cli("--help")
    assert result.returncode == 0 and "--config.prune.fraction" in result.stdout
    result = _cli("--config", "configs/prune.py:fp_gm", "--workdir", str(tmp_path / "run"),
                  f"--config.model.init_from={tiny_bert_mlm}", "--config.prune.method=xx")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("prune: error: prune.method='xx'")
    assert not (tmp_path / "run").exists()


def test_gated_ffn_neuron_is_both_halves_and_its_output_row():
    """ModernBERT's GLU: neuron j is input column j, gate column F + j and output row j; its
    magnitude is that of both columns, its activation act(u_j) * g_j."""
    h, f = 3, 4
    rng = np.random.default_rng(0)
    kernel_h2f = rng.normal(size=(h, 2 * f)).astype(np.float32)
    out_fh = rng.normal(size=(f, h)).astype(np.float32)
    params = {"encoder": {"layer_0": {"intermediate": {"dense": {"kernel": kernel_h2f}},
                                      "output": {"dense": {"kernel": out_fh}}}}}
    pruned = prune.prune_neurons(params, np.array([[False, True, False, False]]))["encoder"]
    kernel, out = (pruned["layer_0"][k]["dense"]["kernel"] for k in ("intermediate", "output"))
    assert np.flatnonzero(~kernel.any(axis=0)).tolist() == [1, f + 1]
    assert np.flatnonzero(~out.any(axis=1)).tolist() == [1]
    assert np.array_equal(np.delete(kernel, [1, f + 1], axis=1),
                          np.delete(kernel_h2f, [1, f + 1], axis=1))
    cfg = ModelConfig(model_type="modernbert", hidden_size=h, num_hidden_layers=1,
                      intermediate_size=f)
    np.testing.assert_allclose(prune.rank_by_magnitude(params, cfg)[0], np.sqrt(
        (kernel_h2f[:, :f] ** 2).sum(0) + (kernel_h2f[:, f:] ** 2).sum(0)), rtol=1e-6)
    pre = rng.normal(size=(2, 1, 2 * f)).astype(np.float32)
    post = activations.post_activation(cfg, pre)
    gelu = 0.5 * pre[..., :f] * (1 + np.vectorize(math.erf)(pre[..., :f] / math.sqrt(2)))
    np.testing.assert_allclose(post, gelu * pre[..., f:], rtol=1e-5, atol=1e-6)
