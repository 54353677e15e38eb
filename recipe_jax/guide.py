"""Scan-guided purification (the `guided` preset of configs/purify.py): unlearn the tokens a
trigger scan flags, without labels.

The scan (`recipe_jax.scan`) names tokens (and token pairs) that move a model's outputs far from
where ordinary words move them. The guided term asks the model to ignore them: each aux sentence
x of a sub-batch gets one flagged candidate t inserted at a random word start (x + t), and the
encoder's last hidden states of x + t, at [CLS] and at every token of x (aligned past the
insertion), are pulled to the states the *loaded* model gives x itself (a frozen reference, no
gradient; the backdoor does not fire on clean text):

    guide(x, t) = |h(x + t)[CLS] - h0(x)[CLS]|^2 / H + mean_j |h(x + t)[j'] - h0(x)[j]|^2 / H

    L = MLM + lambda * sum ||W||_F + guide.weight * mean_b guide(x_b, t_b)

The MLM and regularizer terms are RECIPE's, unchanged; `guide.weight = 0` or an empty candidate
list is exactly that loss (the `strong` preset). The candidates come from a scan of the loaded
model (or `guide.scan_report`, a report.json of an earlier scan of it); after training the result
is scanned again and, while a candidate is still flagged, trained `guide.round_steps` more steps,
at most `guide.rounds` rounds in all (docs/guided.md).

    triggers = guide.candidates(report, tokenizer, max_candidates=64)   # [K, 2] ids, -1 padded
    ids, mask, src, keep = guide.insert(ids_bl, mask_bl, triggers_b2, rng, word_start_v)

The `guide.*` settings live here too: `validate`, and what a guided run trains with once its
first scan has found candidates (`effective_config`, recorded in DIR/config.json), against which
a finished run is compared (`run_differences`).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recipe_jax import checkpoint, config_blocks
from recipe_jax.config_blocks import bad_value
from recipe_jax.model import Transformer

TARGETS = ("loaded", "current")  # guide.target: whose states of x the term pulls x + t to


def candidates(report: dict, tokenizer, max_candidates: int) -> np.ndarray:
    """[K, 2] token ids of what `report` flags, in its order (pairs as two ids, single tokens
    padded with -1), at most `max_candidates` rows; [0, 2] when the verdict is clean."""
    rows: list[list[int]] = []
    for name in report.get("flagged", []):
        pieces = name.split(" ") if " " in name else [name]
        ids = tokenizer.convert_tokens_to_ids(pieces)
        if any(i is None or i == tokenizer.unk_token_id for i in ids) or len(ids) > 2:
            continue  # not a token of this tokenizer (a report of another model)
        rows.append(list(ids) + [-1] * (2 - len(ids)))
    return np.asarray(rows[:max_candidates], np.int32).reshape(-1, 2)


def union(a_k2: np.ndarray, b_k2: np.ndarray, limit: int) -> np.ndarray:
    """The rows of `a` then the rows of `b` not in `a`, at most `limit`."""
    seen = {tuple(r) for r in a_k2.tolist()}
    extra = [r for r in b_k2.tolist() if tuple(r) not in seen]
    return np.asarray(a_k2.tolist() + extra, np.int32).reshape(-1, 2)[:limit]


def insert(ids_bl: jax.Array, mask_bl: jax.Array, triggers_b2: jax.Array, rng: jax.Array,
           word_start_v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Each row's trigger (1 or 2 ids; -1 = none) inserted at one random word start after [CLS]
    (any position 1..n-1 where the token begins a word, [SEP] included), the rest shifted right
    and cut at L. Returns (ids, mask, src, keep): `src[b, j]` is the position in the clean row
    that position j of the new row holds, `keep[b, j]` whether it holds a clean token at all
    (not the trigger, not padding)."""
    b, length = ids_bl.shape
    n_b = 1 + (triggers_b2[:, 1] >= 0).astype(jnp.int32)
    j_l = jnp.arange(length)
    lengths_b = jnp.sum(mask_bl, axis=1)
    allowed_bl = (word_start_v[ids_bl] | (j_l[None] == 1)) & (j_l[None] >= 1) & (
        j_l[None] < lengths_b[:, None])
    noise_bl = jax.random.gumbel(rng, (b, length))
    pos_b = jnp.argmax(jnp.where(allowed_bl, noise_bl, -jnp.inf), axis=1)
    rel_bl = j_l[None] - pos_b[:, None]
    inserted_bl = (rel_bl >= 0) & (rel_bl < n_b[:, None])
    src_bl = jnp.where(rel_bl < 0, j_l[None], jnp.clip(j_l[None] - n_b[:, None], 0, length - 1))
    shifted_ids = jnp.take_along_axis(ids_bl, src_bl, axis=1)
    shifted_mask = jnp.take_along_axis(mask_bl, src_bl, axis=1)
    shifted_mask = jnp.where((rel_bl >= 0) & (j_l[None] < n_b[:, None]), 0, shifted_mask)
    trig_bl = jnp.take_along_axis(triggers_b2, jnp.clip(rel_bl, 0, 1), axis=1)
    new_ids = jnp.where(inserted_bl, trig_bl, shifted_ids)
    new_mask = jnp.where(inserted_bl, 1, shifted_mask)
    keep_bl = (~inserted_bl) & (shifted_mask > 0)
    return new_ids, new_mask.astype(mask_bl.dtype), src_bl, keep_bl


