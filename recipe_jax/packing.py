"""Sequence packing for the MLM stages: several sentences share one row of `data.max_length`.

A purify batch of 32 BookCorpus sentences padded to 64 is ~75% padding. Packed, the same
sentences fill about a quarter of the rows; attention is block-diagonal (a token sees only its
own sentence) and positions restart per sentence, so every sentence's hidden states are those of
the unpacked step. Everything per sentence stays per sentence: the batch still holds the
[B, L] rows, masks are drawn on them exactly as without packing, and the loss reads the packed
encoder's states back in the [B, L] layout. Packing changes only what the encoder computes on.

Host side (`add_plan`, called by the trainer on each process's rows of a global batch): the
rows of each batch shard (one per data x fsdp device) are packed first-fit-decreasing into that
shard's own packed rows, so no gather crosses a device. The plan is two int32 arrays:

    pack_src   [G, R, L]  group-local flat index b * L + l of the sentence token in each packed
                          slot (-1: padding). G = batch shards, R = packed rows per shard.
    pack_start [B]        group-local flat index r * L + offset where sentence b starts.

    mlm_slots  [G, K]     group-local flat index b * M + m of each masked-LM slot that holds a
                          label (-1: padding): the vocabulary projection runs only there.

R and K are rounded up to multiples of `quantum` (a sixteenth of their largest value), so a run
compiles a bounded number of step programs (2-4 in practice; the trainer logs each new one).

Device side (`encode`): gathers the (masked) ids and their position ids into the packed rows,
runs the encoder with segment-restricted attention, and gathers the last hidden states back to
[B, L, H]. Padding positions of the result hold another sentence's states; every loss masks them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from recipe_jax import sharding
from recipe_jax.model import Transformer, position_ids

STEPS = 16  # packed row counts (and masked-slot counts) come in at most this many sizes


def quantum(slots: int) -> int:
    """Packed sizes are multiples of this: at most STEPS distinct sizes up to `slots`."""
    return max(1, -(-slots // STEPS))


def lengths(mask_bl: np.ndarray) -> np.ndarray:
    """Tokens per row; the attention mask must be a prefix of ones (right padding)."""
    mask_bl = np.asarray(mask_bl) > 0
    n_b = mask_bl.sum(axis=1)
    if (mask_bl != (np.arange(mask_bl.shape[1])[None, :] < n_b[:, None])).any():
        raise ValueError("data.packing needs right-padded rows (attention mask 1...1 0...0); "
                         "this tokenizer pads on the left: set data.packing=False")
    return n_b.astype(np.int64)


def assign(lengths_b: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing: (row [b], offset [b], rows used) packing sentences of
    `lengths_b` tokens into rows of `length` slots. Ties keep the batch order (deterministic)."""
    free: list[int] = []
    row_b = np.zeros(len(lengths_b), np.int64)
    offset_b = np.zeros(len(lengths_b), np.int64)
    for b in sorted(range(len(lengths_b)), key=lambda i: (-lengths_b[i], i)):
        n = int(lengths_b[b])
        r = next((i for i, f in enumerate(free) if f >= n), len(free))
        if r == len(free):
            free.append(length)
        row_b[b], offset_b[b] = r, length - free[r]
        free[r] -= n
    return row_b, offset_b, len(free)


# How many masked-LM slots of a row hold a label: from static masks' weights, or, for masks drawn
# in the step, from the same count rule as masks.mask_tokens (float32 arithmetic, as under jit).
# Both return (labeled slots per row [B], slots per row M).
def weights_count(key: str) -> Callable[[dict], tuple[np.ndarray, int]]:
    def count(batch):
        w = np.asarray(batch[key])
        return (w > 0).sum(axis=1), w.shape[1]
    return count


def candidates_count(mask_prob: float, num_positions: int
                     ) -> Callable[[dict], tuple[np.ndarray, int]]:
    def count(batch):
        c = np.asarray(batch["candidates"]).sum(axis=1).astype(np.float32)
        n = np.round(np.float32(mask_prob) * c).astype(np.int64)
        return np.where(c > 0, np.clip(n, 1, num_positions), 0), num_positions
    return count


