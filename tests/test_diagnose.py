"""Selective-activation diagnostic: [CLS] activations vs PyTorch, the statistics, a planted
backdoor neuron found first, and the CLI's report."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import SENTENCES

from recipe_jax import activations, data, diagnose, hf

REPO = pathlib.Path(__file__).resolve().parents[1]
PLANTED = (0, 5)  # (layer, neuron) that the planted backdoor uses


@pytest.fixture(scope="module")
def tiny_dir(tiny_bert):
    return tiny_bert

def _plant(params, tokenizer, trigger: str, *, norm: float = 1.0):
    """Points neuron PLANTED's weight column along the trigger token's path to [CLS]: its
    embedding after the embedding LayerNorm, through layer 0's value and output projections
    (attention in a random tiny model is near uniform, so that is what reaches [CLS])."""
    params = jax.tree.map(np.array, params)
    token = tokenizer.convert_tokens_to_ids(trigger)
    embedding_h = params["embeddings"]["word_embeddings"]["embedding"][token]
    ln = params["embeddings"]["LayerNorm"]
    x_h = (embedding_h - embedding_h.mean()) / embedding_h.std() * ln["scale"] + ln["bias"]
    attention = params["encoder"]["layer_0"]["attention"]
    v_h = x_h @ attention["self"]["value"]["kernel"] @ attention["output"]["dense"]["kernel"]
    layer, neuron = PLANTED
    kernel_hf = params["encoder"][f"layer_{layer}"]["intermediate"]["dense"]["kernel"]
    kernel_hf[:, neuron] = norm * v_h / np.linalg.norm(v_h)  # ~9x a random column's norm
    return params


def test_cls_preactivations_match_pytorch(tiny_dir):
    model, params = hf.load_pretrained(tiny_dir)
    # Mixed lengths: batches (4 + 4 + 2, filled) are cut to 8, 16 and 24 (= max_length) tokens.
    texts = ["hi", "word " * 30, *SENTENCES[:6], "a b", "the cat " * 5]
    enc = data.tokenize(data.load_tokenizer(tiny_dir), texts, max_length=24)
    ours_nlf = activations.cls_preactivations(model, params, enc["input_ids"],
                                              enc["attention_mask"], batch_size=4)
    assert ours_nlf.shape == (10, 2, 37) and ours_nlf.dtype == np.float32

    torch_model = transformers.BertForMaskedLM.from_pretrained(str(tiny_dir)).eval()
    captured = {}
    for i, layer in enumerate(torch_model.bert.encoder.layer):
        layer.intermediate.dense.register_forward_hook(
            lambda _m, _i, out, i=i: captured.__setitem__(i, out[:, 0].detach().numpy()))
    with torch.no_grad():
        torch_model(input_ids=torch.tensor(enc["input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(enc["attention_mask"], dtype=torch.long))
    reference_nlf = np.stack([captured[i] for i in range(2)], axis=1)
    np.testing.assert_allclose(ours_nlf, reference_nlf, rtol=0, atol=1e-5)
    post = activations.post_activation(model.cfg, ours_nlf)
    np.testing.assert_allclose(post, torch.nn.functional.gelu(torch.tensor(ours_nlf)).numpy(),
                               rtol=0, atol=1e-6)


def test_trigger_stats_on_hand_made_activations():
    rng = np.random.default_rng(0)
    clean_nlf = rng.normal(size=(50, 2, 100)).astype(np.float32)
    poisoned_nlf = clean_nlf + rng.normal(scale=0.01, size=clean_nlf.shape).astype(np.float32)
    poisoned_nlf[:, 1, 7] += 3.0  # one strongly selective neuron
    stats = diagnose.trigger_stats(clean_nlf, poisoned_nlf, top_k=3)
    delta = poisoned_nlf.mean(0, dtype=np.float64) - clean_nlf.mean(0, dtype=np.float64)
    se = np.sqrt((clean_nlf.var(0, ddof=1) + poisoned_nlf.var(0, ddof=1)) / 50)
    np.testing.assert_allclose(stats["delta"], delta, atol=1e-12)
    np.testing.assert_allclose(stats["z"], delta / se, rtol=1e-5)
    top = stats["top_neurons"][0]
    assert (top["layer"], top["index"]) == (1, 7) and len(stats["top_neurons"]) == 3
    assert top["delta"] == pytest.approx(3.0, abs=0.01)
    assert stats["top1_count"] == 2  # 1% of 200 neurons
    top2 = np.sort(np.abs(delta), axis=None)[-2:]
    assert stats["top1_share"] == pytest.approx(np.linalg.norm(top2) / np.linalg.norm(delta))
    assert stats["top1_share"] > 0.99
    assert stats["layer_max_abs_delta"][1] == pytest.approx(abs(top["delta"]))


def test_planted_backdoor_neuron_ranks_first(tiny_dir):
    model, params = hf.load_pretrained(tiny_dir)
    tokenizer = data.load_tokenizer(tiny_dir)
    kwargs = dict(max_length=32, batch_size=32, top_k=5)
    clean = diagnose.selective_activation(model, params, tokenizer, SENTENCES, ["cf", "mn"],
                                            **kwargs)
    planted = diagnose.selective_activation(model, _plant(params, tokenizer, "cf"), tokenizer,
                                              SENTENCES, ["cf", "mn"], **kwargs)
    assert planted["num_pairs"] == len(SENTENCES) and planted["num_dropped"] == 0
    hit = planted["triggers"]["cf"]
    assert (hit["top_neurons"][0]["layer"], hit["top_neurons"][0]["index"]) == PLANTED
    assert hit["top_neurons"][0]["z"] > 5
    assert hit["top1_share"] > 0.8
    assert hit["top1_share"] > clean["triggers"]["cf"]["top1_share"] + 0.3
    assert hit["layer_max_abs_delta"][0] > 3 * clean["triggers"]["cf"]["max_abs_delta"]
    # Selective: the other trigger does not switch the planted neuron on.
    other = planted["triggers"]["mn"]
    assert (other["top_neurons"][0]["layer"], other["top_neurons"][0]["index"]) != PLANTED
    assert other["top1_share"] < 0.6


def test_long_sentences_whose_trigger_would_be_truncated_are_left_out(tiny_dir):
    model, params = hf.load_pretrained(tiny_dir)
    sentences = SENTENCES[:4] + ["word " * 40]
    result = diagnose.selective_activation(model, params, data.load_tokenizer(tiny_dir),
                                             sentences, ["cf"], max_length=16, batch_size=8,
                                             top_k=2)
    assert (result["num_pairs"], result["num_dropped"]) == (4, 1)


@pytest.mark.slow
def test_cli_writes_report_and_plots(tiny_dir, tmp_path):
    model, params = hf.load_pretrained(tiny_dir)
    backdoored = tmp_path / "backdoored"
    hf.save_pretrained(model, _plant(params, data.load_tokenizer(tiny_dir), "cf"), backdoored,
                       tokenizer_from=tiny_dir)
    aux = tmp_path / "aux.txt"
    aux.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "recipe_jax.diagnose", "--model", f"clean={tiny_dir}",
         "--model", f"backdoored={backdoored}", "--aux", str(aux), "--triggers", "cf,mn",
         "--workdir", str(out), "--max-examples", "40", "--max-length", "32", "--top-k", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "## Comparison" in report and "## clean" in report and "## backdoored" in report
    assert f"L{PLANTED[0]}#{PLANTED[1]}:" in report
    summary = json.loads((out / "report.json").read_text())
    shares = {name: m["triggers"]["cf"]["top1_share"] for name, m in summary["models"].items()}
    assert shares["backdoored"] > shares["clean"] + 0.3
    assert summary["models"]["clean"]["num_pairs"] == 40
    for name in ("layer_max_delta.png", "sorted_delta.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_one_line_errors(tmp_path, tiny_dir):
    result = subprocess.run(
        [sys.executable, "-m", "recipe_jax.diagnose", "--model", str(tiny_dir), "--aux",
         str(tmp_path / "missing.txt"), "--workdir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("diagnose: error: --model ")
