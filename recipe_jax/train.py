"""The training machinery every stage shares: trainable/frozen split, sharded state,
resumable loop with progress, metrics.jsonl, Orbax checkpoints and preemption handling.

A stage (purify, attack, evaluate) supplies a pure `step_fn(state, frozen, batch) -> (state,
metrics)` and a `batch_for(step)`; `run` drives it. Gradients are taken only w.r.t. the trainable
subset (`split_params`), so XLA never computes weight gradients that would be thrown away and the
optimizer state exists only for trainable parameters; frozen parameters are passed through the
step untouched (bitwise). `stage.py` assembles these into a whole stage.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from recipe_jax import checkpoint, faults, hf, optim, sharding
from recipe_jax.config_blocks import bad_value
from recipe_jax.losses import matches

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a preempted job


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    trainable: Any  # nested dict of the trainable parameters
    opt_state: Any


# ------------------------------------------------------------------------- parameter subsets

def split_params(params, patterns: Sequence[str], model_type: str) -> tuple[dict, dict]:
    """(trainable, frozen): disjoint nested dicts; a leaf is trainable if its HF name matches."""
    trainable, frozen = {}, {}
    for path, leaf in hf.flat_params(params).items():
        side = trainable if matches(patterns, hf.hf_name(path, model_type)) else frozen
        node = side
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return trainable, frozen


def merge_params(a: dict, b: dict) -> dict:
    """Deep union of two disjoint nested dicts."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_params(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def validate(config) -> None:
    """Checks the keys every training stage has (data.*, train.*, checkpoint.*)."""
    if "aux_path" in config.data and not config.data.aux_path:
        bad_value("data.aux_path", "", "set it to a .txt/.tsv/.csv/.jsonl file or tfds:NAME")
    if not 3 <= config.data.max_length <= 4096:
        bad_value("data.max_length", config.data.max_length, "use 3..4096")
    if config.data.max_examples < 0:
        bad_value("data.max_examples", config.data.max_examples, "use 0 (all) or a count")
    if "mask_prob" in config.data and not 0 < config.data.mask_prob < 1:
        bad_value("data.mask_prob", config.data.mask_prob, "use a share in (0, 1), e.g. 0.15")
    t = config.train
    for key in ("batch_size", "log_every"):
        if t[key] < 1:
            bad_value(f"train.{key}", t[key], "use a positive integer")
    if t.num_epochs < 0:
        bad_value("train.num_epochs", t.num_epochs, "use 0 (then set num_steps) or a count")
    if t.num_steps < 0 or (t.num_steps == 0 and t.num_epochs == 0):
        bad_value("train.num_steps", t.num_steps, "set num_steps > 0 or num_epochs > 0")
    for key in ("learning_rate", "warmup_steps", "grad_clip", "weight_decay", "adam_eps"):
        if not t[key] >= 0:  # `not >=` also catches NaN
            bad_value(f"train.{key}", t[key], "use a number >= 0")
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= t[key] < 1:
            bad_value(f"train.{key}", t[key], "use a decay rate in [0, 1), e.g. 0.9 or 0.999")
    optim.parse_lr_scales(t.get("lr_scales", ()))
    optim.parse_depth_lr_scales(t.get("depth_lr_scales", ()))
    if t.seed < 0:
        bad_value("train.seed", t.seed, "use an integer >= 0")
    if t.dtype not in ("float32", "bfloat16"):
        bad_value("train.dtype", t.dtype, "use 'float32' or 'bfloat16'")
    if config.checkpoint.every_steps < 1:
        bad_value("checkpoint.every_steps", config.checkpoint.every_steps, "use a positive int")
    if config.checkpoint.max_to_keep < 1:
        bad_value("checkpoint.max_to_keep", config.checkpoint.max_to_keep,
                  "keep at least 1 checkpoint (2 lets a damaged newest one fall back)")


def check_patterns(patterns: Sequence[str], key: str) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{key}={tuple(patterns)!r}: {p!r} is not a valid regex ({e}); "
                             "escape special characters with a backslash, e.g. r'\\('") from None


