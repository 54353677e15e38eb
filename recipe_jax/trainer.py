"""The training loop every stage shares (purify, attack, evaluate): one train step, one loop.

A stage supplies a pure loss and its data; the trainer owns everything else:

    mesh, workdir = trainer.start(config, workdir, "run:purify")  # mesh built, workdir claimed
    model_dir, texts, model, host_params = trainer.load(config)   # bad input fails first
    loss = functools.partial(loss_fn, model=trainer.compute_model(config, model.cfg), ...)
    params, step = trainer.fit(config, workdir, mesh, name="purify", model_dir=model_dir,
                               model=model, host_params=host_params, arrays=arrays,
                               trainable=patterns, loss_fn=loss, extras={"reference": ...})
    export.write_hf(workdir, "purify", model, params, verify=True, summary={})  # DIR/hf/

`loss_fn(params, batch, rng, extras) -> (loss, metrics)` is pure: `params` is the whole model,
`rng` is folded from (train.seed, step), `extras` a dict of frozen arrays the loss reads (a
reference copy of the model, attack targets), sharded and passed to the jitted step as
arguments. `train_step` below is the whole update: gradients only w.r.t. the trainable subset
(`split_params`), so XLA computes no weight gradient that is thrown away and the optimizer state
exists only for trainable parameters; frozen parameters pass through untouched (bitwise).

`fit` writes DIR/config.json (the run record), DIR/source/, DIR/checkpoints/ (resumable: rerun
the same command; SIGTERM saves and exits 143) and DIR/metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from recipe_jax import checkpoint, data, hf, optim, outputs, packing, sharding, streaming
from recipe_jax.model import Transformer, abstract_params

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a preempted job
SHORT_RUN = 64  # packed runs of at most this many steps compile one step program
LossFn = Callable[[dict, dict, jax.Array, dict], tuple[jax.Array, dict]]


# ------------------------------------------------------------------------------- the step

@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    trainable: Any  # nested dict of the trainable parameters
    opt_state: Any


def train_step(state: TrainState, frozen, batch, extras, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, schedule, seed: int
               ) -> tuple[TrainState, dict]:
    """One update (pure): the loss and its gradient w.r.t. the trainable params, then AdamW."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

    def loss_of(trainable):
        return loss_fn(merge_params(trainable, frozen), batch, rng, extras)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(trainable), "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def jit_train_step(loss_fn: LossFn, optimizer, schedule, seed: int, state, frozen, extras, mesh):
    """The jitted step: inputs keep the shardings of `state`, `frozen` and `extras` (arrays, or
    ShapeDtypeStructs with shardings so that `sharding_report` can compile it ahead of time),
    the batch is split over (data, fsdp), and the state is donated."""
    step = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer,
                             schedule=schedule, seed=seed)
    shardings_of = functools.partial(jax.tree.map, lambda x: x.sharding)
    return jax.jit(step, in_shardings=(shardings_of(state), shardings_of(frozen),
                                       sharding.batch_sharding(mesh), shardings_of(extras)),
                   donate_argnums=(0,))


def split_params(params, patterns: Sequence[str], model_type: str) -> tuple[dict, dict]:
    """(trainable, frozen): disjoint nested dicts; a leaf is trainable if `patterns` select it
    (aliases such as "ffn_in", or regexes over its HF name: families.py)."""
    trainable, frozen = {}, {}
    for path, leaf in hf.flat_params(params).items():
        node = trainable if hf.selected(path, patterns, model_type) else frozen
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
    where = jax.tree.leaves(like)[0].sharding
    if isinstance(where, jax.sharding.NamedSharding):
        where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(jnp.asarray(step, jnp.int32), where)


# ------------------------------------------------------------------------ setting up a stage

def start(config, workdir, kind: str, inputs=None) -> tuple[jax.sharding.Mesh, pathlib.Path]:
    """(mesh, absolute workdir): joins the other processes (if any), builds the mesh the global
    batch divides over, and claims the stage's --workdir before anything is loaded
    (`outputs.claim_dir`: absent, empty, or a run of this `kind`; never a file, a user's dir,
    or a path inside or above `inputs`, by default the model dir). Every process checks;
    process 0 creates it with its marker."""
    sharding.initialize_distributed(config.distributed)
    mesh = sharding.make_mesh(config.mesh.shape)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % shards or config.train.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={config.train.batch_size} must divide evenly over "
                         f"data*fsdp={shards} mesh devices and {jax.process_count()} processes")
    workdir = pathlib.Path(workdir).absolute()
    if inputs is None:
        inputs = [hf.resolve_model_dir(config.model.init_from)]
    # Every process checks before any writes: a check racing process 0's mkdir and marker
    # write would see a half-made dir. Then process 0 creates it while the others wait.
    outputs.claim_dir(workdir, kind, inputs=inputs, create=False)
    sharding.barrier("recipe_jax:checked")
    if jax.process_index() == 0:
        outputs.claim_dir(workdir, kind, inputs=inputs)
    sharding.barrier("recipe_jax:claim")
    return mesh, workdir


