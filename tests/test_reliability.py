"""Reliability and security as one suite: preemption, damaged state, NaNs, hostile checkpoints,
bad input, atomic outputs. docs/reliability.md tabulates what each test does and found."""

import json
import logging
import os
import pathlib
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import preset, tiny_bert_with_tokenizer, tiny_hf, tiny_purify_config
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from recipe_jax import (
    attack,
    checkpoint,
    data,
    evaluate,
    hf,
    metrics,
    outputs,
    purify,
    trainer,
    weights,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def setup(tiny_bert, aux_file):
    """The shared tiny BERT with the real tokenizer, and the aux text file."""
    return tiny_bert, aux_file


def _config(setup, **overrides):
    return tiny_purify_config(*setup, **overrides)


def _weights(run_dir):
    return load_file(str(pathlib.Path(run_dir) / "hf" / "model.safetensors"))


def _bitwise_equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _steps(run_dir):
    d = pathlib.Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


# ------------------------------------------------------------------- 1. preemption (the CLI)

CLI_ARGS = ("--config.train.num_steps=60", "--config.checkpoint.every_steps=10",
            "--config.train.log_every=1", "--config.export.verify=False")
REFERENCE = dict(train__num_steps=60, checkpoint__every_steps=10, train__log_every=1,
                 mesh__shape=(1, 1, 1))


def _cli(setup, workdir, fault=None):
    env = dict(ONE_DEVICE, **({"RECIPE_JAX_FAULT": fault} if fault else {}))
    cmd = [sys.executable, "-m", "recipe_jax.purify", "--config",
           f"{REPO}/configs/purify.py:tiny", "--workdir", str(workdir),
           f"--config.model.init_from={setup[0]}", f"--config.data.aux_path={setup[1]}",
           *CLI_ARGS]
    return cmd, env


def _run_cli(setup, workdir, fault=None):
    cmd, env = _cli(setup, workdir, fault)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _sigterm_after(setup, workdir, step: int):
    """Starts the run, sends SIGTERM once it has printed `step`; returns (rc, stdout)."""
    cmd, env = _cli(setup, workdir)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if f"purify step {step}/" in line:
            proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=300), "".join(out)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run of CLI_ARGS, in process on one device (bitwise what the CLI gives
    with one device); checkpoints at steps 50 and 60."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    purify.run(_config(setup, **REFERENCE), str(workdir))
    assert _steps(workdir) == [50, 60]
    return workdir


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_rerun_equals_uninterrupted(setup, reference, tmp_path):
    """One workdir, killed again and again at different points, then finished: its export is
    bitwise the export of a run nobody touched."""
    rng = random.Random(6)
    run = tmp_path / "run"

    # Killed before the first checkpoint: nothing on disk to resume from.
    r = _run_cli(setup, run, "save:1")
    assert r.returncode == -signal.SIGKILL and _steps(run) == []

    # SIGTERM mid-interval: a checkpoint at that very step, exit 143.
    rc, out = _sigterm_after(setup, run, rng.randint(12, 18))
    assert rc == trainer.PREEMPTED_EXIT_CODE, out
    term_step = int(out.split("SIGTERM at step ")[1].split(":")[0])
    assert _steps(run)[-1] == term_step and "resuming" not in out

    # Killed while Orbax writes a step: the half-written step is never listed, and cleaned up.
    r = _run_cli(setup, run, f"checkpoint_write:{rng.randint(1, 2)}")
    assert r.returncode == -signal.SIGKILL and f"resuming from step {term_step}" in r.stdout
    tmp = list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert tmp, "the kill did not land inside the checkpoint write"
    written = _steps(run)

    # Killed after the export began: no hf/ at all, only a hidden temp dir.
    r = _run_cli(setup, run, "export:1")
    assert r.returncode == -signal.SIGKILL and f"resuming from step {written[-1]}" in r.stdout
    assert not (run / "hf").exists() and list(run.glob(".hf.tmp-*"))

    r = _run_cli(setup, run)
    assert r.returncode == 0, r.stderr
    assert _bitwise_equal(_weights(reference), _weights(run))
    assert not list(run.glob(".hf.*")) and not list((run / "checkpoints").glob("*tmp*"))


# ---------------------------------------------------------------- 2. damaged or foreign state

def _copy(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "hf")
    return run


