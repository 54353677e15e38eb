"""RECIPE purification: equivalence with the authors' PyTorch step, sharding, resume, the CLI."""

import functools
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import (
    SENTENCES,
    config_module,
    preset,
    run_train_steps,
    tiny_bert_with_tokenizer,
    tiny_hf,
)
from safetensors.numpy import load_file

from recipe_jax import checkpoint, config_blocks, data, hf, losses, masks, optim, purify, trainer
from recipe_jax.model import ModelConfig, abstract_params

REPO = pathlib.Path(__file__).resolve().parents[1]
purify_configs = config_module("purify")



def _tiny_setup(tmp_path, **model_overrides):
    """A tiny BertForMaskedLM with the MiniLM tokenizer's vocab, and an aux text file."""
    hf_dir = tiny_bert_with_tokenizer(tmp_path / "model", **model_overrides)
    aux = tmp_path / "aux.txt"
    aux.write_text("\n".join(SENTENCES) + "\n")
    return hf_dir, aux


def _config(hf_dir, aux, **overrides):
    return preset("purify", "tiny", model__init_from=str(hf_dir), data__aux_path=str(aux),
                  **overrides)


# ------------------------------------------------------------------ the authors' PyTorch step

def _torch_reference(hf_dir, batches, *, lr, steps, weight=1.0, lr_factor=lambda name: 1.0):
    """The release's loop: HF MLM loss + lambda * sum torch.norm(W), AdamW, clip, linear decay;
    `lr_factor(name)` gives each parameter its own group's learning rate (lr x factor)."""
    model = transformers.BertForMaskedLM.from_pretrained(str(hf_dir))
    model.eval()  # dropout off for the comparison
    regularized, groups = [], []
    for name, p in model.named_parameters():
        p.requires_grad = "intermediate.dense.weight" in name
        if p.requires_grad:
            regularized.append(p)
            groups.append({"params": [p], "lr": lr * lr_factor(name)})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    out = []
    for batch in batches:
        labels = np.full(batch["input_ids"].shape, -100)
        for b, (pos, lab, w) in enumerate(zip(batch["positions"], batch["labels"],
                                              batch["weights"], strict=True)):
            labels[b, pos[w > 0]] = lab[w > 0]
        mlm = model(input_ids=torch.tensor(np.asarray(batch["input_ids"]), dtype=torch.long),
                    attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                    token_type_ids=torch.zeros(batch["input_ids"].shape, dtype=torch.long),
                    labels=torch.tensor(labels)).loss
        reg = sum(torch.norm(p) for p in regularized)
        loss = mlm + weight * reg
        loss.backward()
        torch.nn.utils.clip_grad_norm_(regularized, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(float(loss))
    return out, {n: p.detach().numpy().copy() for n, p in model.state_dict().items()}


def _static_batches(hf_dir, config, vocab_size: int, count: int) -> list[dict]:
    """`count` MLM batches of 8 SENTENCES with masks drawn from PRNGKey(i)."""
    tokenizer = data.load_tokenizer(hf_dir)
    enc = data.tokenize(tokenizer, SENTENCES[:8 * count], config.data.max_length)
    mask = jax.jit(functools.partial(masks.mask_tokens, mask_token_id=tokenizer.mask_token_id,
                                     vocab_size=vocab_size,
                                     num_positions=masks.num_masked_positions(
                                         config.data.max_length)))
    batches = []
    for i in range(count):
        rows = slice(8 * i, 8 * i + 8)
        masked = mask(jax.random.PRNGKey(i), enc["input_ids"][rows], enc["candidates"][rows])
        batches.append({"attention_mask": enc["attention_mask"][rows],
                        **{k: np.asarray(v) for k, v in masked.items()}})
    return batches


# train.lr_scales: layer 0 at a quarter of the lr, every other layer at 3x (first match wins).
LR_SCALES = (r"encoder\.layer\.0\.=0.25", r"encoder\.layer\.=3")


# train.depth_lr_scales: the same factors by depth (2 layers, 2 bands: layer 0 | layer 1).
@pytest.mark.parametrize("lr_scales,depth", [
    pytest.param((), (), id="one-lr"),
    pytest.param(LR_SCALES, (), id="lr_scales", marks=pytest.mark.slow),
    pytest.param((), (0.25, 3.0), id="depth_lr_scales", marks=pytest.mark.slow)])
def test_three_steps_match_pytorch_reference(tmp_path, lr_scales, depth):
    hf_dir, aux = _tiny_setup(tmp_path)
    config = _config(hf_dir, aux, train__dropout=False, train__num_steps=3,
                     train__learning_rate=1e-3, train__lr_scales=lr_scales,
                     train__depth_lr_scales=depth)
    model, host_params = hf.load_pretrained(hf_dir)
    batches = _static_batches(hf_dir, config, model.cfg.vocab_size, 3)
    loss_fn = functools.partial(purify.loss_fn, model=model, recipe=config.recipe, dropout=False,
                                masking=None)
    state, frozen, losses = run_train_steps(loss_fn, host_params, config.recipe.trainable,
                                            batches, config, model.cfg)

    ref_losses, ref_state = _torch_reference(
        hf_dir, batches, lr=1e-3, steps=3,
        lr_factor=lambda name: ((0.25 if ".layer.0." in name else 3.0)
                                if lr_scales or depth else 1.0))
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    ours = hf.hf_state_dict(model, trainer.merge_params(state.trainable, frozen))
    source = load_file(str(hf_dir / "model.safetensors"))
    changed = 0
    for name, value in ours.items():
        if "intermediate.dense.weight" in name:
            np.testing.assert_allclose(value, ref_state[name], rtol=0, atol=1e-6, err_msg=name)
            changed += not np.array_equal(value, source[name])
        else:  # every frozen parameter bitwise untouched
            assert np.array_equal(value, source[name]), name
    assert changed == model.cfg.num_hidden_layers


# ------------------------------------------------------------------------- end to end, meshes

def test_purify_end_to_end_writes_loadable_hf(tmp_path, capsys):
    hf_dir, aux = _tiny_setup(tmp_path)
    summary = purify.run(_config(hf_dir, aux), str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "purify step 6/6" in out and "ETA" in out and "tok/s" in out
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "mlm_loss", "reg_loss", "mlm_acc", "grad_norm", "param_norm", "lr"} <= set(
        rows[0])
    assert rows[-1]["reg_loss"] < rows[0]["reg_loss"]  # the regularizer shrinks the weights
    assert summary["export_max_logit_diff"] < 1e-4
    _, info = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "run" / "hf"),
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