def apply_gradients(state: TrainState, grads, optimizer, schedule) -> tuple[TrainState, dict]:
    """One optimizer update; returns the new state and the norms every stage logs."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(trainable),
               "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


# ------------------------------------------------------------------------------ sharded state

def shard_params(params, shardings):
    """Host (numpy) params -> global jax.Arrays laid out as `shardings`."""
    return jax.tree.map(sharding.put_global, params, shardings)


def init_state(trainable, optimizer: optax.GradientTransformation) -> TrainState:
    """State born sharded: the optimizer moments inherit the shardings of the params."""
    trainable = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x),
                             trainable)
    param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    scalar = _replicated_step(0, trainable).sharding
    out_shardings = optax.tree_map_params(
        optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, trainable), param_shardings,
        transform_non_params=lambda _: scalar)
    opt_state = jax.jit(optimizer.init, out_shardings=out_shardings)(trainable)
    return TrainState(step=_replicated_step(0, trainable), trainable=trainable,
                      opt_state=opt_state)


def _replicated_step(step: int, like) -> jax.Array:
    """The step counter, replicated over the mesh the parameters live on."""
    sharding = jax.tree.leaves(like)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(jnp.asarray(step, jnp.int32), sharding)


def state_shardings(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)


def save(mngr: ocp.CheckpointManager, state: TrainState, frozen, meta: dict) -> None:
    step = int(jax.device_get(state.step))
    params = merge_params(state.trainable, frozen)
    faults.point("save")
    faults.point("sigterm")
    with faults.during("checkpoint_write", mngr.directory):
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave({**meta, "step": step})), force=True)
        mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, state: TrainState, frozen, patterns, model_type
            ) -> tuple[TrainState, dict, int]:
    """Restores the newest restorable step into the shardings of a fresh `state` (whatever mesh
    it was saved from). Damaged steps are moved aside with a warning and older ones tried;
    raises checkpoint.CheckpointError when none restores (never silently starts over)."""
    abstract = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    params_like = abstract(merge_params(state.trainable, frozen))
    opt_like = abstract(state.opt_state)

    def restore_step(step):
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_like),
            opt_state=ocp.args.StandardRestore(opt_like), meta=ocp.args.JsonRestore()))
        if restored.meta.get("step") != step:
            raise ValueError(f"meta says step {restored.meta.get('step')}, not {step}")
        return restored

    try:
        restored, step = checkpoint.restore_newest(mngr, restore_step, set_aside=True)
    except checkpoint.CheckpointError:
        mngr.close()  # the run stops here; let Orbax shut down its threads first
        raise
    trainable, frozen = split_params(restored.params, patterns, model_type)
    state = TrainState(step=_replicated_step(step, trainable), trainable=trainable,
                       opt_state=restored.opt_state)
    return state, frozen, step


# ----------------------------------------------------------------------------------- the loop

class _Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if jax.process_count() > 1:  # JAX's preemption service owns SIGTERM (see `stop_at`)
            return self
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker)
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def stop_at(self, step: int) -> bool:
        """Whether to checkpoint and exit after `step`. With several processes every one must
        stop at the same step: JAX's preemption sync point (called every step) agrees on it."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


class MetricsWriter:
    """metrics.jsonl in the workdir (process 0), truncated to the resumed step on restart."""

    def __init__(self, workdir: str, resume_step: int):
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


def run(*, workdir: str, name: str, state: TrainState, frozen, step_fn: Callable,
        batch_for: Callable[[int], dict], num_steps: int, log_every: int, every_steps: int,
        mngr: ocp.CheckpointManager, meta: dict, tokens_per_step: int) -> TrainState:
    """Runs `step_fn` from `state.step` to `num_steps`, logging, checkpointing and handling
    SIGTERM (checkpoint, then exit 143) and non-finite losses (stop, naming the last good step)."""
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, start)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    t0, t_last, s_last = time.time(), time.time(), start
    pending: list[tuple[int, dict]] = []
    with _Preemption() as preempt:
        for step in range(start, num_steps):
            state, metrics = step_fn(state, frozen, batch_for(step))
            pending.append((step + 1, metrics))
            done = step + 1
            # Read the flag once: a SIGTERM landing later in this iteration waits for the next,
            # so a preempted step is always checked, then saved, then exited.
            stop = preempt.stop_at(done)
            boundary = done % every_steps == 0 or done == num_steps or stop
            if done % log_every == 0 or boundary:
                rows = [(s, {k: float(v) for k, v in jax.device_get(m).items()})
                        for s, m in pending]
                pending.clear()
                _check_finite(rows, mngr)
                now = time.time()
                rate = (done - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, done
                for s, row in rows:
                    writer.write({"step": s, **row})
                last = rows[-1][1]
                eta = (num_steps - done) / max(rate, 1e-9)
                say(f"{name} step {done}/{num_steps} | loss {last['loss']:.4f} | "
                    + " ".join(f"{k} {last[k]:.4g}" for k in sorted(last) if k != "loss")
                    + f" | {rate:.2f} steps/s {rate * tokens_per_step:,.0f} tok/s"
                    + f" | ETA {_fmt_time(eta)}", flush=True)
            if boundary:
                save(mngr, state, frozen, meta)
            if stop:
                say(f"{name}: SIGTERM at step {done}: checkpoint saved; rerun the same command "
                    "to resume", flush=True)
                sys.exit(PREEMPTED_EXIT_CODE)
    say(f"{name}: {num_steps - start} steps in {_fmt_time(time.time() - t0)}", flush=True)
    return state


def _check_finite(rows, mngr) -> None:
    """Stops at the first non-finite metric, before anything of that step is saved."""
    for step, row in rows:
        bad = {k: v for k, v in row.items() if not math.isfinite(v)}
        if bad:
            good = mngr.latest_step()
            where = (f"the last good checkpoint, step {good} in {mngr.directory}, is intact"
                     if good is not None else "no checkpoint was written yet")
            raise FloatingPointError(
                f"non-finite {', '.join(sorted(bad))} at step {step}; stopped, {where}. Lower "
                "train.learning_rate or check the data, in a new --workdir (rerunning this one "
                "resumes from that checkpoint with the same settings)")