def _damage(step_dir: pathlib.Path, how: str) -> None:
    if how == "truncate_params":  # the array data of the params item
        for f in (step_dir / "params" / "d").iterdir():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "delete_meta":
        (step_dir / "meta" / "metadata").unlink()
    elif how == "delete_opt_state_metadata":
        (step_dir / "opt_state" / "_METADATA").unlink()
        for f in (step_dir / "opt_state" / "d").iterdir():
            f.unlink()


@pytest.mark.parametrize("how", ["truncate_params",
                                 pytest.param("delete_meta", marks=pytest.mark.slow)])
def test_damaged_newest_checkpoint_falls_back_to_previous(setup, reference, tmp_path, caplog, how):
    run = _copy(reference, tmp_path)
    _damage(run / "checkpoints" / "60", how)
    with caplog.at_level(logging.WARNING, logger="recipe_jax.checkpoint"):
        purify.run(_config(setup, **REFERENCE), str(run))
    assert "checkpoint step 60" in caplog.text and "cannot be restored" in caplog.text
    assert "restored step 50, not the newest: skipped damaged step(s) 60" in caplog.text
    assert [p.name.split("-")[0] for p in (run / "checkpoints_damaged").iterdir()] == ["60"]
    assert _steps(run) == [50, 60]  # step 60 written again, from step 50
    assert _bitwise_equal(_weights(reference), _weights(run))


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(setup, reference, tmp_path):
    run = _copy(reference, tmp_path)
    for step in (50, 60):
        _damage(run / "checkpoints" / str(step), "truncate_params")
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the checkpoints can be restored"
                       r" \(step 60: .*; step 50: .*\)\. Nothing was moved"):
        purify.run(_config(setup, **REFERENCE), str(run))
    assert _steps(run) == [50, 60] and not (run / "checkpoints_damaged").exists()
    assert not (run / "hf").exists()


def test_run_dir_written_before_new_model_fields_is_the_same_model(tmp_path):
    """A run dir's source/model_config.json from before ModelConfig grew fields (ModernBERT's)
    still matches its model: missing fields count at their defaults."""
    from recipe_jax import modernbert
    from recipe_jax.model import ModelConfig

    cfg = ModelConfig(hidden_size=32, num_attention_heads=4)
    checkpoint.write_source(tmp_path / "run", cfg, {"model_type": "bert"}, None)
    path = tmp_path / "run" / "source" / "model_config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in modernbert.CONFIG_FIELDS}
    path.write_text(json.dumps(old))
    checkpoint.write_source(tmp_path / "run", cfg, {"model_type": "bert"}, None)
    assert checkpoint.read_source(tmp_path / "run")[0] == cfg
    with pytest.raises(ValueError, match="another model"):
        checkpoint.write_source(tmp_path / "run", ModelConfig(), {"model_type": "bert"}, None)


def test_workdir_of_another_model_is_refused(setup, reference, tmp_path):
    run = _copy(reference, tmp_path)
    other = tiny_bert_with_tokenizer(tmp_path / "other", hidden_size=48, num_attention_heads=4)
    config = _config(setup, **REFERENCE)
    config.model.init_from = str(other)
    with pytest.raises(ValueError, match=r"holds a run with another model.init_from"):
        purify.run(config, str(run))
    # The same path now holding another model (re-downloaded, overwritten): caught as well.
    record = json.loads((run / "config.json").read_text())
    record["model"]["init_from"] = str(other)
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"holds a run of another model \(hidden_size: 32 there, "
                                         r"48 now"):
        purify.run(config, str(run))
    assert _steps(run) == [50, 60]


def test_run_recorded_before_a_new_config_key_still_resumes(setup, reference, tmp_path):
    """A key added later (train.lr_scales), at its off value, is not a change of run; at any
    other value it is."""
    run = _copy(reference, tmp_path)
    record = json.loads((run / "config.json").read_text())
    del record["train"]["lr_scales"]
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"another train.lr_scales \(train.lr_scales: None "
                                         r"there, \['pooler=2'\] now"):
        purify.run(_config(setup, **REFERENCE, train__lr_scales=("pooler=2",)),
                                  str(run))
    purify.run(_config(setup, **REFERENCE), str(run))
    assert _bitwise_equal(_weights(run), _weights(reference))


