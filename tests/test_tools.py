"""The analysis tools under tools/: weight_change (which tensors moved) and drift (how far
clean token states moved), on tiny models."""

import importlib.util
import pathlib

import numpy as np
import pytest
from conftest import SENTENCES, tiny_bert_with_tokenizer
from safetensors.numpy import load_file, save_file

from recipe_jax import hf

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weight_change_names_the_one_tensor_that_moved_and_skips_fresh_heads(tmp_path):
    weight_change = _tool("weight_change")

    ref = tiny_bert_with_tokenizer(tmp_path / "ref", kind="BertForPreTraining")
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ref.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    state = load_file(str(ref / "model.safetensors"))
    state["bert.pooler.dense.weight"] = 3.0 * state["bert.pooler.dense.weight"]  # change: 200%
    bare = {k: v for k, v in state.items() if not k.startswith("cls.")}  # no MLM / NSP head
    save_file(bare, str(moved / "model.safetensors"), metadata={"format": "pt"})
    changes = weight_change.relative_change(weight_change.load(str(ref)),
                                            weight_change.load(str(moved)))
    assert not any(k.startswith("cls.") for k in changes)  # fresh heads are not compared
    assert changes.pop("bert.pooler.dense.weight") == pytest.approx(2.0, rel=1e-6)
    assert len(changes) > 10 and max(changes.values()) == 0.0
    kinds = weight_change.by_kind({**changes, "bert.pooler.dense.weight": 2.0})
    assert kinds["pooler"] == (2.0, 2.0) and kinds["FFN"] == (0.0, 0.0)
    assert weight_change.main(["--reference", str(ref), str(moved), "--top", "1"]) == 0


def test_drift_is_zero_for_the_same_model_and_grows_with_the_change(tmp_path):
    drift = _tool("drift")
    ref = tiny_bert_with_tokenizer(tmp_path / "ref")
    model, params = hf.load_pretrained(ref)
    moved = {}
    for scale in (1.01, 1.5):  # every FFN-in matrix scaled
        out = tmp_path / f"moved{scale}"
        changed = {**params, "encoder": {k: {**v, "intermediate": {"dense": {
            **v["intermediate"]["dense"],
            "kernel": v["intermediate"]["dense"]["kernel"] * scale}}}
            for k, v in params["encoder"].items()}}
        hf.save_pretrained(model, changed, out, tokenizer_from=ref)
        moved[scale] = str(out)
    same, small, large = drift.drift(str(ref), [str(ref), moved[1.01], moved[1.5]], SENTENCES,
                                     max_length=16, batch_size=16)
    assert same["mean_mse"] == 0.0 and same["relative"] == 0.0
    assert 0 < small["mean_mse"] < large["mean_mse"]
    assert 0 < small["relative"] < large["relative"] < 2.5
    assert len(large["per_layer_mse"]) == model.cfg.num_hidden_layers
    assert np.isfinite(large["per_layer_mse"]).all()
