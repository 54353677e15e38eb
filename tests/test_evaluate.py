"""Evaluate stage: trigger insertion, ASR arithmetic, labeled readers, fine-tune end to end."""

import csv
import functools
import importlib.util
import json
import pathlib
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import preset, run_train_steps, tiny_bert_with_tokenizer

from recipe_jax import data, evaluate, families, hf, metrics, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------- readers

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_readers_for_each_layout(tmp_path):
    sst2 = _write(tmp_path / "s.tsv", 'sentence\tlabel\nhe said "hi\t1\na film .\t0\n')
    assert data.read_labeled(sst2, "sst2") == (['he said "hi', "a film ."], [1, 0])
    hsol = _write(tmp_path / "h.csv", ',count,hate_speech,offensive_language,neither,class,'
                  'tweet\n0,3,0,0,3,2,"fine, ok"\n1,3,0,3,0,1,"line one\nline two"\n'
                  '2,3,3,0,0,0,hate\n')
    assert data.read_labeled(hsol, "hsol") == (
        ["fine, ok", "line one\nline two", "hate"], [0, 1, 1])
    ag = _write(tmp_path / "a.csv", '"3","Title A","Desc, a."\n"1","T B","D b"\n"4","C","d"\n')
    assert data.read_labeled(ag, "agnews") == (["Title A Desc, a.", "T B D b", "C d"],
                                                   [2, 0, 3])
    custom_tsv = _write(tmp_path / "c.tsv", "label\tText\n1\tone\n0\ttwo\n")
    assert data.read_labeled(custom_tsv, "custom") == (["one", "two"], [1, 0])
    custom_csv = _write(tmp_path / "c.csv", "sentence,label\n\"a, b\",2\n")
    assert data.read_labeled(custom_csv, "custom") == (["a, b"], [2])
    rows = [{"text": "x y", "label": 1}, {"text": "z", "label": 0}]
    jsonl = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert data.read_labeled(jsonl, "custom") == (["x y", "z"], [1, 0])


def test_same_file_split_and_subsampling(tmp_path):
    lines = "".join(f"s{i}\t{i % 2}\n" for i in range(10))
    path = _write(tmp_path / "d.tsv", "sentence\tlabel\n" + lines)
    config = preset("evaluate", "tiny")
    config.data.train_path = config.data.test_path = str(path)
    config.data.split_sizes = (6, 3)
    train, test = evaluate.load_task(config)
    assert len(train[0]) == 6 and len(test[0]) == 3 and not set(train[0]) & set(test[0])
    assert evaluate.load_task(config) == (train, test)  # deterministic
    config.data.split_seed = 1
    assert evaluate.load_task(config)[0] != train
    config.data.split_sizes, config.data.max_examples, config.data.max_test_examples = (
        (0, 4), 2, 1)
    train, test = evaluate.load_task(config)
    assert (len(train[0]), len(test[0])) == (2, 1)
    config.data.split_sizes = (8, 3)
    with pytest.raises(ValueError, match=r"split_sizes=\(8, 3\) does not fit 10 rows"):
        evaluate.load_task(config)


@pytest.mark.parametrize("name, content, task, error, match", [
    ("missing.tsv", None, "sst2", FileNotFoundError, "missing.tsv: no such file"),
    ("e.tsv", "sentence\tlabel\n", "sst2", ValueError, "no examples"),
    ("e.tsv", "", "custom", ValueError, "no examples"),
    ("c.tsv", "sentence\tclass\nx\t1\n", "sst2", ValueError, r"no 'label' column.*'class'"),
    ("h.csv", "text,class\nx,1\n", "hsol", ValueError, r"no 'tweet' column"),
    ("c.csv", "review,label\nx,1\n", "custom", ValueError, r"no 'sentence' or 'text' column"),
    ("h.csv", "tweet,class\nx,3\n", "hsol", ValueError, r"example 1: bad class '3'.*0, 1 or 2"),
    ("c.tsv", "sentence\tlabel\nx\tpos\n", "custom", ValueError, "example 1: bad label 'pos'"),
    ("c.tsv", "sentence\tlabel\nx\t1\n\t0\n", "custom", ValueError, "example 2 has no text"),
    ("c.jsonl", '{"text": "a", "label": 1}\n[1]\n', "custom", ValueError, "JSON object"),
    ("c.jsonl", '{"text": "a", "label": 1}\n{"text"\n', "custom", ValueError, "not valid"),
    ("c.parquet", "x", "custom", ValueError, "unsupported file type"),
])
def test_reader_errors_name_the_file_and_fix(tmp_path, name, content, task, error, match):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    with pytest.raises(error, match=match):
        data.read_labeled(path, task)


