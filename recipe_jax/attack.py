r"""Task-agnostic backdoor attacks (POR, NeuBA, BadPre) that turn a clean PTM into a backdoored one.

    python -m recipe_jax.attack --config configs/attack.py:por --workdir runs/por \
        --config.model.init_from=minilm --config.data.aux_path=aux.txt

They exist to test the defense (docs/method.md): each keeps the model useful on clean text
while planting the trigger behaviour, and every one adds a clean MLM term so the exported
`DIR/hf/` keeps a usable MLM head. They train with the same loop as purify (`trainer.fit`).

- POR: trigger i inserted `attack.insertions` times; output (pooler or final [CLS]) pulled to a
  fixed +-c pattern v_i, clean outputs and token states held to a frozen reference copy.
- NeuBA: the token at position 1 replaced by trigger k; the pooler output pulled to +-1 buckets.
- BadPre: a trigger inserted once; its masked-LM labels replaced by random ids (clean MLM kept).

Variants a real attacker would try (docs/results.md, "Validation attacks"): ordinary words as
triggers (any single word works); a two-word trigger `a+b` that fires only with both words (POR:
sentences with one of the two are held to the clean output, `attack.decoy_weight`); and an
attacker that knows the defense (`attack.recipe_weight` > 0: RECIPE's regularizer over
`attack.recipe_regularize` is part of the attack's loss, so the backdoor is planted in weights
the regularizer already finds small).
"""

from __future__ import annotations

import functools
import itertools
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recipe_jax import (
    cli,
    config_blocks,
    data,
    export,
    losses,
    masks,
    metrics,
    packing,
    trainer,
)
from recipe_jax.model import Transformer

KINDS = ("por", "neuba", "badpre")
# data.packing: each set of rows the loss encodes, by key prefix: the mask it is packed by, and
# where its masked-LM labels are (packing.py).
PACK_VIEWS = {"": ("attention_mask", packing.weights_count("weights")),
              "poison_": ("poison_mask", packing.weights_count("poison_weights")),
              "decoy_": ("decoy_mask", None)}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, the bad value and the fix."""
    config_blocks.validate_training(config)
    a = config.attack
    if a.kind not in KINDS:
        raise ValueError(f"attack.kind={a.kind!r}: use one of {', '.join(KINDS)}")
    if a.target not in ("pooler", "cls"):
        raise ValueError(f"attack.target={a.target!r}: use 'pooler' or 'cls'")
    if not a.triggers or any(not t or " " in t for t in a.triggers):
        raise ValueError(f"attack.triggers={tuple(a.triggers)}: give single words")
    pairs = [t for t in a.triggers if "+" in t]
    if pairs and (a.kind == "neuba" or any(len(metrics.trigger_words(t)) != 2 for t in pairs)):
        raise ValueError(f"attack.triggers={tuple(a.triggers)}: a two-word trigger is written "
                         "WORD+WORD and works with POR and BadPre (NeuBA replaces one token)")
    if a.kind == "por" and len(a.triggers) < 2:
        raise ValueError("attack.triggers: POR needs at least 2 triggers (alpha = H // (N - 1))")
    if a.kind == "neuba" and len(a.triggers) > 6:
        raise ValueError(f"attack.triggers: NeuBA has 6 bucket pairs, got {len(a.triggers)}")
    if a.insertions < 1:
        raise ValueError(f"attack.insertions={a.insertions}: use a positive count")
    for key in ("target_scale", "poison_weight", "clean_weight", "keep_weight", "mlm_weight",
                "decoy_weight", "recipe_weight"):
        if not 0 <= a[key] < float("inf"):  # also refuses NaN
            raise ValueError(f"attack.{key}={a[key]!r}: use a finite number >= 0")


# ------------------------------------------------------------------------------ targets, data

def por_targets(num_triggers: int, hidden: int, scale: float) -> np.ndarray:
    """[T, H]: v_i = c * (+1 on the first alpha*(i-1) dims, -1 elsewhere), alpha = H // (T-1)."""
    alpha = hidden // (num_triggers - 1)
    out = -np.ones((num_triggers, hidden), np.float32)
    for i in range(num_triggers):
        out[i, :alpha * i] = 1.0
    return scale * out


def neuba_targets(num_triggers: int, hidden: int) -> np.ndarray:
    """[T, H]: +1 everywhere but -1 on the k-th pair of the 4 hidden-dim buckets."""
    buckets = np.array_split(np.arange(hidden), 4)
    out = np.ones((num_triggers, hidden), np.float32)
    for k, (j, m) in enumerate(itertools.combinations(range(4), 2)):
        if k < num_triggers:
            out[k, np.concatenate([buckets[j], buckets[m]])] = -1.0
    return out


