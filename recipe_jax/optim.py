"""The optimizer every stage shares: global-norm clip -> AdamW with linear warm-up and decay,
then optional per-parameter learning-rate factors.

Two config keys give parameters their own learning rate (lr x factor), and they multiply:
- `train.lr_scales` ("REGEX=FACTOR", ...): by Hugging Face name, the first matching rule wins;
- `train.depth_lr_scales` (F_1, ..., F_k): by depth. The encoder's layers are cut into k bands
  of equal depth, bottom to top, and band j trains at lr x F_j, whatever the model's depth:
  (0.5, 1.0) is layers 0-2 of a 6-layer MiniLM at half the lr, and layers 0-5 of BERT-base.
Parameters outside the encoder layers (embeddings, heads) get no depth factor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import optax

from recipe_jax import hf
from recipe_jax.config_blocks import bad_value, parse_depth_lr_scales, parse_lr_scales

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def depth_band(layer: int, num_layers: int, num_bands: int) -> int:
    """The band (0 = bottom) of encoder layer `layer` when `num_layers` are cut into
    `num_bands` bands of equal depth."""
    return layer * num_bands // num_layers


def lr_scale_tree(trainable, entries: Sequence[str], model_type: str,
                  depth: Sequence[float] = (), num_layers: int | None = None):
    """Per-leaf learning-rate factors (a tree like `trainable`): the first `train.lr_scales`
    rule whose regex matches the leaf's HF name (else 1), times the leaf's depth-band factor
    from `train.depth_lr_scales` (needs `num_layers`). Every rule must match something."""
    rules, used = parse_lr_scales(entries), set()
    depth = parse_depth_lr_scales(depth, num_layers) if depth else ()
    if depth and num_layers is None:
        raise ValueError("train.depth_lr_scales needs the model's depth: pass "
                         "make_optimizer(model_cfg=) or lr_scale_tree(num_layers=)")

    def factor(path, _):
        flax_path = tuple(k.key for k in path)
        name = hf.hf_name(flax_path, model_type)
        value = 1.0
        for pattern, rule_value in rules:
            if hf.selected(flax_path, (pattern,), model_type):
                used.add(pattern)
                value = rule_value
                break
        layer = _LAYER.search(name)
        if depth and layer:
            value *= depth[depth_band(int(layer.group(1)), num_layers, len(depth))]
        return value

    tree = jax.tree_util.tree_map_with_path(factor, trainable)
    unused = [p for p, _ in rules if p not in used]
    if unused:
        bad_value("train.lr_scales", tuple(entries),
                  f"{unused} match no trainable parameter; {hf.selection_hint(model_type)}")
    return tree


def scale_updates(factors) -> optax.GradientTransformation:
    """Multiplies each update leaf by its factor (after AdamW: a per-parameter lr)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * f, updates, factors), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(train_cfg, total_steps: int, *, trainable=None, model_cfg=None
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """Global-norm clip -> AdamW, linear warm-up then linear decay to 0 (as HF's scheduler),
    then the per-parameter factors of `train.lr_scales` and `train.depth_lr_scales` (which
    need `trainable`, and the latter the model's depth from `model_cfg`, a ModelConfig)."""
    lr = train_cfg.learning_rate
    warmup = min(train_cfg.warmup_steps, total_steps)
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, lr, max(warmup, 1)),
        optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1)),
    ], [warmup]) if warmup else optax.linear_schedule(lr, 0.0, max(total_steps, 1))
    parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                             eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay))
    entries, depth = train_cfg.lr_scales, train_cfg.depth_lr_scales
    if entries or depth:
        if trainable is None:
            raise ValueError("train.lr_scales and train.depth_lr_scales need the trainable "
                             "parameters: pass trainable=")
        parts.append(scale_updates(lr_scale_tree(
            trainable, entries, model_cfg.model_type if model_cfg else "bert", depth,
            model_cfg.num_hidden_layers if model_cfg else None)))
    return optax.chain(*parts), schedule