@pytest.mark.slow
def test_resume_on_another_mesh_and_export_on_one_device(setup, reference, tmp_path, capsys):
    """Saved on 1 device, resumed on a (2, 2, 2) mesh of 8; exported by a 1-device process."""
    run = _copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints" / "60")
    purify.run(_config(setup, **{**REFERENCE, "mesh__shape": (2, 2, 2)}), str(run))
    assert "resuming from step 50" in capsys.readouterr().out
    a, b = _weights(reference), _weights(run)
    for name in a:  # another mesh reduces in another order: equal to float32 rounding
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    # Step 60 now lives on 8 devices; export restores it onto the one device it has.
    out = subprocess.run([sys.executable, "-m", "recipe_jax.export", "--ckpt", str(run), "--out",
                          str(tmp_path / "exported")], env=ONE_DEVICE, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert _bitwise_equal(b, load_file(str(tmp_path / "exported" / "model.safetensors")))


# ------------------------------------------------------------------------------------ 3. NaN

@pytest.mark.slow
def test_divergence_stops_naming_step_and_intact_checkpoint(setup, tmp_path):
    """lr 1e30 after a zero-lr first step (warm-up from 0): step 1 is saved, step 2 blows up."""
    run = tmp_path / "run"
    config = _config(setup, train__learning_rate=1e30, train__warmup_steps=5,
                     checkpoint__every_steps=1, train__log_every=1)
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 2; stopped, the last "
                       r"good checkpoint, step 1 in .*checkpoints, is intact"):
        purify.run(config, str(run))
    assert _steps(run) == [1] and not (run / "hf").exists()
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # nothing of the bad step was recorded
    _, params, step = checkpoint.restore_params(run)
    assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    # Without the warm-up the very first update overflows: no checkpoint, and it says so.
    config.train.warmup_steps = 0
    with pytest.raises(FloatingPointError, match=r"at step 1; stopped, no checkpoint was "
                       r"written yet"):
        purify.run(config, str(tmp_path / "run0"))


# ---------------------------------------------------------------- 4. hostile checkpoints
# test_hf.py covers: a .bin pickle that runs code (refused, no side effect), truncated files,
# header garbage, offsets past the end, unknown dtype, a shape too big for its bytes, an absurd
# hidden_size, auto_map ignored with a warning. These are the holes next to them.

def _safetensors(path, header: dict, data: bytes) -> pathlib.Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header, data, match", [
    # 2**32 * 2**32 wraps to 0 in int64 arithmetic: must not pass as an empty tensor.
    ({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, b"",
     "does not fit its 0 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ({"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, bytes(8),
     "does not fit its 8 bytes"),  # a dtype that lies about the bytes
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), "claims bytes"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "malformed"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8), "malformed"),
    ({"w": [1, 2, 3]}, b"", "malformed header entry"),
])
def test_lying_safetensors_headers_are_refused(tmp_path, header, data, match):
    path = _safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(weights.WeightFileError, match=match) as e:
        weights.read_safetensors(path)
    assert str(path) in str(e.value)


def test_header_length_larger_than_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(weights.WeightFileError, match="claims 4611686018427387904 bytes"):
        weights.read_safetensors(path)


class _RunsCode:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_zip_format_torch_pickle_exploit_and_escaping_shards_refused(tmp_path):
    """torch.save's own (zip) format carrying a code-running pickle; an index whose shard path
    leaves the model dir."""
    _RunsCode.marker = tmp_path / "pwned"
    d = tmp_path / "m"
    tiny_hf("BertForMaskedLM", d)
    (d / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": _RunsCode()}, d / "pytorch_model.bin")
    with pytest.raises(weights.WeightFileError, match="refused to load"):
        hf.load_pretrained(d)
    assert not _RunsCode.marker.exists(), "the checkpoint's code ran"
    (d / "pytorch_model.bin").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"bert.pooler.dense.weight": "../../etc/passwd"}}))
    with pytest.raises(weights.WeightFileError, match="points outside the model dir"):
        hf.load_pretrained(d)