def guide_term(params, reference, batch, rng, triggers_k2, word_start_v, *, model: Transformer,
               rows: int, dropout: bool) -> jax.Array:
    """mean_b guide(x_b, t_b) over the first `rows` rows of `batch` (clean `input_ids`), each
    with a candidate drawn uniformly from `triggers_k2` (see the module doc). The target is
    `reference`'s states of x, or with `reference=None` those of `params` themselves (no
    gradient flows through the target either way)."""
    ids_bl, mask_bl = batch["input_ids"][:rows], batch["attention_mask"][:rows]
    k_rng, pos_rng, drop_rng = jax.random.split(rng, 3)
    pick_b = jax.random.randint(k_rng, (ids_bl.shape[0],), 0, triggers_k2.shape[0])
    t_ids, t_mask, src_bl, keep_bl = insert(ids_bl, mask_bl, triggers_k2[pick_b], pos_rng,
                                            word_start_v)
    source = params if reference is None else reference
    target_blh = jax.lax.stop_gradient(model.apply(
        {"params": source}, ids_bl, mask_bl, None, deterministic=True,
        method=Transformer.encode)[-1]).astype(jnp.float32)
    hidden_blh = model.apply({"params": params}, t_ids, t_mask, None, deterministic=not dropout,
                             rngs={"dropout": drop_rng},
                             method=Transformer.encode)[-1].astype(jnp.float32)
    cls = jnp.mean(jnp.square(hidden_blh[:, 0] - target_blh[:, 0]))
    aligned_blh = jnp.take_along_axis(target_blh, src_bl[..., None], axis=1)
    keep_bl = keep_bl.at[:, 0].set(False).astype(jnp.float32)
    per_token_bl = jnp.mean(jnp.square(hidden_blh - aligned_blh), axis=-1)
    tokens = jnp.sum(per_token_bl * keep_bl) / jnp.maximum(jnp.sum(keep_bl), 1.0)
    return cls + tokens


def describe(triggers_k2: np.ndarray, tokenizer) -> Sequence[str]:
    """The candidates as text: `cf`, `mb+c1`."""
    return ["+".join(tokenizer.convert_ids_to_tokens([int(i) for i in row if i >= 0]))
            for row in np.asarray(triggers_k2)]


# ----------------------------------------------------------------------------- settings