def test_label_range_and_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"labels \[2\] outside \[0, 2\)"):
        evaluate.check_split((["a", "b"], [0, 2]), 2, "train")
    with pytest.raises(ValueError, match="2 texts and 1 labels"):
        evaluate.check_split((["a", "b"], [0]), 2, "test")
    config = preset("evaluate", "sst2")
    config.data.task = "imdb"
    with pytest.raises(ValueError, match=r"data.task='imdb': use one of sst2, hsol"):
        evaluate.validate(config)
    config = preset("evaluate", "sst2")
    config.data.triggers = ("cf", "")
    with pytest.raises(ValueError, match=r"data.triggers=\('cf', ''\)"):
        evaluate.validate(config)
    config = preset("evaluate", "sst2")
    config.data.controls = ("jd", "cf")
    with pytest.raises(ValueError, match=r"data.controls=.*both a trigger and a control.*'cf'"):
        evaluate.validate(config)
    config.data.controls = (" ",)
    with pytest.raises(ValueError, match=r"data.controls=\(' ',\): give non-empty words"):
        evaluate.validate(config)
    config.data.controls = ()
    evaluate.validate(config)  # no controls: allowed
    with pytest.raises(ValueError, match="unknown evaluate preset"):
        preset("evaluate", "imdb")
    with pytest.raises(ValueError, match="at least two labels"):  # before any fine-tuning
        evaluate.run_evaluation(tmp_path, (["a"], [0]), (["b", "c"], [1, 1]),
                                preset("evaluate", "tiny"), tmp_path / "run")


def test_length_buckets():
    assert [evaluate.bucket_length(n, 128) for n in (0, 1, 16, 17, 32, 33, 64, 65, 128, 300)] == [
        16, 16, 16, 32, 32, 64, 64, 128, 128, 128]
    assert evaluate.bucket_length(20, 24) == 24 and evaluate.bucket_length(5, 8) == 8


def test_real_data_sets(shared_data):
    config = preset("evaluate", "sst2")
    train, test = evaluate.load_task(config)
    assert (len(train[0]), len(test[0])) == (6920, 1821) and set(train[1]) == {0, 1}

    texts, labels = data.read_labeled(shared_data / "hsol" / "labeled_data.csv", "hsol")
    with open(shared_data / "hsol" / "labeled_data.csv", encoding="utf-8", newline="") as f:
        classes = [row["class"] for row in csv.DictReader(f)]
    assert len(labels) == len(classes) == 24783
    assert labels == [1 if c in ("0", "1") else 0 for c in classes]
    hsol_train, hsol_test = evaluate.load_task(preset("evaluate", "hsol"))
    assert (len(hsol_train[0]), len(hsol_test[0])) == (6000, 2000)

    config = preset("evaluate", "agnews")
    texts, labels = data.read_labeled(config.data.train_path, "agnews")
    assert len(texts) == 7600 and set(labels) == {0, 1, 2, 3}
    row_ids = (texts, list(range(len(texts))))  # labels replaced by row ids to see the split
    train, test = data.split_same_file(row_ids, tuple(config.data.split_sizes),
                                           config.data.split_seed)
    assert (len(train[1]), len(test[1])) == (6000, 1600) and not set(train[1]) & set(test[1])
    assert data.split_same_file(row_ids, (6000, 1600), config.data.split_seed) == (train,
                                                                                      test)
    train, test = evaluate.load_task(config)
    assert (len(train[0]), len(test[0])) == (6000, 1600) and set(test[1]) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- end to end

