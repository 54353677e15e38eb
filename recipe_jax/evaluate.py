"""Downstream evaluation: fine-tune a classifier from a PTM, then measure ACC and attack success.

    python -m recipe_jax.evaluate --config configs/evaluate.py:sst2 --workdir runs/eval_sst2 \
        --config.model.init_from=path/to/hf_dir

Protocol (recipe_spec.md §3): fine-tune encoder + pooler + linear head, every parameter trainable
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

import csv
import functools
import hashlib
import json
import os
import pathlib
import random
import time
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from recipe_jax import cli, data, hf, sharding, stage, train
from recipe_jax.model import Transformer

TASKS = ("sst2", "hsol", "agnews", "custom")
# What a *ForSequenceClassification model holds; the MLM/NSP heads hf.py keeps stay frozen.
CLASSIFIER_PARAMS = (r"^(bert|roberta)\.", r"^classifier\.")
MIN_BUCKET = 16  # shortest padded length; buckets are powers of two up to data.max_length
Split = tuple[list[str], list[int]]  # (texts, labels)
# task -> (text columns joined by a space, label column, label map); custom is decided per file.
_HSOL_BINARY = {"0": 1, "1": 1, "2": 0}  # hate speech, offensive -> 1; neither -> 0
_LAYOUTS = {"sst2": (("sentence",), "label", int),
            "hsol": (("tweet",), "class", _HSOL_BINARY.__getitem__),
            "agnews": (("title", "description"), "class", lambda c: int(c) - 1)}


# ------------------------------------------------------------------------------------ readers

def read_labeled(path: str | os.PathLike, task: str) -> Split:
    """(texts, labels) of one labeled file in `task`'s layout (../shared/data/README.md); custom:
    a .tsv/.csv with a header naming `sentence` or `text` and `label`, or .jsonl objects."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file; set data.train_path / data.test_path to a "
                                f"labeled {task} file")
    # The AG News file has no header.
    rows = _records(p, ("class", "title", "description") if task == "agnews" else None)
    if not rows:
        raise ValueError(f"{p}: no examples; pass a file with at least one labeled row")
    text_key = next((k for k in ("sentence", "text") if k in rows[0]), "sentence' or 'text")
    columns, label_key, to_label = _LAYOUTS.get(task, ((text_key,), "label", int))
    missing = [f"'{k}'" for k in (*columns, label_key) if k not in rows[0]]
    if missing:
        need = ", ".join(f"'{k}'" for k in (*columns, label_key))
        raise ValueError(f"{p}: no {', '.join(missing)} column (found {list(rows[0])[:10]}); "
                         f"a {task} file needs the columns {need}")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text = " ".join(str(row.get(k) or "").strip() for k in columns).strip()
        try:
            labels.append(to_label(str(row.get(label_key)).strip()))
        except (KeyError, ValueError):
            fix = "use 0, 1 or 2 (the HSOL classes)" if task == "hsol" else "use integers"
            raise ValueError(f"{p}: example {number}: bad {label_key} "
                             f"{row.get(label_key)!r}; {fix}") from None
        if not text:
            raise ValueError(f"{p}: example {number} has no text; remove or fill that row")
        texts.append(text)
    return texts, labels