def validate(config: ml_collections.ConfigDict) -> None:
    """guide.* (purify.validate calls it): raises ValueError naming the key, the value, the fix."""
    g = config.guide
    if not g.enabled:
        return
    if not 0 <= g.weight < float("inf"):
        bad_value("guide.weight", g.weight, "use a finite number >= 0")
    if g.rows < 1:
        bad_value("guide.rows", g.rows, "use a positive count (at most train.batch_size are used)")
    for key in ("max_candidates", "rounds"):
        if g[key] < 1:
            bad_value(f"guide.{key}", g[key], "use a positive count")
    if g.round_steps < 0:
        bad_value("guide.round_steps", g.round_steps, "use >= 0 (0 = half the first round)")
    config_blocks.check_patterns(g.trainable, "guide.trainable")
    if g.head_warmup_steps < 0:
        bad_value("guide.head_warmup_steps", g.head_warmup_steps,
                  "use >= 0 (0: recipe.head_warmup_steps applies)")
    if not g.head_warmup_lr >= 0:
        bad_value("guide.head_warmup_lr", g.head_warmup_lr, "use >= 0 (0: train.learning_rate)")
    if g.head_warmup_steps and not config.recipe.mlm:
        bad_value("guide.head_warmup_steps", g.head_warmup_steps,
                  "a head warm-up serves the MLM term; with recipe.mlm=False set it to 0")
    if g.target not in TARGETS:
        bad_value("guide.target", g.target, f"choose one of {', '.join(TARGETS)}")
    config_blocks.parse_lr_scales(g.lr_scales)
    if config.data.masking != "dynamic":
        bad_value("data.masking", config.data.masking,
                  "guide.enabled reads the clean sentences, which only dynamic masking keeps; "
                  "use --config.data.masking=dynamic")


# What the guide.* settings replace when the guided first scan finds candidate triggers (a
# trigger lives beyond the FFN too: its embedding row); the warm-up pair only when its steps > 0:
# the MLM head learns before the encoder unlearns through it (docs/guided.md).
REPLACES = {"guide.trainable": "recipe.trainable", "guide.lr_scales": "train.lr_scales"}
REPLACES_WARMUP = {"guide.head_warmup_steps": "recipe.head_warmup_steps",
                   "guide.head_warmup_lr": "recipe.head_warmup_lr"}


def effective_config(config: ml_collections.ConfigDict, candidates: bool):
    """The settings a run trains with (what DIR/config.json records): with candidates, each
    guide.* key of REPLACES (and REPLACES_WARMUP when `guide.head_warmup_steps` > 0) sets the
    setting it replaces. With none, it is `config`."""
    if not candidates:
        return config
    config = config.copy_and_resolve_references()
    replaces = REPLACES | (REPLACES_WARMUP if config.guide.head_warmup_steps else {})
    for key, replaced in replaces.items():
        section, name = replaced.split(".")
        config[section][name] = config.guide[key.split(".")[1]]
    return config


def run_differences(run_dir: pathlib.Path, config) -> list[tuple[str, Any, Any]]:
    """(key, value there, value now) for each setting in which the finished purify run in
    `run_dir` differs from `config` (checkpoint.record_differences; [] without a record): a
    study that reuses finished runs must not report a stale one under edited settings. A guided
    run records what it trained with, which depends on whether its first scan found candidates
    (its summary.json says; before it exists either form may match): with candidates, what the
    guide.* replacements did shows in the settings they replaced; with none, guide.* did nothing
    but switch the first scan on. `guide.scan_report` (a scan of the same model, reused) is no
    setting."""
    forms = [(config, ("guide.scan_report",))]  # (settings, keys that did nothing there)
    if "guide" in config and config.guide.enabled:
        summary = pathlib.Path(run_dir) / "summary.json"
        guided = json.loads(summary.read_text()).get("guide") if summary.is_file() else None
        found = (effective_config(config, True),
                 ("guide.scan_report", *REPLACES, *REPLACES_WARMUP))
        if guided is None:
            forms.append(found)
        elif guided.get("candidates"):
            forms = [found]
        else:
            forms = [(config, tuple(f"guide.{k}" for k in config.guide if k != "enabled"))]
    diffs = [[d for d in checkpoint.record_differences(run_dir, c) if d[0] not in inert]
             for c, inert in forms]
    return min(diffs, key=len)