@pytest.mark.slow
def test_meshes_give_the_same_run(tmp_path):
    hf_dir, aux = _tiny_setup(tmp_path, intermediate_size=64, hidden_size=32)
    runs = {}
    for shape in MESHES:
        workdir = tmp_path / ("run_" + "x".join(map(str, shape)))
        config = _config(hf_dir, aux, mesh__shape=shape, export__verify=False)
        purify.run(config, str(workdir))
        rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
        runs[shape] = ([r["loss"] for r in rows], load_file(str(workdir / "hf" /
                                                                "model.safetensors")))
    base_losses, base_weights = runs[MESHES[0]]
    for shape in MESHES[1:]:
        losses, weights = runs[shape]
        np.testing.assert_allclose(losses, base_losses, rtol=0, atol=1e-5, err_msg=str(shape))
        for name, value in base_weights.items():
            np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-5,
                                       err_msg=f"{shape} {name}")


def test_penalty_matches_numpy_on_the_pytorch_layout(tmp_path):
    hf_dir, _ = _tiny_setup(tmp_path, intermediate_size=48, hidden_size=32)
    model, params = hf.load_pretrained(hf_dir)
    torch_sd = load_file(str(hf_dir / "model.safetensors"))  # PyTorch layout: [out, in]
    patterns = (purify_configs.INTERMEDIATE, purify_configs.OUTPUT)
    w_in = [torch_sd[f"bert.encoder.layer.{i}.intermediate.dense.weight"] for i in range(2)]
    w_out = [torch_sd[f"bert.encoder.layer.{i}.output.dense.weight"] for i in range(2)]
    assert w_in[0].shape == (48, 32) and w_out[0].shape == (32, 48)
    expected = sum(np.linalg.norm(w) for w in w_in + w_out)
    np.testing.assert_allclose(float(losses.frobenius_penalty(params, patterns, "bert")),
                               expected, rtol=1e-5)
    zeroed = jax.tree.map(lambda w: w * 0.0, params)  # ||0||_F: 0, and a 0 (not NaN) gradient
    grads = jax.grad(lambda p: losses.frobenius_penalty(p, patterns, "bert"))(zeroed)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------ resume, CLI

