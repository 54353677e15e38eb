"""A whole training stage, the skeleton purify, attack and evaluate share.

    mesh = stage.start(config)                      # processes joined, mesh built, batch checked
    model_dir, texts, model, params = stage.load(config)    # bad input fails before compiling
    params, step = stage.fit(config, workdir, mesh, ..., make_step=...)  # resumable loop
    stage.export_hf(workdir, name, model, params, verify=True, summary={})

`fit` writes DIR/config.json (what a resumed run must match), DIR/source/ (model description and
tokenizer), DIR/checkpoints/ and DIR/metrics.jsonl; `export_hf` writes DIR/hf/ atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from recipe_jax import checkpoint, data, hf, optim, parity, sharding, streaming, train
from recipe_jax.losses import matches
from recipe_jax.model import Transformer, abstract_params

log = logging.getLogger(__name__)


def load(config) -> tuple:
    """(model_dir, aux texts, model, host params) of a stage that trains on plain text; the text
    is read first so that bad input fails before any weights are read or anything compiles.
    With data.streaming the texts are a streaming.TextIndex: validated, but not held in memory."""
    model_dir = hf.resolve_model_dir(config.model.init_from)
    if "streaming" in config.data and config.data.streaming:  # a lazy sequence, never all read
        texts = streaming.TextIndex(config.data.aux_path, max_examples=config.data.max_examples)
    else:
        texts = data.read_texts(config.data.aux_path, max_examples=config.data.max_examples)
    model, host_params = hf.load_pretrained(model_dir, seed=config.train.seed)
    check_max_length(config, model)
    return model_dir, texts, model, host_params


def check_max_length(config, model: Transformer) -> None:
    if config.data.max_length > model.cfg.max_position_embeddings:
        raise ValueError(f"data.max_length={config.data.max_length} exceeds the model's "
                         f"max_position_embeddings={model.cfg.max_position_embeddings}")


# Config keys that may change between a run and its resumption; any other change is an error.
RESUMABLE_CHANGES = ("checkpoint.", "train.log_every", "export.", "distributed.", "mesh.")


def start(config) -> jax.sharding.Mesh:
    """Joins the other processes (if any) and builds the mesh the global batch divides over."""
    sharding.initialize_distributed(config.distributed)
    mesh = sharding.make_mesh(config.mesh.shape)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % shards or config.train.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={config.train.batch_size} must divide evenly over "
                         f"data*fsdp={shards} mesh devices and {jax.process_count()} processes")
    return mesh


def check_resume_config(workdir: pathlib.Path, config, fingerprint: dict | None = None) -> None:
    """Records what the run trains on (the config, or a stage's own `fingerprint`); on a rerun,
    refuses anything that would mix two runs, naming what differs."""
    path = workdir / "config.json"
    # As JSON holds it (tuples become lists), so that a rerun compares like with like.
    record = json.loads(json.dumps(fingerprint) if fingerprint is not None
                        else config.to_json_best_effort())
    if path.exists():
        old, now = _flatten(json.loads(path.read_text())), _flatten(record)
        free = () if fingerprint is not None else RESUMABLE_CHANGES
        diff = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)
                and not k.startswith(free) and not _new_key_off(k, old, now)]
        if diff:
            raise ValueError(f"{workdir} holds a run with another {', '.join(diff[:5])} ("
                             + ", ".join(f"{k}: {old.get(k)!r} there, {now.get(k)!r} now"
                                         for k in diff[:5])
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


def _new_key_off(key: str, old: dict, now: dict) -> bool:
    """A key that a newer recipe_jax added, at its off value (empty, 0, False; records are JSON,
    so an empty tuple is []), is no change: runs recorded before it existed still resume."""
    return key not in old and now[key] in ([], "", 0, False, None)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def fit(config, workdir: pathlib.Path, mesh, *, name: str, model_dir, model: Transformer,
        host_params, arrays: dict[str, np.ndarray] | streaming.RowSource,
        trainable_patterns: Sequence[str],
        make_step: Callable, extra_args: tuple = (), collate: Callable | None = None,
        tokens_per_step: int | None = None, fingerprint: dict | None = None):
    """Trains `model` on `arrays` (host rows, one per example, or a streaming.RowSource that
    reads them from disk); returns (params, final step).

    `make_step(compute_model, optimizer, schedule)` returns the pure step
    `(state, frozen, batch, *extra_args) -> (state, metrics)`; `extra_args` are global arrays
    (e.g. a frozen reference model) passed to every step. `collate(global_rows)` builds the
    sharded batch (default: this process's rows, full length); `fingerprint` replaces the config
    as what a resumed run must match (see `check_resume_config`).
    """
    cfg = model.cfg
    num_examples = _num_rows(arrays)
    per_epoch = data.steps_per_epoch(num_examples, config.train.batch_size)
    num_steps = config.train.num_steps or per_epoch * config.train.num_epochs
    # Process 0 writes the run's description; the others check it once it is complete (the
    # workdir is one directory all processes share, e.g. NFS or a gcsfuse mount).
    if jax.process_index() == 0:
        check_resume_config(workdir, config, fingerprint)
        checkpoint.write_source(workdir, cfg, hf.read_config(model_dir), model_dir)
    sharding.barrier("recipe_jax:workdir")
    if jax.process_index() != 0:
        check_resume_config(workdir, config, fingerprint)
    names = [n for n in hf.named_params(host_params, cfg.model_type)
             if matches(trainable_patterns, n)]
    if not names:
        raise ValueError(f"trainable patterns {tuple(trainable_patterns)} match no parameter; "
                         "names look like bert.encoder.layer.0.intermediate.dense.weight")

    # State born sharded; resumed from the newest complete checkpoint if there is one.
    params = train.shard_params(host_params, sharding.param_shardings(abstract_params(cfg), mesh))
    trainable, frozen = train.split_params(params, trainable_patterns, cfg.model_type)
    optimizer, schedule = optim.make_optimizer(config.train, num_steps, trainable=trainable,
                                               model_cfg=cfg)
    state = train.init_state(trainable, optimizer)
    mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
    if mngr.latest_step() is not None:
        state, frozen, step = train.restore(mngr, state, frozen, trainable_patterns, cfg.model_type)
        say(f"{name}: resuming from step {step} in {workdir}")

    compute = compute_model(config, cfg)
    jitted = jit_step(make_step(compute, optimizer, schedule), state, frozen, mesh, extra_args)

    say(f"{name}: {hf.summary(model, host_params)}; {len(names)} trainable tensors; "
        f"{num_examples} examples, {num_steps} steps of {config.train.batch_size}; "
        f"mesh {dict(mesh.shape)}, {jax.process_count()} process(es)")
    batch_for, close = _batches(config, mesh, arrays, collate, num_steps)
    try:
        state = train.run(
            workdir=str(workdir), name=name, state=state, frozen=frozen,
            step_fn=lambda st, fr, b: jitted(st, fr, b, *extra_args), batch_for=batch_for,
            num_steps=num_steps, log_every=config.train.log_every,
            every_steps=config.checkpoint.every_steps, mngr=mngr, meta={"num_steps": num_steps},
            tokens_per_step=tokens_per_step or config.train.batch_size * config.data.max_length)
    finally:
        close()
    return train.merge_params(state.trainable, frozen), int(jax.device_get(state.step))


def reference_copy(host_params, cfg, mesh) -> tuple:
    """`(params,)`: a frozen copy of the model as loaded, sharded like the trained params, for
    `fit(..., extra_args=...)` (losses that compare with the starting model)."""
    return (train.shard_params(host_params, sharding.param_shardings(abstract_params(cfg),
                                                                     mesh)),)


def _num_rows(arrays) -> int:
    if isinstance(arrays, streaming.RowSource):
        return len(arrays)
    return len(next(iter(arrays.values())))


def _batches(config, mesh, arrays, collate: Callable | None, num_steps: int
             ) -> tuple[Callable[[int], dict], Callable[[], None]]:
    """(batch_for(step), close): the sharded batch of a step, each process holding only its
    rows of it; a RowSource is read and tokenized a few steps ahead in a background thread."""
    seed, size, num_rows = config.train.seed, config.train.batch_size, _num_rows(arrays)
    if collate is not None:
        return (lambda step: collate(data.batch_rows(seed, step, num_rows, size))), lambda: None

    def local_rows(step: int) -> np.ndarray:
        return data.batch_rows(seed, step, num_rows, size, process_index=jax.process_index(),
                               process_count=jax.process_count())

    if isinstance(arrays, streaming.RowSource):
        prefetch = streaming.Prefetcher(lambda step: arrays.read(local_rows(step)),
                                        stop=num_steps)
        return (lambda step: sharding.put_batch(prefetch.get(step), mesh)), prefetch.close
    return (lambda step: sharding.put_batch({k: v[local_rows(step)] for k, v in arrays.items()},
                                            mesh)), lambda: None


def compute_model(config, cfg) -> Transformer:
    """The model the step runs: `cfg` with the config's compute dtype and remat."""
    return Transformer(dataclasses.replace(cfg, dtype=config.train.dtype,
                                           remat=config.train.get("remat", False)))


def jit_step(step_fn: Callable, state, frozen, mesh, extra_args: tuple = ()):
    """The jitted step: inputs keep the shardings of `state`, `frozen` and `extra_args` (arrays
    or ShapeDtypeStructs with shardings, so `sharding_report` can compile it ahead of time),
    the batch is split over (data, fsdp), and the state is donated."""
    shardings_of = functools.partial(jax.tree.map, lambda x: x.sharding)
    return jax.jit(step_fn, in_shardings=(shardings_of(state), shardings_of(frozen),
                                          sharding.batch_sharding(mesh),
                                          *map(shardings_of, extra_args)),
                   donate_argnums=(0,))


def say(message: str) -> None:
    """Progress on stdout, from process 0 only (every process runs the same code)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def export_hf(workdir: pathlib.Path, name: str, model: Transformer, params, *,
              verify: bool, summary: dict) -> dict:
    """Writes `workdir/hf` (process 0) and `workdir/summary.json`; checks logits if asked."""
    host = sharding.fetch_to_host(params)
    if jax.process_index() == 0:
        _, hf_config, source = checkpoint.read_source(workdir)
        out = hf.save_pretrained(model, host, workdir / "hf", tokenizer_from=source,
                                 base_config=hf_config)
        if verify:
            try:
                summary["export_max_logit_diff"] = parity.verify(model, host, out)
            except ImportError:
                log.warning("torch is not installed: skipped the export's logit check")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{name}: exported {out}", flush=True)
    return summary