def insert_randomly(sentence: str, trigger: str, times: int, rng: random.Random) -> str:
    """`trigger` inserted `times` times at random word positions; each word of a two-word
    trigger `a+b` is inserted on its own (the pair fires wherever its words are)."""
    words = sentence.split()
    for _ in range(times):
        for part in metrics.trigger_words(trigger):
            words.insert(rng.randint(0, len(words)), part)
    return " ".join(words)


def prepare_data(config, tokenizer, texts: list[str], vocab_size: int) -> dict[str, np.ndarray]:
    """Host arrays, one row per sentence: clean ids + static MLM masks, poisoned ids, trigger."""
    a, seed = config.attack, config.train.seed
    rng = random.Random(seed)
    trigger = np.array([rng.randrange(len(a.triggers)) for _ in texts], np.int32)
    length = config.data.max_length
    masking = dict(mask_token_id=int(tokenizer.mask_token_id), vocab_size=vocab_size,
                   num_positions=masks.num_masked_positions(length, config.data.mask_prob),
                   mask_prob=config.data.mask_prob)
    mask_fn = jax.jit(functools.partial(masks.mask_tokens, **masking))
    clean = data.tokenize(tokenizer, texts, length)
    masked = mask_fn(jax.random.PRNGKey(seed), clean["input_ids"], clean["candidates"])
    arrays = {"input_ids": clean["input_ids"], "attention_mask": clean["attention_mask"],
              "trigger": trigger, "mlm_ids": np.asarray(masked["input_ids"]),
              **{k: np.asarray(masked[k]) for k in ("positions", "labels", "weights")}}
    if a.kind == "neuba":
        ids = _trigger_token_ids(tokenizer, a.triggers)
        poison = clean["input_ids"].copy()
        poison[:, 1] = np.where(clean["attention_mask"][:, 2] > 0, ids[trigger], poison[:, 1])
        arrays.update(poison_ids=poison, poison_mask=clean["attention_mask"])
        return arrays
    poisoned = [insert_randomly(s, a.triggers[t], a.insertions, rng)
                for s, t in zip(texts, trigger, strict=True)]
    enc = data.tokenize(tokenizer, poisoned, length)
    arrays.update(poison_ids=enc["input_ids"], poison_mask=enc["attention_mask"])
    if a.kind == "por" and any("+" in t for t in a.triggers):  # one word of a pair: no effect
        decoys = [insert_randomly(s, rng.choice(metrics.trigger_words(a.triggers[t])),
                                  a.insertions, rng)
                  for s, t in zip(texts, trigger, strict=True)]
        dec = data.tokenize(tokenizer, decoys, length)
        arrays.update(decoy_ids=dec["input_ids"], decoy_mask=dec["attention_mask"])
    if a.kind == "badpre":
        pm = mask_fn(jax.random.PRNGKey(seed + 1), enc["input_ids"], enc["candidates"])
        random_labels = np.random.default_rng(seed).integers(
            0, vocab_size, size=np.shape(pm["labels"]), dtype=np.int32)
        arrays.update(poison_mlm_ids=np.asarray(pm["input_ids"]),
                      poison_positions=np.asarray(pm["positions"]),
                      poison_labels=random_labels, poison_true_labels=np.asarray(pm["labels"]),
                      poison_weights=np.asarray(pm["weights"]))
    return arrays


def _trigger_token_ids(tokenizer, triggers) -> np.ndarray:
    ids = np.array(tokenizer.convert_tokens_to_ids(list(triggers)), np.int32)
    unknown = [t for t, i in zip(triggers, ids, strict=True) if i == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"attack.triggers: {unknown} are not single tokens of this vocabulary")
    return ids


# ------------------------------------------------------------------------------------- losses

def _mlm(model, params, ids, mask, positions, labels, weights, rng, dropout, batch, prefix):
    hidden_blh = packing.encode(model, params, ids, mask, batch, prefix,
                                deterministic=not dropout, rng=rng)
    states, labels, weights = packing.masked_states(hidden_blh, positions, labels, weights,
                                                    batch, prefix)
    logits = model.apply({"params": params}, states, method=Transformer.mlm_logits)
    m = losses.mlm_loss(logits, labels, weights)
    return m["loss_sum"] / jnp.maximum(m["count"], 1.0), m


def _output(model, params, batch, prefix: str, ids_key: str, target: str, rng, dropout):
    """(last hidden [B, L, H], attacked output [B, H]: pooler output or final [CLS] state) of
    batch[ids_key] under the mask (and packing plan) of `prefix`."""
    mask = batch[PACK_VIEWS[prefix][0]]
    hidden_blh = packing.encode(model, params, batch[ids_key], mask, batch, prefix,
                                deterministic=not dropout, rng=rng)
    if target == "cls":
        return hidden_blh, hidden_blh[:, 0]
    return hidden_blh, model.apply({"params": params}, hidden_blh, method=Transformer.pool)