def load(config) -> tuple:
    """(model_dir, aux texts, model, host params) of a stage that trains on plain text; the text
    is read first so that bad input fails before any weights are read or anything compiles.
    With data.streaming the texts are a streaming.TextIndex: validated, but not held in memory."""
    model_dir = hf.resolve_model_dir(config.model.init_from)
    if "streaming" in config.data and config.data.streaming:  # a lazy sequence, never all read
        texts = streaming.TextIndex(config.data.aux_path, max_examples=config.data.max_examples)
    else:
        texts = data.read_texts(config.data.aux_path, max_examples=config.data.max_examples)
    model, host_params = hf.load_pretrained(model_dir, seed=config.train.seed,
                                            drop_extra_heads=config.model.drop_extra_heads)
    check_max_length(config, model)
    return model_dir, texts, model, host_params


def check_max_length(config, model: Transformer) -> None:
    if config.data.max_length > model.cfg.max_position_embeddings:
        raise ValueError(f"data.max_length={config.data.max_length} exceeds the model's "
                         f"max_position_embeddings={model.cfg.max_position_embeddings}")


def compute_model(config, cfg) -> Transformer:
    """The model the step runs: `cfg` with the config's compute dtype and remat."""
    return Transformer(dataclasses.replace(cfg, dtype=config.train.dtype,
                                           remat=config.train.remat))


def shard_params(host_params, cfg, mesh):
    """Host (numpy) params -> global jax.Arrays laid out by the rules table (also for a frozen
    reference copy of the model that a loss reads from `extras`)."""
    return jax.tree.map(sharding.put_global, host_params,
                        sharding.param_shardings(abstract_params(cfg), mesh))


# ------------------------------------------------------------------------------------ fit

def fit(config, workdir: pathlib.Path, mesh, *, name: str, model_dir, model: Transformer,
        host_params, arrays: dict[str, np.ndarray] | streaming.RowSource,
        trainable: Sequence[str], loss_fn: LossFn, extras: dict | None = None,
        collate: Callable | None = None, tokens_per_step: int | None = None,
        fingerprint: dict | None = None, data_sha256: str | None = None,
        pack: dict[str, str] | None = None):
    """Trains the params whose HF names match `trainable` on `arrays` (host rows, one per
    example, or a streaming.RowSource that reads them from disk); returns (params, final step).

    `extras` (host or global arrays) are replicated onto the mesh unless already global.
    `collate(global_rows)` builds the sharded batch (default: this process's rows, full length);
    `fingerprint` replaces the config as what a resumed run must match, and `data_sha256`
    (the data's digest) joins it. `pack` (prefix -> mask key, recipe_jax/packing.py) adds a
    packing plan per view to every batch; the loss packs the encoder's input by it.
    """
    cfg = model.cfg
    num_examples = _num_rows(arrays)
    per_epoch = data.steps_per_epoch(num_examples, config.train.batch_size)
    num_steps = config.train.num_steps or per_epoch * config.train.num_epochs
    _record_run(workdir, config, cfg, model_dir, fingerprint, data_sha256)
    names = [p for p in hf.flat_params(host_params) if hf.selected(p, trainable, cfg.model_type)]
    if not names:
        raise ValueError(f"trainable patterns {tuple(trainable)} match no parameter; "
                         f"{hf.selection_hint(cfg.model_type)}")

    # State born sharded; resumed from the newest complete checkpoint if there is one.
    train_params, frozen = split_params(shard_params(host_params, cfg, mesh), trainable,
                                        cfg.model_type)
    optimizer, schedule = optim.make_optimizer(config.train, num_steps, trainable=train_params,
                                               model_cfg=cfg)
    state = init_state(train_params, optimizer)
    mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
    if mngr.latest_step() is not None:
        params, opt_state, step = checkpoint.restore_state(
            mngr, merge_params(state.trainable, frozen), state.opt_state)
        train_params, frozen = split_params(params, trainable, cfg.model_type)
        state = TrainState(step=_replicated_step(step, train_params), trainable=train_params,
                           opt_state=opt_state)
        say(f"{name}: resuming from step {step} in {workdir}")
    extras = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else sharding.put_global(
        np.asarray(x), sharding.replicated(mesh)), extras or {})
    jitted = jit_train_step(loss_fn, optimizer, schedule, config.train.seed, state, frozen,
                            extras, mesh)

    say(f"{name}: {hf.summary(model, host_params)}; {len(names)} trainable tensors; "
        f"{num_examples} examples, {num_steps} steps of {config.train.batch_size}; "
        f"mesh {dict(mesh.shape)}, {jax.process_count()} process(es)")
    batch_for, close = _batches(config, mesh, arrays, collate, num_steps, pack)
    try:
        state = run(workdir=workdir, name=name, state=state, frozen=frozen,
                    step_fn=lambda st, fr, b: jitted(st, fr, b, extras), batch_for=batch_for,
                    num_steps=num_steps, log_every=config.train.log_every,
                    every_steps=config.checkpoint.every_steps, mngr=mngr,
                    meta={"num_steps": num_steps}, tokens_per_step=tokens_per_step
                    or config.train.batch_size * config.data.max_length)
    finally:
        close()
    return merge_params(state.trainable, frozen), int(jax.device_get(state.step))