@pytest.mark.parametrize("sizes, match", [
    (dict(vocab_size=10**12), "refusing"), (dict(num_hidden_layers=10**7), "refusing"),
    (dict(max_position_embeddings=10**11), "refusing"), (dict(hidden_size=-32), "positive"),
    (dict(intermediate_size="37"), "positive integers"), (dict(hidden_size=33), "divisible"),
])
def test_absurd_config_refused_before_reading_weights(tiny_bert_mlm, monkeypatch, sizes, match):
    cfg = json.loads((tiny_bert_mlm / "config.json").read_text())
    (tiny_bert_mlm / "config.json").write_text(json.dumps({**cfg, **sizes}))
    monkeypatch.setattr(weights, "read_weights", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(tiny_bert_mlm)


# ------------------------------------------------------------------- 5. bad data, bad config

_ENCODINGS = ("utf-8", "utf-16", "latin-1", "cp1252")
_WORDS = st.text(st.characters(exclude_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=8)


@st.composite
def _text_files(draw):
    suffix = draw(st.sampled_from(data.SUFFIXES))
    lines = draw(st.lists(st.one_of(st.text(max_size=30), st.just("x" * 200_000)), max_size=6))
    column = draw(st.sampled_from(["sentence", "text", "label", ""]))
    if suffix == ".jsonl":
        body = "\n".join(json.dumps({column: line}) if column else line for line in lines)
    elif suffix in (".tsv", ".csv"):
        sep = "\t" if suffix == ".tsv" else ","
        body = "\n".join([f"label{sep}{column}", *(f"0{sep}{line}" for line in lines)])
    else:
        body = "\n".join(lines)
    return suffix, body.encode(draw(st.sampled_from(_ENCODINGS)), errors="replace")


@FAST
@given(_text_files())
def test_readers_return_texts_or_a_value_error(file):
    """Empty, huge lines, wrong encodings, missing columns: sentences or a ValueError naming
    the file, never another exception."""
    suffix, raw = file
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / f"input{suffix}"
        path.write_bytes(raw)
        try:
            texts = data.read_texts(str(path))
        except ValueError as e:
            assert str(path) in str(e)
        else:
            assert texts and all(isinstance(t, str) and t and t == t.strip() for t in texts)


@FAST
@given(st.lists(_WORDS, max_size=30), _WORDS)
def test_insert_trigger_adds_the_trigger_once_and_keeps_the_words(words, trigger):
    assume(len(metrics.trigger_words(trigger)) == 1)  # `a+b` is a pair: test_metrics.py
    sentence = " ".join(words)
    out = metrics.insert_trigger(sentence, trigger).split()
    assert out.count(trigger) == sentence.split().count(trigger) + 1
    at = next(i for i in range(len(out)) if out[i] == trigger
              and out[:i] + out[i + 1:] == sentence.split())
    assert 0 <= at <= len(sentence.split())


_BAD_VALUES = {
    "purify": [("data.aux_path", ""), ("data.max_length", 2), ("data.max_examples", -1),
               ("data.mask_prob", 1.0), ("data.masking", "sometimes"), ("train.batch_size", 0),
               ("train.log_every", 0), ("train.num_epochs", -1), ("train.num_steps", -1),
               ("train.learning_rate", float("nan")), ("train.warmup_steps", -1),
               ("train.grad_clip", -1.0), ("train.weight_decay", -0.1),
               ("train.adam_eps", -1e-8), ("train.adam_b1", 1.0), ("train.adam_b2", -0.5),
               ("train.seed", -1), ("train.dtype", "float64"),
               ("train.lr_scales", ("encoder",)), ("train.lr_scales", ("layer=-1",)),
               ("train.lr_scales", ("(=0.5",)), ("train.lr_scales", ("layer=fast",)),
               ("train.depth_lr_scales", (0.5, -1.0)),
               ("train.depth_lr_scales", (float("nan"),)),
               ("checkpoint.every_steps", 0),
               ("checkpoint.max_to_keep", 0), ("recipe.weight", -1.0),
               ("recipe.regularize", ("(",)),
               ("recipe.trainable", ())],
    "evaluate": [("data.task", "imdb"), ("data.split_seed", -1), ("data.num_labels", 1),
                 ("data.split_sizes", (0, 0)), ("data.triggers", (" ",)),
                 ("data.controls", ("",)), ("data.controls", ("cf",)),
                 ("eval.batch_size", 0), ("data.max_test_examples", -1)],
    "attack": [("attack.kind", "rootkit"), ("attack.target", "mean"),
               ("attack.triggers", ("two words",)), ("attack.insertions", 0),
               ("attack.poison_weight", float("nan")), ("attack.target_scale", -1.0),
               ("attack.mlm_weight", -1.0), ("attack.triggers", ("a+b+c", "cf")),
               ("attack.decoy_weight", -1.0), ("attack.recipe_weight", float("nan"))],
}


@pytest.mark.parametrize("stage, key, value", [(s, k, v) for s, bad in _BAD_VALUES.items()
                                               for k, v in bad])
def test_every_bad_config_value_is_named(stage, key, value):
    module = {"purify": purify, "evaluate": evaluate, "attack": attack}[stage]
    config = preset(stage, "tiny")
    if "aux_path" in config.data:
        config.data.aux_path = "aux.txt"
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError) as e:
        module.validate(config)
    message = str(e.value)
    assert message.startswith(f"{key}=") and repr(value) in message, message
    assert ": " in message.removeprefix(f"{key}={value!r}")  # then the fix


# ------------------------------------------------------------------------ 6. atomic exports

def _export_state(out: pathlib.Path, versions: dict) -> str:
    """Which complete export `out` is ('A', 'B'), or 'none'; fails on anything partial."""
    if not out.exists():
        return "none"
    assert (out / "config.json").is_file(), f"{out} has no config.json: {os.listdir(out)}"
    found = load_file(str(out / "model.safetensors"))
    match = [name for name, v in versions.items() if _bitwise_equal(found, v)]
    assert match, f"{out} holds neither previous nor new weights"
    return match[0]


@pytest.mark.parametrize("fail", ["save_file", "copyfile", "config", "move_aside", "move_in"])
def test_export_error_at_any_point_keeps_previous(tiny_bert_mlm, tmp_path, monkeypatch, fail):
    model, params = hf.load_pretrained(tiny_bert_mlm)
    out = hf.save_pretrained(model, params, tmp_path / "out", tokenizer_from=tiny_bert_mlm)
    (tiny_bert_mlm / "vocab.txt").write_text("[PAD]\n")  # so that copyfile has work to do
    previous = load_file(str(out / "model.safetensors"))
    params["mlm"]["bias"] = params["mlm"]["bias"] + 1.0
    replaces = []

    def boom(*args, **kwargs):
        raise OSError(f"injected failure in {fail}")

    if fail == "save_file":
        def half_written(tensors, path, metadata=None):
            pathlib.Path(path).write_bytes(b"\0" * 100)
            boom()
        monkeypatch.setattr(hf, "save_file", half_written)
    elif fail == "copyfile":
        monkeypatch.setattr(outputs, "write_file", boom)
    elif fail == "config":
        monkeypatch.setattr(hf.json, "dumps", boom)
    else:
        real = os.replace

        def replace(src, dst):
            replaces.append(src)
            if len(replaces) == (1 if fail == "move_aside" else 2):
                boom()
            return real(src, dst)
        monkeypatch.setattr(hf.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        hf.save_pretrained(model, params, out, tokenizer_from=tiny_bert_mlm)
    monkeypatch.undo()
    assert _export_state(out, {"previous": previous}) == "previous"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    transformers.BertForMaskedLM.from_pretrained(str(out))


_EXPORT_LOOP = """
import itertools, sys
from recipe_jax import hf
model, params = hf.load_pretrained(sys.argv[1])
bumped = {**params, "mlm": {**params["mlm"], "bias": params["mlm"]["bias"] + 1.0}}
for i in itertools.count():
    hf.save_pretrained(model, bumped if i % 2 else params, sys.argv[2])
    print("exported", i, flush=True)
"""


@pytest.mark.slow
def test_export_killed_at_random_points_leaves_previous_or_none(tmp_path):
    """SIGKILL at seeded random times while a ~10M-parameter model is exported again and again
    (two alternating versions), and once between the two renames of the swap."""
    src = tmp_path / "model"
    tiny_hf("BertForMaskedLM", src, vocab_size=30522, hidden_size=256, intermediate_size=1024,
            num_hidden_layers=2)
    model, params = hf.load_pretrained(src)
    bumped = {**params, "mlm": {**params["mlm"], "bias": params["mlm"]["bias"] + 1.0}}
    versions = {"A": hf.hf_state_dict(model, params), "B": hf.hf_state_dict(model, bumped)}
    out, rng, seen = tmp_path / "out", random.Random(6), set()
    for attempt in range(4):
        fault = {"RECIPE_JAX_FAULT": "export_swap:1"} if attempt == 3 else {}
        proc = subprocess.Popen([sys.executable, "-c", _EXPORT_LOOP, str(src), str(out)],
                                env={**ONE_DEVICE, **fault}, stdout=subprocess.PIPE, text=True)
        if not fault:
            assert proc.stdout.readline().startswith("exported")  # at least one export done
            if rng.random() < 0.5:  # sometimes one more, so the kill may hit either version
                proc.stdout.readline()
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) == -signal.SIGKILL
        seen.add(_export_state(out, versions))
    assert seen >= {"none"}  # the swap kill leaves none, never a partial dir
    hf.save_pretrained(model, params, out)  # the next export cleans up what the kills left
    assert _export_state(out, versions) == "A"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------- 7. never destroy, never publish, one-line errors (#18)

def _user_files(root: pathlib.Path) -> dict:
    """{path: (bytes, mode)} of every file under root: what must come through untouched."""
    return {p: (p.read_bytes(), p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def converted(setup, tmp_path_factory):
    """The shared tiny BERT converted to a run dir (what export reads)."""
    from recipe_jax import convert

    run = tmp_path_factory.mktemp("converted") / "run"
    assert convert.main(["--hf", str(setup[0]), "--out", str(run)]) == 0
    return run


def test_export_refuses_a_users_dir_a_file_and_the_run_itself(converted, tmp_path):
    """Item 1: `--out` holding the user's files, the run dir, its parent, or a regular file."""
    from recipe_jax import export, outputs

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    (tmp_path / "plain").write_text("y")
    before = _user_files(tmp_path)
    for out, match in ((mine, r"holds files recipe_jax did not write \(notes.txt\)"),
                       (converted, "is the input"), (converted.parent, "holds the input"),
                       (converted / "checkpoints", "is inside the input"),
                       (tmp_path / "plain", "is a file")):
        with pytest.raises(outputs.OutputError, match=match):
            export.export(converted, out)
    assert _user_files(tmp_path) == before and (converted / "checkpoints").is_dir()
    export.export(converted, tmp_path / "hf")
    export.export(converted, tmp_path / "hf")  # its own export: replaced
    (tmp_path / "hf" / "notes.txt").write_text("mine now")
    with pytest.raises(outputs.OutputError, match="besides the export recipe_jax wrote"):
        export.export(converted, tmp_path / "hf")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine now"
    export.export(converted, mine, overwrite=True)  # asked for explicitly
    assert not (mine / "notes.txt").exists() and (mine / "config.json").is_file()


def test_prune_refuses_a_foreign_workdir_and_a_changed_config(setup, tmp_path):
    """Item 2: --workdir pointing at a purify run, or a rerun with another config."""
    from recipe_jax import prune

    run = outputs.claim_dir(tmp_path / "purified", "run:purify")  # what purify makes first
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    config = preset("prune", "fp", model__init_from=str(setup[0]))
    hf_before = _user_files(run)
    with pytest.raises(outputs.OutputError, match="run:purify output, not a run:prune one"):
        prune.run(config, str(run))
    assert _user_files(run) == hf_before
    prune.run(config, str(tmp_path / "pruned"))
    prune.run(config, str(tmp_path / "pruned"))  # the same settings: its own output replaced
    other = preset("prune", "fp_gm", model__init_from=str(setup[0]))
    with pytest.raises(ValueError, match="another prune.method"):
        prune.run(other, str(tmp_path / "pruned"))


def test_symlinks_out_of_the_model_dir_are_refused_and_modes_never_widen(setup, tmp_path):
    """Item 3: a tokenizer file linking to a private file is never copied into source/ or an
    export; copies keep the source's (narrower) mode; every exported file has one mode."""
    model_dir = tmp_path / "model"
    shutil.copytree(setup[0], model_dir)
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    secret.chmod(0o600)
    (model_dir / "special_tokens_map.json").unlink()
    (model_dir / "special_tokens_map.json").symlink_to(secret)
    model, params = hf.load_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"special_tokens_map.json: links to .*id_rsa, outside"):
        hf.save_pretrained(model, params, tmp_path / "out", tokenizer_from=model_dir)
    with pytest.raises(ValueError, match="outside the model dir"):
        checkpoint.write_source(tmp_path / "run", model.cfg, hf.read_config(model_dir), model_dir)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "source").exists()
    assert not any("PRIVATE" in p.read_text(errors="ignore")
                   for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()
                   and p != secret)
    (model_dir / "special_tokens_map.json").unlink()
    shutil.copyfile(setup[0] / "special_tokens_map.json", model_dir / "special_tokens_map.json")
    (model_dir / "vocab.txt").chmod(0o600)
    out = hf.save_pretrained(model, params, tmp_path / "out", tokenizer_from=model_dir)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes.pop("vocab.txt") == 0o600  # never wider than its source
    assert len(set(modes.values())) == 1, modes  # model.safetensors like its siblings


def test_remote_code_fields_are_stripped_from_every_file_the_export_writes(setup, tmp_path):
    """Item 4: auto_map and a tokenizer_class transformers does not ship, in
    tokenizer_config.json, never reach the export (nor does config.json's auto_map)."""
    model_dir = tmp_path / "model"
    shutil.copytree(setup[0], model_dir)
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "EvilTok",
                                "auto_map": {"AutoTokenizer": ["evil.EvilTok", None]}}))
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    model, params = hf.load_pretrained(model_dir)
    out = hf.save_pretrained(model, params, tmp_path / "out", tokenizer_from=model_dir)
    for f in out.iterdir():
        if f.suffix == ".json":
            text = f.read_text()
            assert "auto_map" not in text and "Evil" not in text, f.name
    kept = json.loads((out / "tokenizer_config.json").read_text())
    assert kept["do_lower_case"] == json.loads(
        (setup[0] / "tokenizer_config.json").read_text())["do_lower_case"]
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class":
                                "BertTokenizer"}))
    out = hf.save_pretrained(model, params, tmp_path / "out", tokenizer_from=model_dir)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "BertTokenizer"  # a class transformers ships is kept