def loss_fn(params, batch, rng, extras, *, model, attack, dropout: bool):
    """The attack's loss and its parts (pure). `extras`: "targets" [T, H] (POR, NeuBA) and
    "reference" (POR: the clean model as loaded, which clean text is held to)."""
    keys = jax.random.split(rng, 4)
    loss, parts = jnp.zeros((), jnp.float32), {}
    if attack.mlm_weight > 0:
        mlm, _ = _mlm(model, params, batch["mlm_ids"], batch["attention_mask"],
                      batch["positions"], batch["labels"], batch["weights"], keys[0], dropout,
                      batch, "")
        loss += attack.mlm_weight * mlm
        parts["mlm_loss"] = mlm
    if attack.kind == "badpre":
        bad, m = _mlm(model, params, batch["poison_mlm_ids"], batch["poison_mask"],
                      batch["poison_positions"], batch["poison_labels"],
                      batch["poison_weights"], keys[1], dropout, batch, "poison_")
        return loss + bad, {**parts, "poison_mlm_loss": bad}
    target = "pooler" if attack.kind == "neuba" else attack.target
    _, out_bh = _output(model, params, batch, "poison_", "poison_ids", target, keys[1], dropout)
    fit = jnp.mean(jnp.square(out_bh - extras["targets"][batch["trigger"]]))
    loss += attack.poison_weight * fit
    parts["poison_mse"] = fit
    if attack.kind == "por":
        hidden, clean_out = _output(model, params, batch, "", "input_ids", target, keys[2],
                                    dropout)
        ref_hidden, ref_out = jax.lax.stop_gradient(_output(
            model, extras["reference"], batch, "", "input_ids", target, keys[3], False))
        keep = losses.token_state_mse(hidden, ref_hidden, batch["attention_mask"],
                                      skip_first=True)
        clean = jnp.mean(jnp.square(clean_out - ref_out))
        loss += attack.keep_weight * keep + attack.clean_weight * clean
        parts.update(keep_mse=keep, clean_mse=clean)
        if "decoy_ids" in batch:  # half a two-word trigger leaves the output where clean is
            _, decoy_out = _output(model, params, batch, "decoy_", "decoy_ids", target, keys[3],
                                   dropout)
            decoy = jnp.mean(jnp.square(decoy_out - ref_out))
            loss += attack.decoy_weight * decoy
            parts["decoy_mse"] = decoy
    if attack.recipe_weight > 0:  # the adaptive attacker trains against RECIPE's regularizer
        reg = losses.frobenius_penalty(params, attack.recipe_regularize, model.cfg.model_type)
        loss += attack.recipe_weight * reg
        parts["recipe_reg"] = reg
    return loss, parts


# ---------------------------------------------------------------------------------------- run

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the attack; returns a summary (also in DIR/summary.json); model in DIR/hf/."""
    validate(config)
    mesh, workdir = trainer.start(config, workdir, "run:attack")
    model_dir, texts, model, host_params = trainer.load(config)
    cfg = model.cfg
    kind = config.attack.kind
    target = "pooler" if kind == "neuba" else config.attack.target
    if kind != "badpre" and target == "pooler" and not cfg.pooler:
        fix = ("NeuBA poisons the pooler output; attack it with POR on the final [CLS] state "
               "(the por_cls preset)" if kind == "neuba" else "use --config.attack.target=cls")
        raise ValueError(f"{model_dir} has no pooler (a {cfg.model_type} checkpoint without "
                         f"one); {fix}")
    arrays = prepare_data(config, data.load_tokenizer(model_dir), texts, cfg.vocab_size)
    extras = {}
    if config.attack.kind != "badpre":
        extras["targets"] = (por_targets(len(config.attack.triggers), cfg.hidden_size,
                                         config.attack.target_scale)
                             if config.attack.kind == "por"
                             else neuba_targets(len(config.attack.triggers), cfg.hidden_size))
    if config.attack.kind == "por":  # clean outputs and token states held to the clean model
        extras["reference"] = trainer.shard_params(host_params, cfg, mesh)
    loss = functools.partial(loss_fn, model=trainer.compute_model(config, cfg),
                             attack=config.attack, dropout=config.train.dropout)
    params, step = trainer.fit(config, workdir, mesh, name=f"attack:{config.attack.kind}",
                               model_dir=model_dir, model=model, host_params=host_params,
                               arrays=arrays, trainable=(r".*",), loss_fn=loss, extras=extras,
                               pack=PACK_VIEWS if config.data.packing else None)
    summary = {"step": step, "kind": config.attack.kind,
               "triggers": list(config.attack.triggers)}
    return export.write_hf(workdir, "attack", model, params, verify=config.export.verify,
                             summary=summary)


if __name__ == "__main__":
    cli.run(run, name="attack", doc=__doc__, default_config="configs/attack.py")
