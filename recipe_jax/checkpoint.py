"""Orbax checkpoints of recipe_jax runs, and the model description that travels with them.

A run dir (what `convert` writes, and a purify/attack workdir) holds:

    DIR/source/model_config.json   ModelConfig (architecture + which heads exist)
    DIR/source/config.json         the source checkpoint's HF config (for export)
    DIR/source/<tokenizer files>   copied from the source, so export needs nothing else
    DIR/checkpoints/<step>/        Orbax CheckpointManager steps: items `params` (all model
                                   parameters), and for training runs `opt_state` and `meta`

Orbax writes each step to a temp dir and renames it when complete, so `all_steps()` never lists a
half-written step (a temp dir left by a killed save is deleted when the next run opens the
manager). A complete step can still be damaged later (a truncated or deleted file): restoring
tries the newest step, then older ones, warning about each it skips (`restore_newest`); a
training run moves a damaged step aside to DIR/checkpoints_damaged/ so that it can be rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from recipe_jax import hf
from recipe_jax.model import ModelConfig, Transformer, abstract_params

log = logging.getLogger(__name__)
ITEMS = ("params", "opt_state", "meta")


class CheckpointError(ValueError):
    """A run dir has checkpoints but none of them can be restored; the message lists why."""


def write_source(run_dir: str | os.PathLike, cfg: ModelConfig, hf_config: dict[str, Any],
                 tokenizer_from: str | os.PathLike | None) -> None:
    """Writes DIR/source atomically (no-op when it exists with the same model config)."""
    source = pathlib.Path(run_dir) / "source"
    desc = dataclasses.asdict(cfg)
    if (source / "model_config.json").is_file():
        old = json.loads((source / "model_config.json").read_text())
        if old != desc:
            raise ValueError(
                f"{run_dir} already holds a run of another model ({_diff(old, desc)}); use a new "
                "--workdir/--out, or delete the old one to start over")
        return
    source.parent.mkdir(parents=True, exist_ok=True)
    tmp = source.parent / f".source.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    if tokenizer_from is not None:
        for name in hf.TOKENIZER_FILES:
            src = pathlib.Path(tokenizer_from) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    (tmp / "model_config.json").write_text(json.dumps(desc, indent=2, sort_keys=True))
    os.replace(tmp, source)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:5])


def read_source(run_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], pathlib.Path]:
    source = pathlib.Path(run_dir) / "source"
    path = source / "model_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: not a recipe_jax run dir (no source/model_config.json); pass the dir "
            "written by `convert --out` or a purify/attack `--workdir`")
    cfg = ModelConfig(**json.loads(path.read_text()))
    return cfg, json.loads((source / "config.json").read_text()), source


def manager(run_dir: str | os.PathLike, *, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    """The run's CheckpointManager (synchronous saves: a returned save is on disk)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    path = pathlib.Path(run_dir).absolute() / "checkpoints"
    return ocp.CheckpointManager(path, options=options, item_names=ITEMS)


def save_params(run_dir: str | os.PathLike, params, step: int = 0) -> None:
    """A params-only checkpoint (what `convert` writes)."""
    with manager(run_dir) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mngr.wait_until_finished()


def abstract_like(cfg: ModelConfig, shardings=None):
    """ShapeDtypeStructs of the model's params, optionally with target shardings."""
    tree = nn.unbox(abstract_params(cfg))
    if shardings is None:
        return tree
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        tree, shardings)


def restore_newest(mngr: ocp.CheckpointManager, restore: Callable[[int], Any], *,
                   set_aside: bool = False) -> tuple[Any, int]:
    """(restore(step), step) for the newest step that restores; damaged steps are skipped with a
    warning naming them and why. With `set_aside`, once an older step has restored, the damaged
    newer ones are moved to DIR/checkpoints_damaged/ (kept, so that their steps can be saved
    again). Raises CheckpointError when there are steps but none restores (nothing moved), and
    FileNotFoundError when there are none."""
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{mngr.directory}: no complete checkpoint")
    skipped = {}
    for step in steps:
        try:
            result = restore(step)
        except Exception as e:  # noqa: BLE001  Orbax/TensorStore raise many types for bad files
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            skipped[step] = f"{type(e).__name__}: {first}"
            log.warning("checkpoint step %d in %s cannot be restored (%s); trying an older one",
                        step, mngr.directory, skipped[step])
            continue
        if skipped:
            moved = [_set_aside(mngr, s) for s in skipped] if set_aside else []
            log.warning("restored step %d, not the newest: skipped damaged step(s) %s%s", step,
                        ", ".join(map(str, skipped)),
                        f" (moved to {', '.join(str(m) for m in moved if m)})" if moved else "")
        return result, step
    raise CheckpointError(
        f"{mngr.directory}: none of the checkpoints can be restored ("
        + "; ".join(f"step {s}: {why}" for s, why in skipped.items()) + "). Nothing was moved "
        "or overwritten; restore the files from a backup, or delete the checkpoints dir (or use "
        "a new --workdir) to start over")


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path | None:
    """Moves a damaged step out of checkpoints/ so the step can be saved again; keeps it."""
    if jax.process_index() != 0:
        return None
    src = pathlib.Path(mngr.directory) / str(step)
    dst = src.parent.parent / "checkpoints_damaged" / f"{step}-{uuid.uuid4().hex[:8]}"
    dst.parent.mkdir(exist_ok=True)
    os.replace(src, dst)
    mngr.reload()
    return dst


def restore_params(run_dir: str | os.PathLike, step: int | None = None, shardings=None
                   ) -> tuple[Transformer, dict, int]:
    """(model, params, step) from the newest restorable (or the given) step of a run dir, onto
    `shardings` (default: one local device, whatever mesh the run was saved from)."""
    cfg, _, _ = read_source(run_dir)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_like(cfg))
    target = abstract_like(cfg, shardings)

    def restore(s):
        return mngr.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target))).params

    with manager(run_dir, max_to_keep=None) as mngr:
        if step is not None:
            return Transformer(cfg), restore(step), step
        try:
            params, step = restore_newest(mngr, restore)
        except FileNotFoundError:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/"
                                    ) from None
    return Transformer(cfg), params, step