def _cli(workdir, hf_dir, aux, *extra):
    return [sys.executable, "-m", "recipe_jax.purify", "--config",
            f"{REPO}/configs/purify.py:tiny", "--workdir", str(workdir),
            f"--config.model.init_from={hf_dir}", f"--config.data.aux_path={aux}",
            "--config.export.verify=False", *extra]


@pytest.mark.slow
def test_cli_overrides_help_and_typos(tmp_path):
    hf_dir, aux = _tiny_setup(tmp_path)
    typo = subprocess.run(_cli(tmp_path / "r", hf_dir, aux, "--config.train.learning_rat=1"),
                          capture_output=True, text=True)
    assert typo.returncode != 0 and "learning_rat" in typo.stderr
    bad = subprocess.run(_cli(tmp_path / "r", hf_dir, aux, "--config.data.masking=sometimes"),
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "data.masking='sometimes'" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "recipe_jax.purify", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--workdir" in helped.stdout
    assert "--config.recipe.weight=1.0  # lambda" in helped.stdout


def test_lr_scales_rule_matching_no_trainable_parameter_is_an_error(tmp_path):
    hf_dir, _ = _tiny_setup(tmp_path)
    _, host_params = hf.load_pretrained(hf_dir)
    trainable, _ = trainer.split_params(host_params, (purify_configs.INTERMEDIATE,), "bert")
    tree = optim.lr_scale_tree(trainable, LR_SCALES, "bert")
    factors = {hf.hf_name(path, "bert"): f for path, f in hf.flat_params(tree).items()}
    assert factors == {"bert.encoder.layer.0.intermediate.dense.weight": 0.25,
                       "bert.encoder.layer.1.intermediate.dense.weight": 3.0}
    with pytest.raises(ValueError, match=r"train.lr_scales=\('pooler=2',\): \['pooler'\] match "
                                         r"no trainable parameter"):
        optim.lr_scale_tree(trainable, ("pooler=2",), "bert")  # the pooler is frozen here


def test_depth_lr_scales_cut_any_depth_into_equal_bands_and_multiply_lr_scales():
    """(0.5, 1.0): the lower half of the layers at half the lr, whatever the depth; the depth
    factor multiplies an lr_scales rule's; embeddings and heads get no depth factor."""
    for layers in (6, 12):
        cfg = ModelConfig(vocab_size=99, hidden_size=8, num_hidden_layers=layers,
                          num_attention_heads=2, intermediate_size=16)
        trainable, _ = trainer.split_params(nn.unbox(abstract_params(cfg)),
                                          (purify_configs.INTERMEDIATE, "word_embeddings"),
                                          "bert")
        tree = optim.lr_scale_tree(trainable, (r"layer\.0\.=0.2",), "bert", (0.5, 1.0), layers)
        factors = {hf.hf_name(path, "bert"): f for path, f in hf.flat_params(tree).items()}
        layer = "bert.encoder.layer.{}.intermediate.dense.weight".format
        assert factors == {"bert.embeddings.word_embeddings.weight": 1.0, layer(0): 0.1,
                           **{layer(i): 0.5 for i in range(1, layers // 2)},
                           **{layer(i): 1.0 for i in range(layers // 2, layers)}}
    assert [optim.depth_band(i, 6, 3) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"7 bands for a model of 6 layers"):
        config_blocks.parse_depth_lr_scales((1.0,) * 7, 6)
    with pytest.raises(ValueError, match=r"needs the model's depth"):
        optim.lr_scale_tree(trainable, (), "bert", (0.5, 1.0))


def test_validate_names_key_value_and_fix():
    config = preset("purify", "bert")
    config.data.aux_path = "x.txt"
    config.train.dtype = "float64"
    with pytest.raises(ValueError, match=r"train.dtype='float64': use 'float32' or 'bfloat16'"):
        purify.validate(config)
    with pytest.raises(ValueError, match="unknown purify preset"):
        purify_configs.get_config("bart")


@pytest.mark.slow
def test_roberta_preset_trains_everything_and_regularizes_query(tmp_path):
    hf_dir, aux = _tiny_setup(tmp_path)
    tiny_hf("RobertaForMaskedLM", hf_dir, vocab_size=30522, pad_token_id=0)  # BERT vocab's pad
    config = preset("purify", "roberta")
    tiny = preset("purify", "tiny")
    for section in ("data", "train", "checkpoint"):
        config[section] = tiny[section]
    config.model.init_from, config.data.aux_path = str(hf_dir), str(aux)
    config.train.num_steps, config.train.dropout = 2, False
    summary = purify.run(config, str(tmp_path / "run"))
    assert summary["export_max_logit_diff"] < 1e-4
    before = load_file(str(hf_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert "roberta.encoder.layer.0.attention.self.query.weight" in changed
    assert "roberta.embeddings.word_embeddings.weight" in changed  # everything is trainable
    _, params = hf.load_pretrained(hf_dir)
    regularized = losses.select_names(params, config.recipe.regularize, "roberta")
    assert regularized == sorted(f"roberta.encoder.layer.{i}.{m}.weight" for i in range(2)
                                 for m in ("attention.self.query", "intermediate.dense"))


@pytest.mark.slow
def test_drop_pooler_leaves_out_pooler_and_nsp_head_and_nothing_else(tmp_path):
    """POR and NeuBA train the pooler, which no purify loss reaches: `recipe.drop_pooler` leaves
    it (and the NSP head on it) out of the export, and `transformers` initializes it fresh."""
    hf_dir, aux = _tiny_setup(tmp_path, kind="BertForPreTraining")
    purify.run(_config(hf_dir, aux), str(tmp_path / "kept"))
    purify.run(_config(hf_dir, aux, recipe__drop_pooler=True),
                              str(tmp_path / "dropped"))
    kept = load_file(str(tmp_path / "kept" / "hf" / "model.safetensors"))
    dropped = load_file(str(tmp_path / "dropped" / "hf" / "model.safetensors"))
    gone = {k for k in kept if k.startswith(("bert.pooler.", "cls.seq_relationship."))}
    assert len(gone) == 4  # pooler and NSP head, weight and bias each
    assert set(dropped) == set(kept) - gone
    for key, value in dropped.items():  # the same run otherwise: the pooler feeds no loss
        np.testing.assert_allclose(value, kept[key], atol=1e-6, err_msg=key)
    config = json.loads((tmp_path / "dropped" / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    _, info = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / "dropped" / "hf"), num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                         "classifier.weight", "classifier.bias"}


def test_head_warmup_trains_the_mlm_head_alone_before_the_run(tmp_path):
    """`recipe.head_warmup_steps`: the MLM head alone learns the MLM loss first (DIR/head_warmup);
    the encoder is untouched by it, and the run then starts from a head that reads the states."""
    hf_dir, aux = _tiny_setup(tmp_path)
    purify.run(_config(hf_dir, aux), str(tmp_path / "plain"))
    purify.run(_config(hf_dir, aux, recipe__head_warmup_steps=12, recipe__head_warmup_lr=1e-2),
               str(tmp_path / "warm"))
    warm = [json.loads(r) for r in (tmp_path / "warm" / "head_warmup" / "metrics.jsonl")
            .read_text().splitlines()]
    assert [r["step"] for r in warm] == list(range(1, 13))
    _, loaded = hf.load_pretrained(hf_dir)
    _, warmed, step = checkpoint.restore_params(tmp_path / "warm" / "head_warmup")
    assert step == 12
    changed = {name for name, value in hf.named_params(warmed, "bert").items()
               if not np.array_equal(np.asarray(value),
                                     np.asarray(hf.named_params(loaded, "bert")[name]))}
    assert changed and all(name.startswith("cls.predictions.") for name in changed), changed

    def first_mlm_loss(run):  # static masks: step 1 sees the same masked batch in both runs
        return json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])[
            "mlm_loss"]

    assert first_mlm_loss("warm") < first_mlm_loss("plain") - 0.2  # measured: 9.80 vs 10.23


def test_head_warmup_rejects_negative_values(tmp_path):
    for key in ("head_warmup_steps", "head_warmup_lr"):
        config = _config("model", tmp_path / "aux.txt").unlock()
        config.recipe[key] = -1
        with pytest.raises(ValueError, match="recipe.head_warmup"):
            purify.validate(config)
    config = _config("model", tmp_path / "aux.txt").unlock()
    config.recipe.head_warmup_steps, config.recipe.mlm = 10, False
    with pytest.raises(ValueError, match="recipe.mlm=False"):
        purify.validate(config)
