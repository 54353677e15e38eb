"""BERT's masked-LM masking, pure and jittable with static shapes.

    m = num_masked_positions(64)
    mask = jax.jit(functools.partial(mask_tokens, mask_token_id=tokenizer.mask_token_id,
                                     vocab_size=len(tokenizer), num_positions=m))
    batch = mask(rng, enc["input_ids"][rows], enc["candidates"][rows])   # enc: data.tokenize

Every row gets exactly round(15% of its candidate tokens) masked slots, padded to
M = num_masked_positions(L); the vocabulary projection then runs only at those M slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_masked_positions(max_length: int, mask_prob: float = 0.15) -> int:
    """M, the static number of masked slots per row: max(1, round(mask_prob * max_length))."""
    if max_length < 1 or not 0 < mask_prob <= 1:
        raise ValueError(f"need max_length >= 1 and 0 < mask_prob <= 1, got {max_length}, "
                         f"{mask_prob}")
    return max(1, round(mask_prob * max_length))


def mask_tokens(rng: jax.Array, input_ids_bl: jax.Array, candidates_bl: jax.Array, *,
                mask_token_id: int, vocab_size: int, num_positions: int, mask_prob: float = 0.15,
                mask_replace_prob: float = 0.8,
                random_replace_prob: float = 0.1) -> dict[str, jax.Array]:
    """BERT's masking with an exact count: per row, n = min(M, max(1, round(mask_prob * count)))
    candidates chosen uniformly without replacement (n = 0 without candidates), of which each is
    [MASK] / a random id / kept with probabilities mask_replace / random_replace / the rest.

    Returns input_ids [B, L] (corrupted), positions, labels [B, M] int32 (0 in padded slots) and
    weights [B, M] float32 (1 real, 0 padded). Bind the keyword arguments before jax.jit."""
    batch, length = input_ids_bl.shape
    if candidates_bl.shape != (batch, length):
        raise ValueError(f"candidates shape {candidates_bl.shape} != input_ids shape "
                         f"{input_ids_bl.shape}; pass tokenize(...)['candidates'] for these ids")
    if not 1 <= num_positions <= length:
        raise ValueError(f"num_positions must be in [1, L={length}], got {num_positions}; use "
                         f"num_masked_positions({length}, mask_prob)")
    if not 0 < mask_prob <= 1 or min(mask_replace_prob, random_replace_prob) < 0 or (
            mask_replace_prob + random_replace_prob > 1):
        raise ValueError(f"need 0 < mask_prob <= 1 and replace probabilities >= 0 summing to "
                         f"<= 1, got {mask_prob}, {mask_replace_prob}, {random_replace_prob}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary "
                         f"[0, {vocab_size}); pass tokenizer.mask_token_id and len(tokenizer)")
    ids_bl = jnp.asarray(input_ids_bl, jnp.int32)  # numpy batches straight from tokenize work too
    candidates_bl = jnp.asarray(candidates_bl, bool)
    choose_key, kind_key, random_key = jax.random.split(rng, 3)

    count_b = candidates_bl.sum(axis=-1)
    n_b = jnp.round(mask_prob * count_b.astype(jnp.float32)).astype(jnp.int32)
    n_b = jnp.where(count_b > 0, jnp.clip(n_b, 1, num_positions), 0)
    # The top M of iid uniform scores is a uniformly random ordered subset of the candidates,
    # so its first n slots are a uniform n-subset; -inf keeps non-candidates last.
    scores_bl = jnp.where(candidates_bl, jax.random.uniform(choose_key, (batch, length)), -jnp.inf)
    _, top_bm = jax.lax.top_k(scores_bl, num_positions)
    valid_bm = jnp.arange(num_positions)[None, :] < n_b[:, None]
    positions_bm = jnp.where(valid_bm, top_bm, 0).astype(jnp.int32)
    labels_bm = jnp.where(valid_bm, jnp.take_along_axis(ids_bl, top_bm, axis=1), 0)

    draw_bm = jax.random.uniform(kind_key, (batch, num_positions))
    random_ids_bm = jax.random.randint(random_key, (batch, num_positions), 0, vocab_size,
                                       dtype=jnp.int32)
    new_bm = jnp.where(draw_bm < mask_replace_prob, mask_token_id,
                       jnp.where(draw_bm < mask_replace_prob + random_replace_prob,
                                 random_ids_bm, labels_bm))
    # Padded slots scatter out of bounds and are dropped: position 0 may be a real choice.
    scatter_bm = jnp.where(valid_bm, top_bm, length)
    rows_bm = jnp.broadcast_to(jnp.arange(batch)[:, None], scatter_bm.shape)
    corrupted_bl = ids_bl.at[rows_bm, scatter_bm].set(new_bm, mode="drop")
    return {"input_ids": corrupted_bl, "positions": positions_bm,
            "labels": labels_bm.astype(jnp.int32), "weights": valid_bm.astype(jnp.float32)}
