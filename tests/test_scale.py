"""Scale: two processes equal one, AOT compile of a bert-large step, streamed data, launchers."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from conftest import SENTENCES, preset, tiny_bert_with_tokenizer, tiny_purify_config
from safetensors.numpy import load_file

from recipe_jax import data, purify, sharding, sharding_report, streaming, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BertForMaskedLM whose hidden (32) and FFN (64) dims split over 4 and 8 devices."""
    d = tmp_path_factory.mktemp("tiny")
    hf_dir = tiny_bert_with_tokenizer(d / "model", hidden_size=32, intermediate_size=64)
    aux = d / "aux.txt"
    aux.write_text("\n".join(SENTENCES) + "\n")
    return hf_dir, aux


_config = tiny_purify_config


def _results(workdir):
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], load_file(str(workdir / "hf" / "model.safetensors"))


def _assert_same_run(a, b, atol):
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    np.testing.assert_allclose(losses_a, losses_b, rtol=0, atol=atol)
    assert set(weights_a) == set(weights_b)
    for name, value in weights_a.items():
        np.testing.assert_allclose(weights_b[name], value, rtol=0, atol=atol, err_msg=name)


# ------------------------------------------------------------------------------- multi-host

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_two(hf_dir, aux, workdir, *overrides):
    """purify as 2 local processes of 4 CPU devices each, one coordinator on a free port."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    return [subprocess.Popen(
        [sys.executable, "-m", "recipe_jax.purify", "--config", f"{REPO}/configs/purify.py:tiny",
         "--workdir", str(workdir), f"--config.model.init_from={hf_dir}",
         f"--config.data.aux_path={aux}", "--config.export.verify=False", *overrides,
         f"--config.distributed.coordinator_address=localhost:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_process_of_eight(tiny, tmp_path):
    """purify as 2 processes x 4 CPU devices (jax.distributed, local coordinator) ends with the
    exported weights of 1 process x 8 devices; only process 0 logs and writes outputs."""
    hf_dir, aux = tiny
    mesh = "--config.mesh.shape=(2, 4, 1)"  # fsdp within a process, data across processes
    workdir = tmp_path / "two"
    procs = _launch_two(hf_dir, aux, workdir, mesh)
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(
        f"process {i}:\n{out[-3000:]}" for i, out in enumerate(outs))
    assert "purify step 6/6" in outs[0] and "2 process(es)" in outs[0]
    assert "purify step" not in outs[1] and "exported" not in outs[1]  # process 0 only

    one = tmp_path / "one"
    purify.run(_config(hf_dir, aux, mesh__shape=(2, 4, 1)), str(one))
    assert len(jax.devices()) == 8
    _assert_same_run(_results(one), _results(workdir), atol=1e-5)
    assert json.loads((workdir / "summary.json").read_text())["step"] == 6


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_checkpointed_step(tiny, tmp_path):
    """Only process 1 gets SIGTERM; JAX's preemption sync point makes both processes save the
    same step and exit 143 (no process left waiting in a collective)."""
    hf_dir, aux = tiny
    workdir = tmp_path / "two"
    procs = _launch_two(hf_dir, aux, workdir, "--config.mesh.shape=(2, 4, 1)",
                        "--config.train.num_steps=100000", "--config.train.log_every=1",
                        "--config.checkpoint.every_steps=100000")
    try:
        for line in procs[0].stdout:  # wait until training runs
            if "purify step 3/" in line:
                break
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], outs[0][-2000:] + outs[1][-2000:]
    steps = [int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()]
    assert len(steps) == 1 and 3 < steps[0] < 100000
    assert f"SIGTERM at step {steps[0]}: checkpoint saved" in outs[0]


def test_initialize_distributed_without_settings_is_a_no_op():
    config = preset("purify", "tiny")
    sharding.initialize_distributed(config.distributed)
    assert jax.process_count() == 1
    config.distributed.coordinator_address = "localhost:1"
    config.distributed.process_id = 2
    with pytest.raises(ValueError, match="process_id=2 with num_processes=1"):
        sharding.initialize_distributed(config.distributed)


# ------------------------------------------------------------------------------------- AOT

def test_aot_report_of_a_tiny_step_on_eight_devices():
    """sharding_report compiles the dynamic-mask strong step of a tiny model on (2, 4, 1) from
    abstract state, and reports per-device bytes below the totals."""
    config = preset("purify", "strong")
    cfg = sharding_report.ModelConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64)
    mesh = sharding.make_mesh((2, 4, 1))
    compiled, state, frozen, seconds = sharding_report.compile_purify_step(config, cfg, mesh)
    numbers = sharding_report.report(state, frozen, mesh)
    assert 0 < numbers["params_per_device_mib"] < numbers["params_total_mib"]
    assert 0 < numbers["opt_state_per_device_mib"] < numbers["opt_state_total_mib"]
    assert compiled.memory_analysis() is not None and seconds > 0


@pytest.mark.parametrize("family", ["distilbert", "electra", "modernbert", "deberta-v2"])
def test_aot_report_of_each_family_at_base_size(family, capsys):
    """`sharding_report --family` compiles the strong preset's step for the family's base-size
    config on (data=2, fsdp=4): parameters and Adam moments land 1/4 per device."""
    numbers = sharding_report.main(["--family", family, "--preset", "strong", "--mesh", "2,4,1"])
    assert f"{family} " in capsys.readouterr().out
    assert numbers["params_total_mib"] > 200  # 66M (DistilBERT) ... 185M (DeBERTa) float32
    assert numbers["params_per_device_mib"] < numbers["params_total_mib"] / 3.9
    assert numbers["opt_state_per_device_mib"] < numbers["opt_state_total_mib"] / 3.9


@pytest.mark.slow
def test_aot_compile_of_bert_large_step_shards_params_and_optimizer_state():
    """The bert preset's step for a bert-large-sized model compiles on a (data=2, fsdp=4) mesh
    from abstract state only, and each device holds 1/4 of every big matrix and of its Adam
    moments."""
    config = preset("purify", "bert")
    cfg = sharding_report.ModelConfig(**sharding_report.BERT_LARGE)
    mesh = sharding.make_mesh((2, 4, 1))
    compiled, state, frozen, seconds = sharding_report.compile_purify_step(config, cfg, mesh)
    params = trainer.merge_params(state.trainable, frozen)
    big = 0
    for leaf in jax.tree.leaves((params, state.opt_state)):
        if np.prod(leaf.shape) >= 1024 * 1024:  # every matrix (embeddings, FFN, attention)
            per_device = sharding.abstract_bytes_per_device(leaf, mesh)
            assert set(per_device.values()) == {sharding.total_bytes(leaf) // 4}, leaf.shape
            big += 1
    # 6 matrices a layer, word embeddings, the MLM head's dense, 2 Adam moments a FFN weight.
    assert big == 24 * 6 + 2 + 24 * 2

    numbers = sharding_report.report(state, frozen, mesh)
    assert numbers["params_total_mib"] > 1200  # ~335M float32 parameters
    assert numbers["params_per_device_mib"] < numbers["params_total_mib"] / 3.9
    assert numbers["opt_state_per_device_mib"] == pytest.approx(
        numbers["opt_state_total_mib"] / 4)
    # XLA's own view of what one device receives: sharded params + optimizer state + batch.
    arguments_mib = compiled.memory_analysis().argument_size_in_bytes / 2 ** 20
    expected = numbers["params_per_device_mib"] + numbers["opt_state_per_device_mib"]
    assert expected <= arguments_mib < expected + 1
    print(f"bert-large AOT: {numbers}, compile {seconds:.1f} s")


# ------------------------------------------------------------------------- streamed data

def _write(path, lines):
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


@pytest.mark.parametrize("kind", [".txt", ".tsv", ".jsonl"])
def test_text_index_yields_what_read_texts_reads(tmp_path, kind):
    texts = ["  first sentence ", "", "second\tone" if kind != ".tsv" else "second",
             "ünïcode ✓", "   ", "last"]
    if kind == ".txt":
        lines = ["\ufeff" + texts[0], *texts[1:]]
    elif kind == ".tsv":
        lines = ["label\tsentence", *[f"1\t{t}" if t else "" for t in texts]]
    else:
        lines = [json.dumps({"text": t}) if t else "" for t in texts]
    path = _write(tmp_path / f"aux{kind}", lines)
    index = streaming.TextIndex(path)
    assert list(index) == data.read_texts(str(path)) == [t.strip() for t in texts if t.strip()]
    assert index[3] == "last" and index[-1] == "last" and index[1:3] == list(index)[1:3]
    assert list(streaming.TextIndex(path, max_examples=2)) == data.read_texts(str(path),
                                                                            max_examples=2)


def test_text_index_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data.streaming=False"):
        streaming.TextIndex(_write(tmp_path / "a.csv", ["sentence", "x"]))
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        streaming.TextIndex(_write(tmp_path / "a.jsonl", ['{"text": "x"}', "{oops"]))
    with pytest.raises(ValueError, match="no 'sentence' or 'text' column"):
        streaming.TextIndex(_write(tmp_path / "a.tsv", ["a\tb", "1\t2"]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        streaming.TextIndex(tmp_path / "missing.txt")


def test_streamed_batches_are_deterministic_and_process_slices_disjoint_and_covering(tiny):
    hf_dir, aux = tiny
    source, _ = streaming.prepare(_config(hf_dir, aux, data__masking="dynamic"),
                                  streaming.TextIndex(aux), hf_dir, 30522)
    enc = data.tokenize(data.load_tokenizer(hf_dir), data.read_texts(str(aux)), 16)
    n, batch = len(source), 12
    for step in (0, 5, 8, 13):  # crosses an epoch boundary (8 steps an epoch)
        slices = [data.batch_rows(3, step, n, batch, process_index=p, process_count=3)
                  for p in range(3)]
        every = np.concatenate(slices)
        assert (every == data.batch_rows(3, step, n, batch)).all()  # covering, in order
        assert len(set(every.tolist())) == batch  # disjoint
        for rows in slices:
            first, again = source.read(rows), source.read(rows)
            for key, value in enc.items():
                assert (first[key] == value[rows]).all() and (again[key] == first[key]).all()


def test_static_masks_are_per_row_whatever_the_batch(tiny):
    hf_dir, aux = tiny
    source, _ = streaming.prepare(_config(hf_dir, aux), streaming.TextIndex(aux), hf_dir, 30522)
    together = source.read([5, 9, 2, 40])
    for i, row in enumerate([5, 9, 2, 40]):
        alone = source.read([row])
        for key, value in alone.items():
            assert (together[key][i] == value[0]).all(), key
    assert together["weights"].sum() > 0 and set(together) == {
        "input_ids", "attention_mask", "positions", "labels", "weights"}


def test_prefetcher_returns_each_step_whatever_was_prefetched():
    calls = []

    def produce(step):
        calls.append(step)
        return step * 10

    prefetch = streaming.Prefetcher(produce, stop=6, depth=2)
    try:
        assert [prefetch.get(s) for s in (0, 1, 2, 4, 3, 5)] == [0, 10, 20, 40, 30, 50]
    finally:
        prefetch.close()
    assert max(calls) == 5  # never beyond the last step


def _streamed_purify(monkeypatch, config, workdir, crash_at=None):
    """purify.run with data.streaming (purify dispatches to streaming.prepare);
    `crash_at` raises when the batch of that step is read."""
    real_prepare = streaming.prepare
    calls = []

    def prepare(config, texts, model_dir, vocab_size):
        assert isinstance(texts, streaming.TextIndex)
        calls.append(1)
        source, masking = real_prepare(config, texts, model_dir, vocab_size)
        if crash_at is not None:
            reads, read = [], source.read

            def crashing(rows):
                reads.append(rows)
                if len(reads) > crash_at:  # one read a step, in step order, from step 0
                    raise RuntimeError("simulated crash")
                return read(rows)
            source.read = crashing
        return source, masking

    monkeypatch.setattr(streaming, "prepare", prepare)
    try:
        return purify.run(config, str(workdir))
    finally:
        assert calls, "purify did not stream"


@pytest.mark.slow
def test_streamed_purify_equals_in_memory_and_resumes_bitwise(tiny, tmp_path, monkeypatch):
    hf_dir, aux = tiny
    config = _config(hf_dir, aux, data__masking="dynamic")
    purify.run(config, str(tmp_path / "memory"))
    memory = _results(tmp_path / "memory")

    config.data.streaming = True
    _streamed_purify(monkeypatch, config, tmp_path / "streamed")
    streamed = _results(tmp_path / "streamed")
    _assert_same_run(memory, streamed, atol=0)  # same rows, same order, same masks

    resumed = tmp_path / "resumed"
    # Dies reading step 4's batch, after step 3's checkpoint.
    with pytest.raises(RuntimeError, match="simulated crash"):
        _streamed_purify(monkeypatch, config, resumed, crash_at=3)
    assert [p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]
    _streamed_purify(monkeypatch, config, resumed)
    _assert_same_run(streamed, _results(resumed), atol=0)


# ---------------------------------------------------------------------------------- launch

LAUNCHERS = ["local.sh", "tpu_vm.sh", "slurm.sbatch"]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launchers_parse_and_print_usage_without_arguments(script, tmp_path):
    path = REPO / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"  # a fake gcloud/srun that must never run
    for tool in ("gcloud", "srun", "python"):
        (tmp_path / tool).write_text("#!/bin/sh\necho RAN >&2; exit 99\n")
        (tmp_path / tool).chmod(0o755)
    out = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert out.returncode not in (0, 99), out.stderr
    assert "usage:" in (out.stdout + out.stderr).lower() and "RAN" not in out.stderr


def test_gke_jobset_parses():
    docs = [d for d in yaml.safe_load_all((REPO / "launch" / "gke_jobset.yaml").read_text()) if d]
    jobset = next(d for d in docs if d["kind"] == "JobSet")
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    assert "recipe_jax.purify" in " ".join(container["command"] + container.get("args", []))
    assert job["parallelism"] == job["completions"]


def test_local_launcher_dry_run_prints_the_command(tmp_path):
    out = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "--dry-run", "purify",
                          "configs/purify.py:tiny", str(tmp_path / "w"), "--config.x=1"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert "-m recipe_jax.purify" in out.stdout and "--config.x=1" in out.stdout
    assert shutil.which("bash")
