r"""RECIPE purification: continual masked-LM pre-training with a Frobenius-norm regularizer.

    python -m recipe_jax.purify --config configs/purify.py:bert --workdir runs/purify \
        --config.model.init_from=path/to/suspicious_hf_dir \
        --config.data.aux_path=../shared/data/bookcorpus/train.tsv

Loss (recipe_spec.md §2): L = MLM(aux batch) + lambda * sum_l ||W_l||_F over the parameters named
by `recipe.regularize`; only `recipe.trainable` parameters are updated. `recipe.distill = g > 0`
(ours, not the paper's) adds g * the relative squared distance between every layer's token states
and those of the model as loaded, on the same aux batch (`losses.relative_state_distance`): it
anchors clean behaviour while the regularizer shrinks what clean text does not use (the
backdoor's neurons). `recipe.groups="neuron"` (ours) sums each FFN neuron's weight norm instead
of each matrix's Frobenius norm (a group lasso). `recipe.proximal = True` (ours) takes the
regularizer out of the loss and applies it as a proximal step after each optimizer update: each
group (matrix or neuron) is scaled by max(0, 1 - lr_t * factor * lambda / ||group||), so under
Adam the penalty keeps its own step size (lr * lambda per step, not Adam-normalized) and a group
that the MLM loss does not hold up reaches exactly zero. `recipe.drop_pooler = True` (ours) leaves
the pooler and the next-sentence head out of the purified model: neither the MLM loss nor the
regularizer reaches them, so a backdoor planted there (POR and NeuBA train the pooler) would pass
through untouched; a downstream fine-tune then initializes a fresh pooler, as `transformers` does
for any `*ForMaskedLM` checkpoint. Writes
`DIR/checkpoints/` (Orbax, resumable: rerun the same command), `DIR/metrics.jsonl` and the
purified model as a Hugging Face dir, `DIR/hf/`. `--help` lists every flag and config key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recipe_jax import cli, data, hf, losses, optim, stage, streaming, train
from recipe_jax.model import Transformer

log = logging.getLogger(__name__)
# Keys that may change between a run and its resumption; any other change is an error.
EXAMPLE_NAME = "bert.encoder.layer.0.intermediate.dense.weight"
RESUMABLE_CHANGES = ("checkpoint.", "train.log_every", "export.", "distributed.", "mesh.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, the bad value and the fix."""
    train.validate(config)
    if config.data.masking not in ("static", "dynamic"):
        train.bad_value("data.masking", config.data.masking, "use 'static' or 'dynamic'")
    r = config.recipe
    if not r.weight >= 0:
        train.bad_value("recipe.weight", r.weight, "lambda must be >= 0")
    if r.groups not in ("matrix", "neuron"):
        train.bad_value("recipe.groups", r.groups, "use 'matrix' (the paper's) or 'neuron'")
    if not r.distill >= 0:
        train.bad_value("recipe.distill", r.distill, "the distillation weight must be >= 0")
    if not r.mlm and r.weight == 0 and r.distill == 0:
        train.bad_value("recipe.mlm", r.mlm, "with recipe.weight=0 and recipe.distill=0 there "
                        "would be no loss at all")
    train.check_patterns(r.regularize, "recipe.regularize")
    train.check_patterns(r.trainable, "recipe.trainable")
    if not r.trainable:
        train.bad_value("recipe.trainable", r.trainable, "name at least one parameter regex")


# ---------------------------------------------------------------------------- the train step

def penalty(params, recipe, cfg) -> jax.Array:
    """The regularizer: sum of ||W||_F (`recipe.groups="matrix"`) or of neuron norms."""
    return losses.frobenius_penalty(params, recipe.regularize, cfg.model_type,
                                    groups=recipe.groups, ffn_size=cfg.intermediate_size)


def loss_fn(trainable, frozen, batch, reference, rng, *, model: Transformer, recipe,
            dropout: bool):
    """RECIPE loss and its parts (pure). `batch` holds masked ids and [B, M] slots; `reference`
    (the model as loaded) is used only when `recipe.distill > 0`."""
    params = train.merge_params(trainable, frozen)
    parts = {}
    loss = jnp.zeros((), jnp.float32)
    if recipe.mlm or recipe.distill > 0:
        def encode(p):  # the same dropout masks for both models: equal weights, equal states
            return model.apply({"params": p}, batch["input_ids"], batch["attention_mask"], None,
                               deterministic=not dropout, rngs={"dropout": rng},
                               method=Transformer.encode)

        layers = encode(params)
    if recipe.mlm:
        logits_bmv = model.apply({"params": params}, layers[-1], batch["positions"],
                                 method=Transformer.mlm_logits)
        m = losses.mlm_loss(logits_bmv, batch["labels"], batch["weights"])
        mlm = m["loss_sum"] / jnp.maximum(m["count"], 1.0)
        loss += mlm
        parts.update(mlm_loss=mlm, mlm_acc=m["correct"] / jnp.maximum(m["count"], 1.0),
                     masked_tokens=m["count"])
    if recipe.distill > 0:
        ref_layers = jax.lax.stop_gradient(encode(reference))
        distill = losses.relative_state_distance(layers[1:], ref_layers[1:],
                                                 batch["attention_mask"])
        loss += recipe.distill * distill
        parts["distill_mse"] = distill
    reg = penalty(params, recipe, model.cfg)
    if not recipe.proximal:  # else applied after the update (proximal_shrink)
        loss += recipe.weight * reg
    parts["reg_loss"] = reg
    return loss, parts


