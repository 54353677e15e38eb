"""The `convert` and `export` commands end to end, as a user runs them."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_hf
from safetensors.numpy import load_file

from recipe_jax import convert, export, model


@pytest.mark.slow
def test_convert_then_export_round_trip(tmp_path, capsys):
    ref = tiny_hf("BertForPreTraining", tmp_path / "src")
    assert convert.main(["--hf", str(tmp_path / "src"), "--out", str(tmp_path / "run"),
                         "--verify"]) == 0
    assert "parity: max |delta logits|" in capsys.readouterr().out
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                        "--verify"]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for key, value in ref.state_dict().items():
        if key in exported:
            assert np.array_equal(exported[key], value.numpy()), key
    assert len(exported) == len([k for k in ref.state_dict() if ".decoder." not in k
                                 and not k.endswith(("position_ids", "token_type_ids"))])


def test_verify_fails_when_the_model_is_wrong(tmp_path, monkeypatch, capsys):
    tiny_hf("BertForMaskedLM", tmp_path / "src")
    monkeypatch.setitem(model.ACTIVATIONS, "gelu", jax.nn.relu)  # a deliberately wrong model
    assert convert.main(["--hf", str(tmp_path / "src"), "--out", str(tmp_path / "run"),
                         "--verify"]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a model that failed its check


def test_convert_errors_are_one_clear_line(tmp_path, capsys):
    assert convert.main(["--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "convert: error:" in err and "no such directory" in err
    assert export.main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "not a recipe_jax run dir" in capsys.readouterr().err


def test_convert_refuses_to_mix_models_in_one_dir(tmp_path, capsys):
    tiny_hf("BertForMaskedLM", tmp_path / "a")
    tiny_hf("BertForMaskedLM", tmp_path / "b", intermediate_size=41)
    assert convert.main(["--hf", str(tmp_path / "a"), "--out", str(tmp_path / "run")]) == 0
    assert convert.main(["--hf", str(tmp_path / "b"), "--out", str(tmp_path / "run")]) == 1
    assert "already holds a recipe_jax run:convert" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_commands_on_minilm(tmp_path, minilm_dir):
    run = [sys.executable, "-m"]
    subprocess.run(run + ["recipe_jax.convert", "--hf", str(minilm_dir), "--out",
                          str(tmp_path / "run"), "--verify"], check=True)
    out = subprocess.run(run + ["recipe_jax.export", "--ckpt", str(tmp_path / "run"), "--out",
                                str(tmp_path / "hf"), "--verify"], check=True,
                         capture_output=True, text=True).stdout
    assert "parity: max |delta logits|" in out
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
