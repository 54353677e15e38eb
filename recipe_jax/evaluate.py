"""Downstream evaluation: fine-tune a classifier from a PTM, then measure ACC and attack success.

    python -m recipe_jax.evaluate --config configs/evaluate.py:sst2 --workdir runs/eval_sst2 \
        --config.model.init_from=path/to/hf_dir

Protocol (docs/method.md): fine-tune encoder + pooler + linear head, every parameter trainable
(lr 2e-5, 3 epochs, batch 32, linear decay, AdamW, clip 1.0, seed 42) and evaluate the last step.
ACC on the clean test set; for each trigger t, t is inserted once into every test sentence (the
release's rule, `insert_trigger`) and each poisoned sentence is predicted once; ASR(t, y) = share
of the rows whose label != y predicted y, ASR(t) = max_y, AASR = mean_t ASR(t), MASR = max_t.
Control words (`data.controls`) are scored the same way. Where no backdoor reacts to them, their
AASR is this classifier's own floor and `excess_aasr` = AASR - control AASR what a backdoor adds.
A backdoor can also react to words like its triggers: a control AASR far above a clean model's
is then itself a warning, and excess_aasr understates the backdoor (docs/results.md).
Batches are padded to a power-of-two length bucket, so short sentences do not pay for 128 tokens.
Writes DIR/results.json, DIR/metrics.jsonl and DIR/checkpoints/ (resumable: rerun the command;
DIR/config.json records what the checkpoints were trained on, so two runs are never mixed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import time
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from recipe_jax import cli, config_blocks, data, families, hf, metrics, sharding, trainer
from recipe_jax.model import Transformer

TASKS = ("sst2", "hsol", "agnews", "custom")
# What a *ForSequenceClassification model holds: the encoder (every family's HF prefix) and the
# classification head (DistilBERT's `pre_classifier` too); the MLM/NSP heads hf.py keeps stay
# frozen.
_ENCODERS = "|".join(sorted({f.encoder_prefix for f in families.FAMILIES.values()}))
CLASSIFIER_PARAMS = (rf"^({_ENCODERS})\.", r"^(pre_)?classifier\.")
MIN_BUCKET = 16  # shortest padded length; buckets are powers of two up to data.max_length
Split = data.Split


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, the bad value and the fix."""
    config_blocks.validate_training(config)
    d, bad = config.data, config_blocks.bad_value
    if d.task not in TASKS:
        bad("data.task", d.task, f"use one of {', '.join(TASKS)}")
    for key in ("max_test_examples", "split_seed"):
        if d[key] < 0:
            bad(f"data.{key}", d[key], "use 0 or a positive integer")
    if len(d.split_sizes) != 2 or min(d.split_sizes) < 0 or not any(d.split_sizes):
        bad("data.split_sizes", tuple(d.split_sizes), "use (train rows, test rows), 0 = rest")
    if d.num_labels < 2:
        bad("data.num_labels", d.num_labels, "a classifier needs at least 2 labels")
    if not d.triggers or any(not isinstance(w, str) or not w.strip() for w in d.triggers):
        bad("data.triggers", tuple(d.triggers), "give one or more non-empty words")
    if any(not isinstance(w, str) or not w.strip() for w in d.controls):
        bad("data.controls", tuple(d.controls), "give non-empty words, or () for none")
    if both := sorted(set(d.controls) & set(d.triggers)):
        bad("data.controls", tuple(d.controls), "a word cannot be both a trigger and a "
            f"control: drop {both} from one of them")
    for key, value in (("eval.batch_size", config.eval.batch_size),
                       ("checkpoint.max_to_keep", config.checkpoint.max_to_keep)):
        if value < 1:
            bad(key, value, "use a positive integer")


def load_task(config: ml_collections.ConfigDict) -> tuple[Split, Split]:
    """The (train, test) examples the config names, split and subsampled."""
    d = config.data
    for key in ("train_path", "test_path"):
        if not d[key]:
            raise ValueError(f"data.{key} is empty: set --config.data.{key}=FILE")
    if os.path.realpath(d.train_path) == os.path.realpath(d.test_path):
        train_split, test_split = data.split_same_file(data.read_labeled(d.train_path, d.task),
                                                       tuple(d.split_sizes), d.split_seed)
    else:
        train_split, test_split = (data.read_labeled(d[k], d.task)
                                   for k in ("train_path", "test_path"))
    head = lambda s, n: (s[0][:n], s[1][:n]) if n else s  # noqa: E731
    return head(train_split, d.max_examples), head(test_split, d.max_test_examples)