def proximal_shrink(trainable, thresholds, recipe, cfg):
    """The group-lasso proximal step on every trainable leaf `recipe.regularize` names: each
    group (the whole matrix, or each FFN neuron with `recipe.groups="neuron"`) is scaled by
    max(0, 1 - t / ||group||), t = the leaf's threshold (a tree like `trainable`)."""
    def shrink(path, w, t):
        name = hf.hf_name(tuple(k.key for k in path), cfg.model_type)
        if not losses.matches(recipe.regularize, name):
            return w
        if recipe.groups == "neuron":
            norms = jnp.expand_dims(losses.neuron_norms(w, cfg.intermediate_size),
                                    losses.neuron_reduce_axis(w, cfg.intermediate_size))
        else:
            norms = losses.frobenius_norm(w)
        scale = jnp.maximum(0.0, 1.0 - t / jnp.where(norms > 0, norms, 1.0))
        return (w * jnp.where(norms > 0, scale, 0.0)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(shrink, trainable, thresholds)


def train_step(state: train.TrainState, frozen, batch, *reference, model, optimizer, schedule,
               recipe, dropout: bool, seed: int, masking: dict | None, lr_scales=(),
               depth_lr_scales=()):
    """One RECIPE update (pure). With `masking`, masks are drawn here from (seed, step). With
    `recipe.proximal`, the regularizer's proximal step follows the update, its step size lr_t
    times each parameter's `train.lr_scales` / `train.depth_lr_scales` factor."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    if masking is not None:
        batch = {**batch, **data.mask_tokens(jax.random.fold_in(rng, 1), batch["input_ids"],
                                             batch["candidates"], **masking)}
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, parts), grads = grad_fn(state.trainable, frozen, batch,
                                   reference[0] if reference else None,
                                   jax.random.fold_in(rng, 2), model=model, recipe=recipe,
                                   dropout=dropout)
    lr = schedule(state.step)  # the learning rate of this update
    state, metrics = train.apply_gradients(state, grads, optimizer, schedule)
    if recipe.proximal:
        factors = optim.lr_scale_tree(state.trainable, lr_scales, model.cfg.model_type,
                                      depth_lr_scales, model.cfg.num_hidden_layers)
        thresholds = jax.tree.map(lambda f: lr * f * recipe.weight, factors)
        state = state.replace(trainable=proximal_shrink(state.trainable, thresholds, recipe,
                                                        model.cfg))
    tokens = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
    return state, {"loss": loss, **parts, **metrics, "tokens": tokens}


def step_maker(config, masking: dict) -> Callable:
    """`make_step(compute_model, optimizer, schedule)` for stage.fit (and the AOT report)."""

    def make_step(compute, optimizer, schedule):
        return functools.partial(
            train_step, model=compute, optimizer=optimizer, schedule=schedule,
            recipe=config.recipe, dropout=config.train.dropout, seed=config.train.seed,
            masking=masking if config.data.masking == "dynamic" else None,
            lr_scales=tuple(config.train.get("lr_scales", ())),
            depth_lr_scales=tuple(config.train.get("depth_lr_scales", ())))

    return make_step


# ------------------------------------------------------------------------------------- data

def prepare_data(config, texts: list[str], model_dir, vocab_size: int
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """Tokenized aux data on the host; with static masking, masks drawn once from the seed."""
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

def drop_pooler(model: Transformer, params: dict) -> tuple[Transformer, dict]:
    """The model and params without the pooler and the NSP head on it (a no-op without them)."""
    if not (model.cfg.pooler or model.cfg.nsp_head):
        return model, params
    log.info("recipe.drop_pooler: the export leaves out the pooler and NSP head; a downstream "
             "fine-tune initializes them fresh")
    cfg = dataclasses.replace(model.cfg, pooler=False, nsp_head=False)
    return Transformer(cfg), {k: v for k, v in params.items() if k not in ("pooler", "nsp")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole purify stage; returns a summary dict (also written to DIR/summary.json)."""
    validate(config)
    mesh = stage.start(config)
    workdir = pathlib.Path(workdir).absolute()
    model_dir, texts, model, host_params = stage.load(config)
    if config.recipe.drop_pooler:
        model, host_params = drop_pooler(model, host_params)
    cfg = model.cfg
    if config.recipe.weight > 0 and not losses.select_names(
            host_params, config.recipe.regularize, cfg.model_type):
        raise ValueError(f"recipe.regularize={tuple(config.recipe.regularize)} matches no "
                         f"parameter; names look like {EXAMPLE_NAME}")
    if config.data.streaming:  # `texts` is a lazy streaming.TextIndex
        arrays, masking = streaming.prepare(config, texts, model_dir, cfg.vocab_size)
    else:
        arrays, masking = prepare_data(config, texts, model_dir, cfg.vocab_size)
    reference = stage.reference_copy(host_params, cfg, mesh) if config.recipe.distill > 0 else ()
    params, step = stage.fit(config, workdir, mesh, name="purify", model_dir=model_dir,
                             model=model, host_params=host_params, arrays=arrays,
                             trainable_patterns=config.recipe.trainable,
                             make_step=step_maker(config, masking), extra_args=reference)
    reg = penalty(params, config.recipe, cfg)
    summary = {"step": step, "reg_loss": float(reg)}
    return stage.export_hf(workdir, "purify", model, params, verify=config.export.verify,
                           summary=summary)


if __name__ == "__main__":
    cli.run(train_and_evaluate, name="purify", doc=__doc__, default_config="configs/purify.py")