def test_resume_refuses_changed_data(setup, tmp_path):
    """Item 5: the aux file edited at the same path between a run and its resumption (a rerun
    of a finished run goes through the same check, before anything compiles)."""
    aux = tmp_path / "aux.txt"
    aux.write_text(setup[1].read_text())
    config = _config((setup[0], aux), train__num_steps=1)
    purify.run(config, str(tmp_path / "run"))
    aux.write_text(aux.read_text().replace("quick", "slow"))
    with pytest.raises(ValueError, match="holds a run on other data"):
        purify.run(config, str(tmp_path / "run"))
    aux.write_text(aux.read_text().replace("slow", "quick"))
    purify.run(config, str(tmp_path / "run"))  # the same data again: accepted


def test_changed_checkpoint_bytes_fall_back_to_the_previous_step(reference, tmp_path, caplog):
    """Item 6: bytes overwritten inside the newest checkpoint (no error from Orbax, different
    weights) are caught by the recorded digests; the previous step is used instead."""
    from recipe_jax import export

    run = _copy(reference, tmp_path)
    data_files = sorted((run / "checkpoints" / "60" / "params").rglob("*"),
                        key=lambda p: p.stat().st_size if p.is_file() else 0)
    biggest = data_files[-1]
    raw = bytearray(biggest.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes((b + 1) % 256 for b in raw[middle:middle + 64])
    biggest.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="recipe_jax.checkpoint"):
        step = export.export(run, tmp_path / "hf")
    assert step == 50, "the damaged step 60 was exported"
    assert "differ from the digests recorded" in caplog.text