def _records(p: pathlib.Path, fieldnames: tuple[str, ...] | None) -> list[dict]:
    """Rows of a .tsv/.csv (header, or `fieldnames` when the file has none) or .jsonl file."""
    suffix = p.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use .tsv, .csv or .jsonl")
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            if suffix == ".jsonl":
                rows = [json.loads(line) for line in f if line.strip()]
            else:  # TSV data sets (SST-2) hold bare quotes that are text, never field quoting
                options = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else {}
                csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
                rows = list(csv.DictReader(f, fieldnames=fieldnames, **options))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason}); re-encode it as UTF-8") from None
    except (csv.Error, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid {suffix} ({e}); fix the file") from None
    if any(not isinstance(r, dict) for r in rows):
        raise ValueError(f'{p}: each line must be a JSON object like {{"text": ..., "label": 0}}')
    return [{str(k).strip().lower(): v for k, v in r.items()} for r in rows]


def split_same_file(split: Split, sizes: tuple[int, int], seed: int) -> tuple[Split, Split]:
    """(train, test): the first sizes[0] rows of a seeded permutation, then the next sizes[1]
    (0 = all remaining rows). Used when one file serves both (AG News, HSOL)."""
    texts, labels = split
    order = np.random.default_rng(seed).permutation(len(texts))
    num_train = sizes[0] or len(texts) - sizes[1]
    num_test = sizes[1] or len(texts) - num_train
    if num_train < 1 or num_test < 1 or num_train + num_test > len(texts):
        raise ValueError(f"data.split_sizes={tuple(sizes)} does not fit {len(texts)} rows; use "
                         "(train, test) with train + test <= rows, 0 = the rest")
    pick = lambda rows: ([texts[i] for i in rows], [labels[i] for i in rows])
    return pick(order[:num_train]), pick(order[num_train:num_train + num_test])


def load_task(config: ml_collections.ConfigDict) -> tuple[Split, Split]:
    """The (train, test) examples the config names, split and subsampled."""
    d = config.data
    for key in ("train_path", "test_path"):
        if not d[key]:
            raise ValueError(f"data.{key} is empty: set --config.data.{key}=FILE")
    if os.path.realpath(d.train_path) == os.path.realpath(d.test_path):
        train_split, test_split = split_same_file(read_labeled(d.train_path, d.task),
                                                  tuple(d.split_sizes), d.split_seed)
    else:
        train_split, test_split = (read_labeled(d[k], d.task) for k in ("train_path", "test_path"))
    head = lambda s, n: (s[0][:n], s[1][:n]) if n else s
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


# ---------------------------------------------------------------------------------- metrics

def insert_trigger(sentence: str, trigger: str) -> str:
    """The release's insertion: one trigger at randint(0, len(words)) of a fresh Random(42)."""
    words = sentence.split()
    rng = random.Random(42)
    words.insert(rng.randint(0, len(words)), trigger)
    return " ".join(words)


def attack_success(preds_by_trigger: dict[str, np.ndarray], labels, num_labels: int) -> dict:
    """ASR(t, y) = share of rows with label != y predicted y on t's poisoned set; ASR(t) =
    max_y; AASR = mean_t ASR(t); MASR = max_t. Label keys are strings (as in JSON)."""
    labels = np.asarray(labels)
    if not preds_by_trigger:
        raise ValueError("no triggers: set data.triggers to at least one word")
    others = {y: labels != y for y in range(num_labels)}
    if not all(m.any() for m in others.values()):
        raise ValueError(f"every test label is the same ({labels[0]}): ASR(t, y) needs rows "
                         "whose label is not y; use a test set with at least two labels")
    asr = {}
    for trigger, preds in preds_by_trigger.items():
        preds = np.asarray(preds)
        if preds.shape != labels.shape:
            raise ValueError(f"trigger {trigger!r}: {preds.shape} predictions for "
                             f"{labels.shape} labels")
        asr[trigger] = {str(y): float(np.mean(preds[m] == y)) for y, m in others.items()}
    asr_max = {t: max(row.values()) for t, row in asr.items()}
    return {"asr": asr, "asr_max": asr_max, "aasr": float(np.mean(list(asr_max.values()))),
            "masr": max(asr_max.values()),
            "num_poisoned": {str(y): int(m.sum()) for y, m in others.items()}}


# --------------------------------------------------------------------------- steps (pure)

def loss_fn(trainable, frozen, batch, rng, *, model: Transformer, dropout: bool):
    """Mean softmax cross-entropy of the classifier over the batch, and its accuracy."""
    params = train.merge_params(trainable, frozen)
    logits_bk = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            deterministic=not dropout, rngs={"dropout": rng},
                            method=Transformer.classify)
    loss_b = optax.softmax_cross_entropy_with_integer_labels(logits_bk, batch["labels"])
    acc = jnp.mean((jnp.argmax(logits_bk, axis=-1) == batch["labels"]).astype(jnp.float32))
    return jnp.mean(loss_b), {"acc": acc}


def train_step(state: train.TrainState, frozen, batch, *, model, optimizer, schedule,
               dropout: bool, seed: int):
    """One fine-tuning update (pure); dropout is drawn from (seed, step)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, parts), grads = grad_fn(state.trainable, frozen, batch, rng, model=model,
                                   dropout=dropout)
    state, norms = train.apply_gradients(state, grads, optimizer, schedule)
    return state, {"loss": loss, **parts, **norms,
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

def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, the bad value and the fix."""
    train.validate(config)
    d, bad = config.data, train.bad_value
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


def _start(config) -> jax.sharding.Mesh:
    mesh = stage.start(config)  # joins the processes; checks train.batch_size against the mesh
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.eval.batch_size % shards or config.eval.batch_size % jax.process_count():
        raise ValueError(f"eval.batch_size={config.eval.batch_size} must divide evenly over "
                         f"data*fsdp={shards} mesh devices and {jax.process_count()} processes")
    return mesh


