"""Orbax checkpoints of recipe_jax runs, and the model description that travels with them.

A run dir (what `convert` writes, and a purify/attack workdir) holds:

    DIR/source/model_config.json   ModelConfig (architecture + which heads exist)
    DIR/source/config.json         the source checkpoint's HF config (for export)
    DIR/source/<tokenizer files>   copied from the source, so export needs nothing else
    DIR/checkpoints/<step>/        Orbax CheckpointManager steps: items `params` (all model
                                   parameters), and for training runs `opt_state` and `meta`

Orbax writes each step to a temp dir and renames it when complete, so `all_steps()` never lists a
half-written step. `export` reads the `params` item of the newest step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from recipe_jax import hf
from recipe_jax.model import ModelConfig, Transformer, abstract_params

log = logging.getLogger(__name__)
ITEMS = ("params", "opt_state", "meta")


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
                                           enable_async_checkpointing=False)
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


def restore_params(run_dir: str | os.PathLike, step: int | None = None, shardings=None
                   ) -> tuple[Transformer, dict, int]:
    """(model, params, step) from the newest (or given) complete step of a run dir."""
    cfg, _, _ = read_source(run_dir)
    with manager(run_dir, max_to_keep=None) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/")
        target = abstract_like(cfg, shardings)
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
    return Transformer(cfg), restored.params, step