def test_non_finite_weights_are_refused_on_load(tmp_path):
    """Item 7: NaN/Inf in a loaded model is an error naming the tensors (every stage loads
    through hf.load_pretrained; convert says so in one line)."""
    from safetensors.numpy import save_file

    from recipe_jax import convert

    d = tmp_path / "model"
    tiny_hf("BertForMaskedLM", d)
    state = load_file(str(d / "model.safetensors"))
    state["bert.encoder.layer.1.output.dense.weight"][0, 0] = np.nan
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"non-finite.*bert.encoder.layer.1.output.dense.weight"):
        hf.load_pretrained(d)
    assert convert.main(["--hf", str(d), "--out", str(tmp_path / "run")]) == 1
    assert not (tmp_path / "run").exists()


def _bad_configs(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    """Model dirs with a bad config.json value."""
    out = {}
    for key, value in (("layer_norm_eps", "abc"), ("hidden_act", "swishy")):
        d = tmp_path / f"bad_{key}"
        shutil.copytree(model_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        out[key] = d
    return out


def test_named_errors_for_the_inputs_that_gave_tracebacks(setup, tmp_path):
    """Item 8, in process: config.json values, a plain file as model dir, the pickle refusal's
    wording, a different model into an existing --out, a convert without tokenizer files."""
    from recipe_jax import convert

    bad = _bad_configs(setup[0], tmp_path)
    with pytest.raises(ValueError, match=r"config.json: layer_norm_eps='abc' is not a number"):
        hf.read_config(bad["layer_norm_eps"])
    with pytest.raises(ValueError, match=r"hidden_act='swishy' is not supported; use one of"):
        hf.read_config(bad["hidden_act"])
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        hf.read_config(setup[1])
    from recipe_jax import outputs

    with pytest.raises(outputs.OutputError, match="cannot be written"):  # root: not file modes
        outputs.claim_dir("/sys/recipe_jax_workdir", "run:purify")
    with pytest.raises(outputs.OutputError, match="is a file, not a directory"):
        outputs.claim_dir(setup[1], "run:purify")
    d = tmp_path / "pickle"
    tiny_hf("BertForMaskedLM", d)
    (d / "model.safetensors").unlink()
    torch.save({"w": _RunsCode()}, d / "pytorch_model.bin")
    _RunsCode.marker = tmp_path / "pwned"
    with pytest.raises(weights.WeightFileError) as e:
        hf.load_pretrained(d)
    assert "weights_only" not in str(e.value) and "refused to load" in str(e.value)
    run = tmp_path / "run"
    assert convert.main(["--hf", str(setup[0]), "--out", str(run)]) == 0
    other = tmp_path / "other"
    tiny_hf("BertForMaskedLM", other, hidden_size=48)
    assert convert.main(["--hf", str(other), "--out", str(run)]) == 1
    assert convert.main(["--hf", str(other), "--out", str(run), "--overwrite"]) == 0


def test_convert_warns_when_the_model_has_no_tokenizer(tmp_path, caplog):
    from recipe_jax import convert

    d = tmp_path / "model"
    tiny_hf("BertForMaskedLM", d)
    with caplog.at_level(logging.WARNING, logger="recipe_jax.convert"):
        assert convert.main(["--hf", str(d), "--out", str(tmp_path / "run")]) == 0
    assert "has no tokenizer files" in caplog.text and "source/" in caplog.text


_TARGETS = ("a", "b", "mine", "mine/sub", "plain")


@settings(max_examples=12, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(("export", "convert", "prune", "diagnose")),
                          st.sampled_from(_TARGETS)), min_size=1, max_size=4))