def fine_tune(config, workdir: pathlib.Path, model_dir, model: Transformer, host_params, enc,
              labels, mesh, fingerprint: dict) -> dict:
    """Fine-tunes every classifier parameter through stage.fit; returns the last step's params."""
    arrays = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
              "labels": np.asarray(labels, np.int32)}

    def make_step(compute, optimizer, schedule):
        return functools.partial(train_step, model=compute, optimizer=optimizer,
                                 schedule=schedule, dropout=config.train.dropout,
                                 seed=config.train.seed)

    tokens = config.train.batch_size * float(enc["attention_mask"].sum(axis=1).mean())
    params, _ = stage.fit(
        config, workdir, mesh, name="evaluate", model_dir=model_dir, model=model,
        host_params=host_params, arrays=arrays, trainable_patterns=CLASSIFIER_PARAMS,
        make_step=make_step, fingerprint=fingerprint, tokens_per_step=int(tokens),
        collate=lambda rows: make_batch(arrays, rows, config.data.max_length, mesh))
    return params


def score(config, model: Transformer, params, tokenizer, test: Split, mesh) -> dict:
    """Clean ACC and attack success of the fine-tuned classifier on the test split."""
    texts, labels = test
    compute = stage.compute_model(config, model.cfg)
    step_fn = jax.jit(functools.partial(predict_step, model=compute))
    run = lambda sentences: predict(step_fn, params, data.tokenize(
        tokenizer, sentences, config.data.max_length), config.eval.batch_size,
        config.data.max_length, mesh)
    t0 = time.time()
    clean_acc = float(np.mean(run(texts) == np.asarray(labels)))
    words = (*config.data.triggers, *config.data.controls)
    poisoned = {t: run([insert_trigger(s, t) for s in texts]) for t in words}
    num = len(texts) * (1 + len(poisoned))
    print(f"evaluate: predicted {num} sentences in {time.time() - t0:.1f}s", flush=True)
    results = {"clean_acc": clean_acc, **attack_success(
        {t: poisoned[t] for t in config.data.triggers}, labels, config.data.num_labels)}
    if config.data.controls:
        floor = attack_success({t: poisoned[t] for t in config.data.controls}, labels,
                               config.data.num_labels)
        results["control"] = {k: floor[k] for k in ("asr", "asr_max", "aasr", "masr")}
        results["excess_aasr"] = results["aasr"] - floor["aasr"]
    return results


def run_evaluation(model_dir: str | os.PathLike, train: Split, test: Split,
                   config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Fine-tunes from `model_dir` on `train` and scores on `test` (in-memory (texts, labels));
    returns the results, also written to workdir/results.json and printed as a table.
    (`train` shadows the module here: this function leaves the loop to `fine_tune`.)"""
    t0 = time.time()
    validate(config)
    workdir = pathlib.Path(workdir).absolute()
    model_dir = hf.resolve_model_dir(str(model_dir))
    num_labels = config.data.num_labels
    train, test = check_split(train, num_labels, "train"), check_split(test, num_labels, "test")
    if len(set(test[1])) < 2:  # fail before fine-tuning, not after
        raise ValueError("test data: every label is the same, but ASR(t, y) needs rows whose "
                         "label is not y; use a test set with at least two labels")
    mesh = _start(config)
    model, host_params = hf.load_pretrained(model_dir, num_labels=num_labels,
                                            seed=config.train.seed)
    stage.check_max_length(config, model)
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
        print(format_table(results), flush=True)
    return results


def format_table(results: dict) -> str:
    """ACC, then one row per trigger: ASR(t, y) for each y and ASR(t); then AASR and MASR; then
    the same for the control words, and the AASR above their floor."""
    ys = list(next(iter(results["asr"].values())))

    def block(r, kind):
        rows = [f"{kind:<10}" + "".join(f"{f'ASR(t,{y})':>11}" for y in ys) + f"{'ASR(t)':>9}"]
        rows += [f"{t:<10}" + "".join(f"{row[y]:>11.4f}" for y in ys) + f"{r['asr_max'][t]:>9.4f}"
                 for t, row in r["asr"].items()]
        return rows

    lines = [f"clean ACC {results['clean_acc']:.4f} ({results['num_test']} test sentences)",
             *block(results, "trigger"), f"AASR {results['aasr']:.4f}   MASR {results['masr']:.4f}"]
    if "control" in results:
        c = results["control"]
        lines += [*block(c, "control"), f"control AASR {c['aasr']:.4f} (this classifier's floor)"
                  f"   AASR above it {results['excess_aasr']:+.4f}"]
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole evaluate stage: read the labeled files the config names, then run_evaluation."""
    validate(config)
    train_split, test_split = load_task(config)
    return run_evaluation(config.model.init_from, train_split, test_split, config, workdir)


if __name__ == "__main__":
    cli.run(train_and_evaluate, name="evaluate", doc=__doc__,
            default_config="configs/evaluate.py")