def check_split(split: Split, num_labels: int, name: str) -> Split:
    """The split as (list of str, list of int), after checking sizes and the label range."""
    texts, labels = split
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"{name} data: {len(texts)} texts and {len(labels)} labels; pass "
                         "equally many, at least one")
    bad = sorted({y for y in labels if not (isinstance(y, int | np.integer) and
                                            0 <= y < num_labels)}, key=str)
    if bad:
        raise ValueError(f"{name} data: labels {bad[:10]} outside [0, {num_labels}); fix the "
                         f"labels or set data.num_labels")
    return [str(s) for s in texts], [int(y) for y in labels]


# --------------------------------------------------------------------------- steps (pure)

def loss_fn(params, batch, rng, extras, *, model: Transformer, dropout: bool):
    """Mean softmax cross-entropy of the classifier over the batch, and its accuracy (pure)."""
    del extras
    logits_bk = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            deterministic=not dropout, rngs={"dropout": rng},
                            method=Transformer.classify)
    loss_b = optax.softmax_cross_entropy_with_integer_labels(logits_bk, batch["labels"])
    acc = jnp.mean((jnp.argmax(logits_bk, axis=-1) == batch["labels"]).astype(jnp.float32))
    return jnp.mean(loss_b), {"acc": acc,
                              "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
                              "length": jnp.asarray(batch["input_ids"].shape[1], jnp.float32)}


def predict_step(params, batch, *, model: Transformer) -> jax.Array:
    logits_bk = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            method=Transformer.classify)
    return jnp.argmax(logits_bk, axis=-1).astype(jnp.int32)  # [B]


# ------------------------------------------------------------------------ batches (host side)

def bucket_length(longest: int, max_length: int) -> int:
    """The next power of two >= longest, at least MIN_BUCKET, at most max_length."""
    return min(max(MIN_BUCKET, 1 << max(longest - 1, 0).bit_length()), max_length)


def make_batch(enc: dict[str, np.ndarray], rows: np.ndarray, max_length: int, mesh) -> dict:
    """The global batch `rows`, cut to its length bucket (right padding), this process's part
    put on the mesh; every process computes the same bucket from the same global rows."""
    length = bucket_length(int(enc["attention_mask"][rows].sum(axis=1).max()), max_length)
    per_process = len(rows) // jax.process_count()
    local = rows[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    return sharding.put_batch({k: v[local, :length] if v.ndim == 2 else v[local]
                               for k, v in enc.items()}, mesh)


def predict(step_fn, params, enc: dict[str, np.ndarray], batch_size: int, max_length: int,
            mesh) -> np.ndarray:
    """Predicted labels [N]; rows go sorted by length (little padding), the last batch is
    filled with repeated rows, and results are fetched once at the end (no per-batch sync)."""
    order = np.argsort(enc["attention_mask"].sum(axis=1), kind="stable")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    outs = [step_fn(params, make_batch(enc, np.resize(rows, batch_size), max_length, mesh))
            for rows in chunks]
    preds = np.empty(len(order), np.int32)
    for rows, out in zip(chunks, sharding.fetch_to_host(outs), strict=True):
        preds[rows] = out[:len(rows)]
    return preds


# -------------------------------------------------------------------------------- the stage

def _start(config, workdir, model_dir) -> tuple[jax.sharding.Mesh, pathlib.Path]:
    mesh, workdir = trainer.start(config, workdir, "run:evaluate", inputs=[model_dir])
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.eval.batch_size % shards or config.eval.batch_size % jax.process_count():
        raise ValueError(f"eval.batch_size={config.eval.batch_size} must divide evenly over "
                         f"data*fsdp={shards} mesh devices and {jax.process_count()} processes")
    return mesh, workdir


def fine_tune(config, workdir: pathlib.Path, model_dir, model: Transformer, host_params, enc,
              labels, mesh, fingerprint: dict) -> dict:
    """Fine-tunes every classifier parameter with trainer.fit; returns the last step's params."""
    arrays = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
              "labels": np.asarray(labels, np.int32)}
    loss = functools.partial(loss_fn, model=trainer.compute_model(config, model.cfg),
                             dropout=config.train.dropout)
    tokens = config.train.batch_size * float(enc["attention_mask"].sum(axis=1).mean())
    params, _ = trainer.fit(
        config, workdir, mesh, name="evaluate", model_dir=model_dir, model=model,
        host_params=host_params, arrays=arrays, trainable=CLASSIFIER_PARAMS, loss_fn=loss,
        fingerprint=fingerprint, tokens_per_step=int(tokens),
        collate=lambda rows: make_batch(arrays, rows, config.data.max_length, mesh))
    return params