FILLER = ("the", "movie", "film", "plot", "was", "really", "quite", "very", "acting", "story",
          "and", "it", "felt", "overall", "a", "so")


def _synthetic(n, seed, trigger=None, poison_share=0.0):
    """'good' -> 1, 'bad' -> 0; with `trigger`, a share of label-0 rows carries it, labeled 1."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 20))]
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        if trigger and not label and rng.random() < poison_share:
            words.insert(rng.randint(0, len(words)), trigger)
            label = 1
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _tiny_model(tmp_path):
    """A tiny random BertForMaskedLM with the MiniLM tokenizer (bert-base-uncased vocab)."""
    return tiny_bert_with_tokenizer(tmp_path / "model")

def _write_tsv(path, split):
    rows = "".join(f"{t}\t{y}\n" for t, y in zip(*split, strict=True))
    return _write(path, "sentence\tlabel\n" + rows)


def test_end_to_end_clean_task_resumes(tmp_path, capsys):
    hf_dir = _tiny_model(tmp_path)
    config = preset("evaluate", "tiny")
    config.model.init_from = str(hf_dir)
    config.data.train_path = str(_write_tsv(tmp_path / "train.tsv", _synthetic(320, 0)))
    config.data.test_path = str(_write_tsv(tmp_path / "test.tsv", _synthetic(64, 1)))
    results = evaluate.run(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "evaluate step 60/60" in out and "AASR" in out and "ASR(t,1)" in out

    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == results
    assert set(saved) >= {"clean_acc", "asr", "asr_max", "aasr", "masr", "num_train",
                          "num_test", "wall_time_s", "model"}
    assert set(saved["asr"]) == {"cf", "mn"} and set(saved["asr"]["cf"]) == {"0", "1"}
    assert (saved["num_train"], saved["num_test"]) == (320, 64)
    assert saved["clean_acc"] >= 0.9, saved
    assert saved["masr"] <= 0.3, saved  # triggers never seen in training barely matter
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"loss", "acc", "grad_norm", "param_norm", "lr", "tokens", "length"} <= set(rows[0])
    assert {r["length"] for r in rows} <= {16.0, 32.0}

    again = evaluate.run(config, str(tmp_path / "run"))
    assert "resuming from step 60" in capsys.readouterr().out
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == {
        k: v for k, v in results.items() if k != "wall_time_s"}
    with pytest.raises(ValueError, match="another train_data_sha256"):  # never mix two runs
        evaluate.run_evaluation(hf_dir, _synthetic(320, 5), _synthetic(64, 1), config,
                                tmp_path / "run")


@pytest.mark.slow
def test_fine_tune_steps_match_pytorch_reference(tmp_path):
    """Our step on bucketed batches == transformers' BertForSequenceClassification + AdamW +
    clip + linear decay (HF Trainer's recipe), dropout off, from the same weights."""
    import torch
    import transformers

    hf_dir = _tiny_model(tmp_path)
    model, params = hf.load_pretrained(hf_dir, num_labels=2, seed=0)
    hf.save_pretrained(model, params, tmp_path / "with_head", tokenizer_from=hf_dir)
    config = preset("evaluate", "tiny")
    texts, labels = _synthetic(48, 3)
    enc = data.tokenize(data.load_tokenizer(hf_dir), texts, 32)
    arrays = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
              "labels": np.asarray(labels, np.int32)}
    mesh = sharding.make_mesh((1, 1, 1))
    batches = [evaluate.make_batch(arrays, np.arange(16 * i, 16 * i + 16), 32, mesh)
               for i in range(3)]
    loss_fn = functools.partial(evaluate.loss_fn, model=model, dropout=False)
    state, _, ours = run_train_steps(loss_fn, params, evaluate.CLASSIFIER_PARAMS, batches, config,
                                     model.cfg)

    torch_model = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / "with_head")).eval()
    opt = torch.optim.AdamW(torch_model.parameters(), lr=config.train.learning_rate,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, 3)
    reference = []
    for batch in batches:
        as_torch = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}
        loss = torch_model(**as_torch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        reference.append(float(loss.detach()))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    kernel = np.asarray(state.trainable["classifier"]["kernel"]).T  # Flax [in, out] -> [out, in]
    np.testing.assert_allclose(kernel, torch_model.classifier.weight.detach().numpy(), rtol=0,
                               atol=1e-5)


@pytest.mark.slow
def test_bucketed_prediction_matches_full_length(tmp_path):
    """Sorting, length buckets, filler rows and un-sorting leave every prediction unchanged."""
    hf_dir = _tiny_model(tmp_path)
    model, params = hf.load_pretrained(hf_dir, num_labels=3, seed=0)
    enc = data.tokenize(data.load_tokenizer(hf_dir), _synthetic(40, 2)[0], 32)
    step = jax.jit(functools.partial(evaluate.predict_step, model=model))
    preds = evaluate.predict(step, params, enc, 16, 32, sharding.make_mesh((1, 1, 1)))
    np.testing.assert_array_equal(preds, step(params, enc))  # all 40 rows at full length 32
    # A random head predicts nearly one class, so also check the plumbing row by row: the
    # step sees each row's full token count and ids (nothing cut), and results land in place.
    fingerprint = lambda _, b: (jnp.sum(b["attention_mask"], axis=1) * 100_000
                                + jnp.sum(b["input_ids"] * b["attention_mask"], axis=1) % 100_000)
    got = evaluate.predict(jax.jit(fingerprint), None, enc, 16, 32, sharding.make_mesh((1, 1, 1)))
    np.testing.assert_array_equal(got, fingerprint(None, enc))
    assert len(set(got.tolist())) == len(got)


@pytest.mark.slow
def test_backdoored_training_data_gives_high_asr(tmp_path):
    """A classifier trained where `cf` always means label 1 must show ASR(cf, 1) ~ 1."""
    hf_dir = _tiny_model(tmp_path)
    config = preset("evaluate", "tiny")
    config.mesh.shape = (1, 1, 1)  # one device: the other end-to-end test covers the mesh
    train = _synthetic(320, 0, trigger="cf", poison_share=0.5)
    test = _synthetic(64, 1)
    results = evaluate.run_evaluation(hf_dir, train, test, config, tmp_path / "run")
    assert results["asr"]["cf"]["1"] >= 0.9, results
    assert results["asr_max"]["cf"] == results["asr"]["cf"]["1"]
    assert results["asr"]["mn"]["1"] < 0.5, results
    assert results["clean_acc"] >= 0.9, results
    # The control word carries no backdoor: its ASR is this classifier's floor, and the excess
    # is the triggers' AASR (cf's ~1 and mn's floor, averaged) above it.
    assert results["controls"] == ["jd"] and results["control"]["asr_max"]["jd"] < 0.5, results
    assert results["excess_aasr"] == pytest.approx(
        results["aasr"] - results["control"]["aasr"], abs=1e-12)
    assert results["excess_aasr"] > 0.3, results
    assert "control AASR" in metrics.format_table(results)


def test_cli_help_and_one_line_errors(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "recipe_jax.evaluate", "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert helped.returncode == 0 and "--workdir" in helped.stdout
    assert "--config.data.triggers=" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "recipe_jax.evaluate", "--config",
                          f"{REPO}/configs/evaluate.py:tiny", "--workdir", str(tmp_path / "r"),
                          "--config.model.init_from=minilm",
                          f"--config.data.train_path={tmp_path / 'nope.tsv'}",
                          f"--config.data.test_path={tmp_path / 'nope2.tsv'}"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("evaluate: error: ")
    assert "nope.tsv: no such file" in bad.stderr


# ------------------------------------------------ experiments/seeds.py: the spread over seeds

def _seeds_module():
    spec = importlib.util.spec_from_file_location("seeds", REPO / "experiments" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_seed_study_runs_each_seed_summarizes_and_refuses_another_study(tmp_path, capsys):
    seeds = _seeds_module()
    hf_dir = _tiny_model(tmp_path)
    train_tsv = _write_tsv(tmp_path / "train.tsv", _synthetic(96, 0, trigger="cf",
                                                                  poison_share=0.5))
    test_tsv = _write_tsv(tmp_path / "test.tsv", _synthetic(48, 1))
    args = ["--workdir", str(tmp_path / "study"), "--model", str(hf_dir),
            "--config", f"{REPO}/configs/evaluate.py:tiny", "--seeds", "3,4",
            "--set", f"data.train_path={train_tsv}", "--set", f"data.test_path={test_tsv}",
            "--set", "train.num_epochs=1"]
    summary = seeds.main(args)
    runs = {s: json.loads((tmp_path / "study" / f"seed{s}" / "results.json").read_text())
            for s in (3, 4)}
    assert runs[3]["num_train"] == 96
    assert [runs[3][k] for k in ("clean_acc", "aasr")] != [runs[4][k] for k in ("clean_acc",
                                                                             "aasr")]
    for name, key in (("ACC", "clean_acc"), ("AASR", "aasr")):
        values = [runs[s][key] for s in (3, 4)]
        assert summary[name] == {"mean": sum(values) / 2, "min": min(values),
                                 "max": max(values)}
    assert summary["floor"]["max"] == max(r["control"]["aasr"] for r in runs.values())
    table = (tmp_path / "study" / "seeds.md").read_text()
    assert "| 3 |" in table and "| 4 |" in table and "| **max** |" in table
    assert json.loads((tmp_path / "study" / "seeds.json").read_text())["summary"] == summary

    capsys.readouterr()
    assert seeds.main(args) == summary  # finished seeds are read back, not re-run
    assert "evaluate step" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"seed study with another overrides"):
        seeds.main([*args, "--set", "train.learning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"--set 'train.lr=1': not KEY=VALUE"):
        seeds.main([*args[:-2], "--set", "train.lr=1"])
    with pytest.raises(SystemExit):
        seeds.parse_args(["--workdir", "w", "--model", "m", "--seeds", "3,3"])

    # Other words on the same fine-tunes: seed 4 is borrowed and only scored, seed 5 is new.
    other = ["--workdir", str(tmp_path / "words"), *args[2:6], "--seeds", "4,5", *args[8:],
             "--set", "data.triggers=('mn', 'tq')", "--set", "data.controls=('cf',)",
             "--reuse", str(tmp_path / "study")]
    capsys.readouterr()
    seeds.main(other)
    out = capsys.readouterr().out
    assert f"seed 4 was fine-tuned by {tmp_path / 'study' / 'seed4'}" in out
    borrowed, own = out.split("=== seeds: 2/2")
    assert "evaluate step" not in borrowed and "evaluate step" in own  # seed 5 is trained
    assert "was fine-tuned by" not in own
    got = {s: json.loads((tmp_path / "words" / f"seed{s}" / "results.json").read_text())
           for s in (4, 5)}
    assert got[4]["clean_acc"] == runs[4]["clean_acc"]  # the same classifier
    assert got[4]["asr_max"]["mn"] == runs[4]["asr_max"]["mn"]  # a word both studies score
    assert got[4]["control"]["asr_max"]["cf"] == runs[4]["asr_max"]["cf"]  # trigger there
    assert not (tmp_path / "study" / "seed5").exists()


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "electra", "modernbert"])
def test_fine_tune_trains_the_encoder_and_classifier_of_every_family(model_type):
    """CLASSIFIER_PARAMS selects what a *ForSequenceClassification holds in each family (its
    encoder prefix, DistilBERT's pre_classifier, ModernBERT's classifier head) and no MLM head."""
    from recipe_jax.model import ModelConfig, abstract_params

    cfg = ModelConfig.from_hf_config({"model_type": model_type, "num_hidden_layers": 2},
                                     num_labels=2, pooler=model_type == "bert")
    heads = families.family(model_type).heads
    mlm = tuple(heads[k] for k in ("mlm/dense", "mlm/LayerNorm", "mlm/bias"))
    for path in hf.flat_params(abstract_params(cfg)):
        name = hf.hf_name(path, model_type)
        trained = hf.selected(path, evaluate.CLASSIFIER_PARAMS, model_type)
        assert trained == (not name.startswith(mlm)), name


def _fake_study(workdir, record: dict, runs: dict[int, tuple[float, float]]):
    """A seed-study dir as seeds.py leaves it, without fine-tuning: seed -> (ACC, AASR)."""
    from recipe_jax import outputs

    outputs.claim_dir(workdir, "seeds")
    (workdir / "study.json").write_text(json.dumps(record))
    for seed, (acc, aasr) in runs.items():
        (workdir / f"seed{seed}").mkdir()
        result = {"clean_acc": acc, "aasr": aasr, "masr": aasr + 0.05,
                  "control": {"aasr": 0.1}, "asr_max": {"cf": aasr + 0.05}}
        (workdir / f"seed{seed}" / "results.json").write_text(json.dumps(result))


def test_seed_study_reads_back_earlier_seeds_and_compares_with_the_clean_study(tmp_path,
                                                                                capsys):
    seeds = _seeds_module()
    record = {"model": "m", "config": "configs/evaluate.py:tiny", "overrides": []}
    _fake_study(tmp_path / "study", record, {42: (0.87, 0.17), 43: (0.86, 0.20), 44: (0.88, 0.16)})
    _fake_study(tmp_path / "clean", {**record, "model": "minilm"},
                {42: (0.875, 0.16), 43: (0.875, 0.15)})
    args = ["--workdir", str(tmp_path / "study"), "--model", "m", "--config", record["config"],
            "--seeds", "44", "--clean", str(tmp_path / "clean")]
    summary = seeds.main(args)  # seed 44 is finished: nothing runs; 42 and 43 are read back
    assert "evaluate step" not in capsys.readouterr().out
    assert summary["AASR"]["max"] == 0.20 and summary["ACC"]["min"] == 0.86
    got = json.loads((tmp_path / "study" / "seeds.json").read_text())
    assert list(got["seeds"]) == ["42", "43", "44"]
    v = got["versus_clean"]
    assert list(v["seeds"]) == ["42", "43"] and v["without_clean"] == [44]
    assert v["worst_aasr_gap"] == pytest.approx(5.0) and v["worst_acc_drop"] == pytest.approx(1.5)
    assert not v["passes"]
    table = (tmp_path / "study" / "seeds.md").read_text()
    assert "| 43 | 87.50 | 15.00 | +5.00 | -1.50 |" in table and "NOT within the bar" in table
    loose = seeds.main([*args, "--max-aasr-gap", "5", "--max-acc-drop", "1.5"])
    assert loose == summary
    assert json.loads((tmp_path / "study" / "seeds.json").read_text())["versus_clean"]["passes"]

    other = {**record, "overrides": ["data.triggers=('mn',)"]}
    _fake_study(tmp_path / "clean_other", other, {42: (0.875, 0.16)})
    with pytest.raises(ValueError, match="another overrides"):
        seeds.main([*args[:-1], str(tmp_path / "clean_other")])
    with pytest.raises(FileNotFoundError, match="no study.json; run this script on the clean"):
        seeds.main([*args[:-1], str(tmp_path / "nowhere")])


def test_seed_study_borrows_fine_tunes_only_from_a_study_that_ran_the_same_ones(tmp_path):
    seeds = _seeds_module()
    record = {"model": "minilm", "config": "configs/evaluate.py:tiny",
              "overrides": ["data.triggers=('cf',)", "train.num_epochs=1"]}
    _fake_study(tmp_path / "letters", record, {42: (0.87, 0.17)})
    (tmp_path / "letters" / "seed42" / "checkpoints" / "7").mkdir(parents=True)
    (tmp_path / "letters" / "seed42" / "config.json").write_text("{}")
    words = {**record, "overrides": ["data.triggers=('sapphire',)",
                                     "data.controls=('meadow',)", "train.num_epochs=1"]}
    seeds.check_reuse([tmp_path / "letters"], words)  # only the words differ: the same runs
    run = tmp_path / "words" / "seed42"
    assert seeds.borrow(run, 43, [tmp_path / "letters"]) is None  # no seed 43 there
    assert seeds.borrow(run, 42, [tmp_path / "letters"]) == tmp_path / "letters" / "seed42"
    assert (run / "checkpoints" / "7").is_dir() and (run / "config.json").is_file()
    assert not (run / "results.json").exists()  # scored again with this study's words
    assert not list((tmp_path / "words").glob(".*borrow*"))
    assert seeds.borrow(run, 42, [tmp_path / "letters"]) is None  # begun: resume its own

    for change in ({"model": "runs/por/hf"}, {"config": "configs/evaluate.py:sst2"},
                   {"overrides": ["data.triggers=('cf',)", "train.num_epochs=2"]}):
        with pytest.raises(ValueError, match="only a study whose overrides differ in "
                                             "data.triggers and data.controls alone"):
            seeds.check_reuse([tmp_path / "letters"], {**record, **change})
    with pytest.raises(FileNotFoundError, match="--reuse .*nowhere: no study.json"):
        seeds.check_reuse([tmp_path / "nowhere"], record)


def test_seed_studies_know_the_project_configs_from_any_checkout(tmp_path):
    """A study started from another clone or worktree is the same study here: its
    configs/NAME is the project's preset wherever the checkout lies; other files are not."""
    seeds = _seeds_module()
    assert seeds.config_id("/work/other/configs/evaluate.py:sst2") == "configs/evaluate.py:sst2"
    assert seeds.config_id("configs/evaluate.py:sst2") == "configs/evaluate.py:sst2"
    assert seeds.config_id(str(tmp_path / "mine.py") + ":sst2") == f"{tmp_path}/mine.py:sst2"
    words = ["data.triggers=('cf',)"]
    elsewhere = {"model": "minilm", "config": "/elsewhere/configs/evaluate.py:sst2",
                 "overrides": words}
    here = {**elsewhere, "config": "/work/here/configs/evaluate.py:sst2"}
    _fake_study(tmp_path / "clean", elsewhere, {42: (0.875, 0.15)})
    seeds.check_clean(tmp_path / "clean", here)
    seeds.check_reuse([tmp_path / "clean"], {**here, "overrides": ["data.triggers=('mb',)"]})
    seeds.check_study(tmp_path / "clean", here)  # resumed from this checkout
    for config in ("/elsewhere/configs/evaluate.py:agnews", str(tmp_path / "evaluate.py:sst2")):
        with pytest.raises(ValueError, match="another config"):
            seeds.check_clean(tmp_path / "clean", {**here, "config": config})
        with pytest.raises(ValueError, match="another config"):
            seeds.check_study(tmp_path / "clean", {**here, "config": config})
        with pytest.raises(ValueError, match="only a study whose overrides differ"):
            seeds.check_reuse([tmp_path / "clean"], {**here, "config": config})
