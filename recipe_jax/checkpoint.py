"""Orbax checkpoints of recipe_jax runs, and the model description that travels with them.

A run dir (what `convert` writes, and a purify/attack workdir) holds:

    DIR/source/model_config.json   ModelConfig (architecture + which heads exist)
    DIR/source/config.json         the source checkpoint's HF config (for export)
    DIR/source/<tokenizer files>   copied from the source, so export needs nothing else
    DIR/checkpoints/<step>/        Orbax CheckpointManager steps: items `params` (all model
                                   parameters), and for training runs `opt_state` and `meta`
    DIR/config.json                a training run's record: the config (or a stage's own
                                   fingerprint) that a resumed run must match

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
import jax.numpy as jnp
import orbax.checkpoint as ocp

from recipe_jax import faults, hf, outputs
from recipe_jax.arch import ModelConfig
from recipe_jax.model import Transformer, abstract_params

log = logging.getLogger(__name__)
ITEMS = ("params", "opt_state", "meta")
# Config keys that may change between a run and its resumption; any other change is an error.
RESUMABLE_CHANGES = ("checkpoint.", "train.log_every", "export.", "distributed.", "mesh.",
                     "scan.prior_report")
# Options that left the product (docs/results.md), at the value that meant "off": a run recorded
# with them resumes.
RETIRED_OFF = {"recipe.groups": "matrix", "recipe.distill": 0.0, "recipe.proximal": False}
# Options added later whose default is what runs recorded before them did: such a run resumes
# (any other new option must default to its off value: empty, 0, False).
ADDED_AS_BEFORE = {"guide.target": "loaded"}


class CheckpointError(ValueError):
    """A run dir has checkpoints but none of them can be restored; the message lists why."""


def write_source(run_dir: str | os.PathLike, cfg: ModelConfig, hf_config: dict[str, Any],
                 tokenizer_from: str | os.PathLike | None) -> None:
    """Writes DIR/source atomically (no-op when it exists with the same model config)."""
    source = pathlib.Path(run_dir) / "source"
    desc = dataclasses.asdict(cfg)
    if (source / "model_config.json").is_file():
        old = json.loads((source / "model_config.json").read_text())
        # Fields added to ModelConfig since the run began (e.g. ModernBERT's) at their defaults.
        defaults = dataclasses.asdict(ModelConfig())
        old = {**{k: defaults[k] for k in desc.keys() - old.keys() if k in defaults}, **old}
        if old != desc:
            raise ValueError(
                f"{run_dir} already holds a run of another model ({_diff(old, desc)}); use a new "
                "--workdir/--out, or delete the old one to start over")
        return
    source.parent.mkdir(parents=True, exist_ok=True)
    tmp = source.parent / f".source.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if tokenizer_from is not None:
            outputs.copy_model_files(pathlib.Path(tokenizer_from), tmp, hf.TOKENIZER_FILES,
                                     hf.REMOTE_CODE_KEYS)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def check_run_record(workdir: pathlib.Path, config, fingerprint: dict | None = None,
                     data_sha256: str | None = None) -> None:
    """Records what the run trains on (the config, or a stage's own `fingerprint`, and the
    data's digest) in DIR/config.json; on a rerun, refuses anything that would mix two runs,
    naming what differs."""
    path = workdir / "config.json"
    record = _record(config, fingerprint, data_sha256)
    if path.exists():
        diff = _differences(path, record, free=() if fingerprint is not None
                            else RESUMABLE_CHANGES)
        if any(k == "data_sha256" for k, _, _ in diff):
            raise ValueError(f"{workdir} holds a run on other data: the text at "
                             f"{_flatten(record).get('data.aux_path', 'the data path')} changed "
                             "since the run began (its digest differs). Restore that data to "
                             "resume, or use a new --workdir")
        if diff:
            raise ValueError(f"{workdir} holds a run with another "
                             f"{', '.join(k for k, _, _ in diff[:5])} ("
                             + ", ".join(f"{k}: {old!r} there, {now!r} now"
                                         for k, old, now in diff[:5])
                             + "); use a new --workdir, or the old values to resume")
    elif jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        tmp.replace(path)  # atomic: a killed run never leaves half a config.json
    else:
        raise FileNotFoundError(f"{path} is missing on process {jax.process_index()} although "
                                "process 0 wrote it: --workdir must be one directory all hosts "
                                "share (NFS, or a gcsfuse mount of a gs:// bucket)")


def record_differences(workdir: pathlib.Path, config) -> list[tuple[str, Any, Any]]:
    """(key, value there, value now) for each setting in which the run recorded in
    DIR/config.json differs from `config`, by the rule a resumed run must meet (settings only:
    the data's digest is not checked); [] when they agree or DIR holds no record. Tells a study
    that reuses finished runs which of them an edited preset has made stale."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        return []
    return _differences(path, _record(config, None, None), free=RESUMABLE_CHANGES)


def _record(config, fingerprint: dict | None, data_sha256: str | None) -> dict:
    # As JSON holds it (tuples become lists), so that a rerun compares like with like.
    record = json.loads(json.dumps(fingerprint) if fingerprint is not None
                        else config.to_json_best_effort())
    if data_sha256 is not None:
        record["data_sha256"] = data_sha256
    return record


def _differences(path: pathlib.Path, record: dict, free: tuple[str, ...]) -> list:
    old, now = _flatten(json.loads(path.read_text())), _flatten(record)
    if "data_sha256" in now and "data_sha256" not in old:
        log.warning("%s was recorded before data digests: the data is not checked", path)
        old["data_sha256"] = now["data_sha256"]
    if "data_sha256" not in now:  # a caller that checks the settings only (reproduce.py)
        old.pop("data_sha256", None)
    return [(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now))
            if old.get(k) != now.get(k) and not k.startswith(free)
            and not _new_key_off(k, old, now)
            and not (k not in now and k in RETIRED_OFF and old[k] == RETIRED_OFF[k])]


def _new_key_off(key: str, old: dict, now: dict) -> bool:
    """A key that a newer recipe_jax added, at its off value (empty, 0, False; records are JSON,
    so an empty tuple is []) or at the value that was the behaviour before it (ADDED_AS_BEFORE),
    is no change: runs recorded before it existed still resume."""
    return key not in old and (now[key] in ([], "", 0, False, None)
                               or ADDED_AS_BEFORE.get(key, object()) == now[key])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def manager(run_dir: str | os.PathLike, *, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    """The run's CheckpointManager (synchronous saves: a returned save is on disk)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    path = pathlib.Path(run_dir).absolute() / "checkpoints"
    return ocp.CheckpointManager(path, options=options, item_names=ITEMS)


def save_params(run_dir: str | os.PathLike, params, step: int = 0) -> None:
    """A params-only checkpoint (what `convert` writes), with the digests of its arrays."""
    meta = {"step": step, "digests": {"params": digests(params)}}
    with manager(run_dir) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()


@jax.jit
def _digests(tree):
    """One uint32 per leaf: the sum over its 32-bit words of word x (a position-dependent odd
    factor), mod 2**32. Any change of bytes, or of their order, changes it (with overwhelming
    probability); computed where the arrays live, on any mesh."""
    def digest(x):
        words = jnp.atleast_1d(x)
        if words.dtype.itemsize >= 4:  # 8-byte words become [..., 2] uint32
            words = jax.lax.bitcast_convert_type(words, jnp.uint32)
        else:
            words = jax.lax.bitcast_convert_type(words, jnp.uint16 if words.dtype.itemsize == 2
                                                 else jnp.uint8).astype(jnp.uint32)
        words = words.reshape(-1)
        factors = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | 1
        return jnp.sum(words * factors, dtype=jnp.uint32)

    return jax.tree.map(digest, tree)


def digests(tree) -> dict[str, int]:
    """{leaf path: digest} of a tree of arrays (`_digests`), for a checkpoint's meta."""
    values = jax.device_get(_digests(tree))
    return {jax.tree_util.keystr(path): int(v)
            for path, v in jax.tree_util.tree_flatten_with_path(values)[0]}


def _verify(recorded: dict | None, tree, what: str) -> None:
    if recorded is None:
        return  # a checkpoint from before digests were recorded
    now = digests(tree)
    bad = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    if bad:
        raise ValueError(f"{what}: the bytes of {len(bad)} array(s) differ from the digests "
                         f"recorded when it was saved ({', '.join(bad[:3])}); it is damaged")


def save_state(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    """One training checkpoint: all params, the optimizer state and `meta` (+ the step and the
    digests of every array, checked on restore)."""
    faults.point("save")
    faults.point("sigterm")
    meta = {**meta, "step": step, "digests": {"params": digests(params),
                                              "opt_state": digests(opt_state)}}
    with faults.during("checkpoint_write", mngr.directory):
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()


def restore_state(mngr: ocp.CheckpointManager, params_like, opt_state_like
                  ) -> tuple[Any, Any, int]:
    """(params, opt_state, step) of the newest restorable step, in the shardings of the
    (concrete or abstract) `*_like` trees, whatever mesh it was saved from. Damaged steps are
    moved aside with a warning and older ones tried; raises CheckpointError when none restores
    (never silently starts over)."""
    abstract = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    params_like, opt_like = abstract(params_like), abstract(opt_state_like)

    def restore_step(step):
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_like),
            opt_state=ocp.args.StandardRestore(opt_like), meta=ocp.args.JsonRestore()))
        if restored.meta.get("step") != step:
            raise ValueError(f"meta says step {restored.meta.get('step')}, not {step}")
        recorded = restored.meta.get("digests") or {}
        _verify(recorded.get("params"), restored.params, f"step {step} params")
        _verify(recorded.get("opt_state"), restored.opt_state, f"step {step} opt_state")
        return restored

    try:
        restored, step = restore_newest(mngr, restore_step, set_aside=True)
    except CheckpointError:
        mngr.close()  # the run stops here; let Orbax shut down its threads first
        raise
    return restored.params, restored.opt_state, step


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
        items = {"params": ocp.args.StandardRestore(target)}
        has_meta = (pathlib.Path(mngr.directory) / str(s) / "meta").exists()
        if has_meta:
            items["meta"] = ocp.args.JsonRestore()
        restored = mngr.restore(s, args=ocp.args.Composite(**items))
        if has_meta:
            _verify((restored.meta.get("digests") or {}).get("params"), restored.params,
                    f"{run_dir} step {s} params")
        return restored.params

    with manager(run_dir, max_to_keep=None) as mngr:
        if step is not None:
            return Transformer(cfg), restore(step), step
        try:
            params, step = restore_newest(mngr, restore)
        except FileNotFoundError:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/"
                                    ) from None
    return Transformer(cfg), params, step


class MetricsWriter:
    """metrics.jsonl in the workdir (process 0), truncated to the resumed step on restart."""

    def __init__(self, workdir, resume_step: int):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        if self.enabled and self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