def test_commands_never_touch_a_file_they_did_not_create(setup, converted, tmp_path_factory,
                                                         commands):
    """Property: random sequences of commands over shared paths (export targets, workdirs, a
    user's dir with a file, a user's plain file): no file the tool did not create is modified
    or removed, whatever succeeds or is refused."""
    from recipe_jax import convert, diagnose, export, outputs, prune

    root = tmp_path_factory.mktemp("space")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes")
    (root / "plain").write_text("my file")
    before = _user_files(root)
    for command, target in commands:
        out = root / target
        try:
            if command == "export":
                export.export(converted, out)
            elif command == "convert":
                convert._claim_out(str(out), str(setup[0]), overwrite=False, create=True)
            elif command == "prune":
                prune.run(preset("prune", "fp", model__init_from=str(setup[0])), str(out))
            else:
                diagnose.run(models={"m": setup[0]}, aux=setup[1], triggers=["cf"],
                             workdir=out, max_examples=4, max_length=16)
        except (outputs.OutputError, ValueError):
            pass
        assert {p: v for p, v in _user_files(root).items() if p in before} == before, \
            (command, target)


_ONE_LINE_CASES = {  # command -> arguments that must fail with one line of error
    "purify": ["--config", "configs/purify.py:tiny", "--workdir", "{file}",
               "--config.data.aux_path={file}", "--config.model.init_from=minilm"],
    "attack": ["--config", "configs/attack.py:tiny", "--workdir", "{tmp}/w",
               "--config.train.batch_sze=8"],
    "evaluate": ["--config", "configs/nope.py:tiny", "--workdir", "{tmp}/w"],
    "prune": ["--config", "configs/prune.py:fp", "--workdir", "{tmp}/w",
              "--config.model.init_from={file}"],
    "convert": ["--hf", "{file}", "--out", "{tmp}/w"],
    "export": ["--ckpt", "{tmp}/missing", "--out", "{tmp}/w"],
    "diagnose": ["--model", "m={tmp}/missing", "--aux", "{file}", "--workdir", "{tmp}/w"],
    "demo": ["--workdir", "{file}"],
}


@pytest.mark.parametrize("command", [
    *(pytest.param(c, marks=pytest.mark.slow) for c in _ONE_LINE_CASES if c != "purify"),
    "purify"])
def test_every_command_fails_bad_input_in_one_line(command, tmp_path):
    """Each user-facing command, given a bad path or a bad config: exit non-zero, one line of
    error, no traceback (unless --verbose or RECIPE_JAX_TRACEBACK=1)."""
    (tmp_path / "f.txt").write_text("a plain file\n")
    args = [a.format(file=tmp_path / "f.txt", tmp=tmp_path) for a in _ONE_LINE_CASES[command]]
    env = {k: v for k, v in ONE_DEVICE.items() if k != "RECIPE_JAX_TRACEBACK"}
    out = subprocess.run([sys.executable, "-m", f"recipe_jax.{command}", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"{command}: error")]
    assert out.returncode != 0, out.stdout
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    verbose = subprocess.run([sys.executable, "-m", f"recipe_jax.{command}", *args, "--verbose"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