def _record_run(workdir, config, cfg, model_dir, fingerprint, data_sha256) -> None:
    """Process 0 writes the run's description (or checks it on a rerun); the others check it
    once it is complete (the workdir is one directory all processes share, e.g. NFS or a
    gcsfuse mount)."""
    if jax.process_index() == 0:
        checkpoint.check_run_record(workdir, config, fingerprint, data_sha256)
        checkpoint.write_source(workdir, cfg, hf.read_config(model_dir), model_dir)
    sharding.barrier("recipe_jax:workdir")
    if jax.process_index() != 0:
        checkpoint.check_run_record(workdir, config, fingerprint, data_sha256)


def _num_rows(arrays) -> int:
    if isinstance(arrays, streaming.RowSource):
        return len(arrays)
    return len(next(iter(arrays.values())))


def _batches(config, mesh, arrays, collate: Callable | None, num_steps: int,
             pack: dict[str, str] | None = None
             ) -> tuple[Callable[[int], dict], Callable[[], None]]:
    """(batch_for(step), close): the sharded batch of a step, each process holding only its
    rows of it; a RowSource is read and tokenized a few steps ahead in a background thread.
    With `pack`, each process adds the packing plans of its rows (packing.add_plans)."""
    seed, size, num_rows = config.train.seed, config.train.batch_size, _num_rows(arrays)
    if collate is not None:
        return (lambda step: collate(data.batch_rows(seed, step, num_rows, size))), lambda: None
    put = functools.partial(sharding.put_batch, mesh=mesh)

    def local_rows(step: int) -> np.ndarray:
        return data.batch_rows(seed, step, num_rows, size, process_index=jax.process_index(),
                               process_count=jax.process_count())

    if pack:  # a short in-memory run packs every step to its largest sizes: one program
        floors, groups = {}, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count()
        if not isinstance(arrays, streaming.RowSource) and num_steps <= SHORT_RUN:
            floors = packing.run_sizes(({k: v[local_rows(s)] for k, v in arrays.items()}
                                        for s in range(num_steps)), pack, max(groups, 1))
        put = functools.partial(packing.put_batch, mesh=mesh, views=pack, seen=set(), say=say,
                                floors=floors)

    if isinstance(arrays, streaming.RowSource):
        prefetch = streaming.Prefetcher(lambda step: arrays.read(local_rows(step)),
                                        stop=num_steps)
        return (lambda step: put(prefetch.get(step))), prefetch.close
    return (lambda step: put({k: v[local_rows(step)] for k, v in arrays.items()})), lambda: None


# ------------------------------------------------------------------------------- the loop

def run(*, workdir, name: str, state: TrainState, frozen, step_fn: Callable,
        batch_for: Callable[[int], dict], num_steps: int, log_every: int, every_steps: int,
        mngr, meta: dict, tokens_per_step: int) -> TrainState:
    """Runs `step_fn` from `state.step` to `num_steps`, logging, checkpointing and handling
    SIGTERM (checkpoint, then exit 143) and non-finite losses (stop, naming the last good step)."""
    start_step = int(jax.device_get(state.step))
    writer = checkpoint.MetricsWriter(workdir, start_step)
    t0, t_last, s_last = time.time(), time.time(), start_step
    pending: list[tuple[int, dict]] = []
    with _Preemption() as preempt:
        for step in range(start_step, num_steps):
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
                    + f" | ETA {_fmt_time(eta)}")
            if boundary:
                checkpoint.save_state(mngr, done, merge_params(state.trainable, frozen),
                                      state.opt_state, meta)
            if stop:
                say(f"{name}: SIGTERM at step {done}: checkpoint saved; rerun the same command "
                    "to resume")
                sys.exit(PREEMPTED_EXIT_CODE)
    say(f"{name}: {num_steps - start_step} steps in {_fmt_time(time.time() - t0)}")
    return state


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


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


def say(message: str) -> None:
    """Progress on stdout, from process 0 only (every process runs the same code)."""
    if jax.process_index() == 0:
        print(message, flush=True)