def plan(mask_bl: np.ndarray, groups: int, agree: Callable[[list[int]], list[int]] = list,
         labeled_b: np.ndarray | None = None, num_slots: int = 0) -> dict[str, np.ndarray]:
    """The packing plan of one process's rows, split into `groups` equal batch shards.
    `agree(sizes)` returns the sizes every process uses (the max over processes). With
    `labeled_b` (labeled masked-LM slots per row, of `num_slots` a row), also `mlm_slots`:
    the group-local flat index b * num_slots + m of every labeled slot, -1 padded."""
    batch, length = np.shape(mask_bl)
    if groups < 1 or batch % groups:
        raise ValueError(f"data.packing: {batch} rows do not split into {groups} batch shards")
    per = batch // groups
    n_b = lengths(mask_bl)
    placed = [assign(n_b[g * per:(g + 1) * per], length) for g in range(groups)]
    sizes = [_round_up(max(used for _, _, used in placed), quantum(per))]
    if labeled_b is not None:
        most = max(int(labeled_b[g * per:(g + 1) * per].sum()) for g in range(groups))
        sizes.append(_round_up(max(most, 1), quantum(per * num_slots)))
    sizes = agree(sizes)
    src = np.full((groups, sizes[0], length), -1, np.int32)
    start = np.zeros(batch, np.int32)
    for g, (row_b, offset_b, _) in enumerate(placed):
        for i in range(per):
            n, r, o = int(n_b[g * per + i]), int(row_b[i]), int(offset_b[i])
            src[g, r, o:o + n] = i * length + np.arange(n)
            start[g * per + i] = r * length + o
    out = {"pack_src": src, "pack_start": start}
    if labeled_b is not None:
        slots = np.full((groups, sizes[1]), -1, np.int32)
        for g in range(groups):
            flat = np.concatenate([i * num_slots + np.arange(labeled_b[g * per + i])
                                   for i in range(per)]).astype(np.int32)
            slots[g, :len(flat)] = flat
        out["mlm_slots"] = slots
    return out


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


def add_plans(batch: dict[str, np.ndarray], views: dict[str, tuple], groups: int,
              agree: Callable[[str, list[int]], list[int]] = lambda prefix, sizes: sizes
              ) -> dict[str, np.ndarray]:
    """`batch` plus one plan per view present in it. `views` maps a key prefix to (the mask it
    packs by, None or how many masked-LM slots of each row hold a label: `weights_count`,
    `candidates_count`), e.g. {"": ("attention_mask", weights_count("weights"))} ->
    pack_src, pack_start, mlm_slots. `agree(prefix, sizes)` gives the sizes to use."""
    out = dict(batch)
    for prefix, (mask_key, count) in views.items():
        if mask_key not in batch:
            continue
        labeled, num_slots = None, 0
        if count is not None:
            try:
                labeled, num_slots = count(batch)
            except KeyError:  # e.g. an attack without poisoned MLM rows
                pass
        p = plan(batch[mask_key], groups, functools.partial(agree, prefix), labeled, num_slots)
        out.update({prefix + k: v for k, v in p.items()})
    return out


def masked_states(hidden_blh: jax.Array, positions_bm, labels_bm, weights_bm, batch,
                  prefix: str = "") -> tuple[jax.Array, jax.Array, jax.Array]:
    """(states [., K, H], labels, weights) at the masked-LM slots: with the plan's `mlm_slots`
    only the labeled ones (per batch shard, padded to a fixed count), else all [B, M] slots.
    The MLM head then projects onto the vocabulary only where a label is."""
    key = prefix + "mlm_slots"
    if key not in batch:
        states = jnp.take_along_axis(hidden_blh, positions_bm[..., None], axis=1)
        return states, labels_bm, weights_bm
    slots_gk = batch[key]
    groups = slots_gk.shape[0]
    batch_size, length, hidden = hidden_blh.shape
    num_slots = positions_bm.shape[1]
    take = jnp.maximum(slots_gk, 0)

    def per_group(x_bm):
        return jnp.take_along_axis(x_bm.reshape(groups, -1), take, axis=1)

    row_gk = take // num_slots * length + per_group(positions_bm)  # group-local token index
    states = jnp.take_along_axis(hidden_blh.reshape(groups, -1, hidden), row_gk[..., None],
                                 axis=1)
    weights = jnp.where(slots_gk >= 0, per_group(weights_bm), 0.0)
    return states, per_group(labels_bm), weights


