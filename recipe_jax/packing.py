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

R is rounded up to a multiple of `quantum(rows_per_shard)` (an eighth of the shard's sentences),
so a run compiles at most 8 step programs (in practice 2-3; docs/performance.md).

Device side (`encode`): gathers the (masked) ids and their position ids into the packed rows,
runs the encoder with segment-restricted attention, and gathers the last hidden states back to
[B, L, H]. Padding positions of the result hold another sentence's states; every loss masks them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from recipe_jax.model import Transformer, position_ids

MAX_PROGRAMS = 8


def quantum(rows_per_shard: int) -> int:
    """Packed row counts are multiples of this: at most MAX_PROGRAMS distinct counts."""
    return max(1, -(-rows_per_shard // MAX_PROGRAMS))


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


def plan(mask_bl: np.ndarray, groups: int, agree: Callable[[int], int] = int
         ) -> dict[str, np.ndarray]:
    """The packing plan of one process's rows, split into `groups` equal batch shards.
    `agree(rows)` returns the row count every process uses (the max over processes)."""
    batch, length = np.shape(mask_bl)
    if groups < 1 or batch % groups:
        raise ValueError(f"data.packing: {batch} rows do not split into {groups} batch shards")
    per = batch // groups
    n_b = lengths(mask_bl)
    placed = [assign(n_b[g * per:(g + 1) * per], length) for g in range(groups)]
    q = quantum(per)
    rows = agree(-(-max(used for _, _, used in placed) // q) * q)
    src = np.full((groups, rows, length), -1, np.int32)
    start = np.zeros(batch, np.int32)
    for g, (row_b, offset_b, _) in enumerate(placed):
        for i in range(per):
            n, r, o = int(n_b[g * per + i]), int(row_b[i]), int(offset_b[i])
            src[g, r, o:o + n] = i * length + np.arange(n)
            start[g * per + i] = r * length + o
    return {"pack_src": src, "pack_start": start}


def add_plans(batch: dict[str, np.ndarray], views: dict[str, str], groups: int,
              agree: Callable[[int], int] = int) -> dict[str, np.ndarray]:
    """`batch` plus one plan per view: `views` maps a key prefix to the mask it packs, e.g.
    {"": "attention_mask", "poison_": "poison_mask"} -> pack_src, poison_pack_src, ..."""
    out = dict(batch)
    for prefix, mask_key in views.items():
        if mask_key in batch:
            out.update({prefix + k: v for k, v in plan(batch[mask_key], groups, agree).items()})
    return out


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