def score(config, model: Transformer, params, tokenizer, test: Split, mesh) -> dict:
    """Clean ACC and attack success of the fine-tuned classifier on the test split."""
    texts, labels = test
    compute = trainer.compute_model(config, model.cfg)
    step_fn = jax.jit(functools.partial(predict_step, model=compute))
    run = lambda sentences: predict(step_fn, params, data.tokenize(
        tokenizer, sentences, config.data.max_length), config.eval.batch_size,
        config.data.max_length, mesh)
    t0 = time.time()
    clean_acc = float(np.mean(run(texts) == np.asarray(labels)))
    words = (*config.data.triggers, *config.data.controls)
    poisoned = {t: run([metrics.insert_trigger(s, t) for s in texts]) for t in words}
    num = len(texts) * (1 + len(poisoned))
    print(f"evaluate: predicted {num} sentences in {time.time() - t0:.1f}s", flush=True)
    results = {"clean_acc": clean_acc, **metrics.attack_success(
        {t: poisoned[t] for t in config.data.triggers}, labels, config.data.num_labels)}
    if config.data.controls:
        floor = metrics.attack_success({t: poisoned[t] for t in config.data.controls}, labels,
                               config.data.num_labels)
        results["control"] = {k: floor[k] for k in ("asr", "asr_max", "aasr", "masr")}
        results["excess_aasr"] = results["aasr"] - floor["aasr"]
    return results


def run_evaluation(model_dir: str | os.PathLike, train: Split, test: Split,
                   config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Fine-tunes from `model_dir` on `train` and scores on `test` (in-memory (texts, labels));
    returns the results, also written to workdir/results.json and printed as a table."""
    t0 = time.time()
    validate(config)
    workdir = pathlib.Path(workdir).absolute()
    model_dir = hf.resolve_model_dir(str(model_dir))
    num_labels = config.data.num_labels
    train, test = check_split(train, num_labels, "train"), check_split(test, num_labels, "test")
    if len(set(test[1])) < 2:  # fail before fine-tuning, not after
        raise ValueError("test data: every label is the same, but ASR(t, y) needs rows whose "
                         "label is not y; use a test set with at least two labels")
    mesh, workdir = _start(config, workdir, model_dir)
    model, host_params = hf.load_pretrained(model_dir, num_labels=num_labels,
                                            seed=config.train.seed,
                                            drop_extra_heads=config.model.drop_extra_heads)
    trainer.check_max_length(config, model)
    tokenizer = data.load_tokenizer(model_dir)
    digest = hashlib.sha256(json.dumps(train).encode()).hexdigest()
    # What the checkpoints must have been trained on to be resumed (in-memory data included).
    fingerprint = {"model": str(model_dir), "train_data_sha256": digest,
                   "num_labels": num_labels, "max_length": config.data.max_length,
                   "train": {key: value for key, value in config.train.items()
                             if key != "log_every"}}
    params = fine_tune(config, workdir, model_dir, model, host_params,
                       data.tokenize(tokenizer, train[0], config.data.max_length), train[1], mesh,
                       fingerprint)
    results = score(config, model, params, tokenizer, test, mesh)
    results.update(num_train=len(train[0]), num_test=len(test[0]), model=str(model_dir),
                   triggers=list(config.data.triggers),
                   controls=list(config.data.controls), wall_time_s=round(time.time() - t0, 1))
    if jax.process_index() == 0:
        tmp = workdir / f".results.json.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        os.replace(tmp, workdir / "results.json")
        print(metrics.format_table(results), flush=True)
    return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole evaluate stage: read the labeled files the config names, then run_evaluation."""
    validate(config)
    train_split, test_split = load_task(config)
    return run_evaluation(config.model.init_from, train_split, test_split, config, workdir)


if __name__ == "__main__":
    cli.run(run, name="evaluate", doc=__doc__,
            default_config="configs/evaluate.py")