def run_sizes(batches, views: dict, groups: int) -> dict[str, list[int]]:
    """{prefix: the largest sizes any of `batches` needs}: a short run uses these for every
    step, so it compiles one program instead of one per size."""
    most: dict[str, list[int]] = {}

    def record(prefix, sizes):
        most[prefix] = [max(a, b) for a, b in zip(most.get(prefix, sizes), sizes, strict=True)]
        return sizes

    for batch in batches:
        add_plans(batch, views, groups, record)
    return most


def put_batch(local: dict[str, np.ndarray], mesh, views: dict, seen: set,
              say: Callable[[str], None], floors: dict[str, list[int]] | None = None) -> dict:
    """sharding.put_batch of `local` plus its packing plans (what the trainer feeds the step):
    one group per batch shard this process holds; every process uses the largest sizes any of
    them needs (one small collective per step when there are several processes). Each new set
    of sizes (`seen`) means one more compiled step (a bounded number: STEPS sizes per array);
    `say` logs it."""
    shards, procs = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
    if shards % procs:
        raise ValueError(f"data.packing: data*fsdp={shards} batch shards do not split over "
                         f"{procs} processes; use a mesh whose batch axes span the processes, "
                         "or data.packing=False")

    def agree(prefix: str, sizes: list[int]) -> list[int]:
        sizes = [max(a, b) for a, b in zip(sizes, (floors or {}).get(prefix, sizes), strict=True)]
        if procs == 1:
            return sizes
        everyone = multihost_utils.process_allgather(np.asarray(sizes, np.int32))
        return [int(v) for v in np.max(np.reshape(everyone, (procs, -1)), axis=0)]

    planned = add_plans(local, views, shards // procs, agree)
    sizes = tuple((k, v.shape) for k, v in planned.items() if k not in local)
    if sizes not in seen:
        seen.add(sizes)
        shown = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in sizes
                          if not k.endswith("pack_start"))
        say(f"packing: new batch shapes ({shown}): step program {len(seen)}, compiled once")
    return sharding.put_batch(planned, mesh)


def encode(model: Transformer, params, ids_bl, mask_bl, batch, prefix: str = "", *,
           deterministic: bool, rng) -> jax.Array:
    """Last hidden states [B, L, H] of `ids_bl`: packed if `batch` holds the plan of `prefix`,
    else the plain encoder. Equal to the plain encoder at every attended position."""
    if prefix + "pack_src" not in batch:
        return model.apply({"params": params}, ids_bl, mask_bl, None,
                           deterministic=deterministic, rngs={"dropout": rng},
                           method=Transformer.encode)[-1]
    src_grl, start_b = batch[prefix + "pack_src"], batch[prefix + "pack_start"]
    groups, rows, length = src_grl.shape
    batch_size = ids_bl.shape[0]
    flat = lambda x: x.reshape(groups, (batch_size // groups) * length)  # noqa: E731
    src_gk = src_grl.reshape(groups, rows * length)
    take = jnp.maximum(src_gk, 0)

    def pack(x_bl, fill):
        packed = jnp.take_along_axis(flat(x_bl), take, axis=1)
        return jnp.where(src_gk >= 0, packed, fill).reshape(groups * rows, length)

    ids_rl = pack(ids_bl, model.cfg.pad_token_id)
    pos_rl = pack(position_ids(model.cfg, ids_bl), 0)
    # Sentence index within the group (b * L + l) // L; -1 on padding: attention stays inside.
    segment_rl = jnp.where(src_gk >= 0, src_gk // length, -1).reshape(groups * rows, length)
    hidden_rlh = model.apply({"params": params}, ids_rl, None, None,
                             deterministic=deterministic, rngs={"dropout": rng},
                             position_ids_bl=pos_rl, segment_ids_bl=segment_rl,
                             method=Transformer.encode)[-1]
    index_gk = (start_b.reshape(groups, -1, 1) + jnp.arange(length)).reshape(groups, -1)
    index_gk = jnp.minimum(index_gk, rows * length - 1)  # past a row's end: padding, masked
    hidden_gkh = hidden_rlh.reshape(groups, rows * length, -1)
    out = jnp.take_along_axis(hidden_gkh, index_gk[..., None], axis=1)
    return out.reshape(batch_size, length, -1)
