"""The scan's two-token triggers: pairs of its top candidates, and a search for pairs that do
nothing alone, over relaxed tokens.

`top_pairs` tries pairs among the scan's top single-token candidates. A trigger
`a+b` built to fire only with both words (attack `por` with a two-word trigger holds each word
alone to the clean output) puts neither word among them, so that stage cannot see it. This
search does not start from single tokens: each of `restarts` searches keeps a distribution over
the vocabulary for each of two adjacent slots, inserts the expected embeddings

    e_j = softmax(z_j / τ) @ E          (E: the model's word embeddings, scanned tokens only)

into `sentences` probe sentences, and follows the gradient of the scan's own score, max over
the outputs of log(D + ε) − log(C + ε) (far from the clean outputs *and* collapsed), while τ
falls from 1 to 0.1 so each distribution narrows to a few tokens. Seeded random starts send the
restarts to different pairs. The search only proposes: the top `search_top` tokens of each slot
(at a third, two thirds and the end of the search) are paired and scored as discrete tokens with
the scan's pair probes, against random token pairs, and flagged by the scan's rule
(scan_report.is_flagged). A pair half of which is flagged alone is reported as that token.

A conjunctive attack must also teach each half to do nothing alone, and it overdoes it: the
halves move the outputs less than almost any ordinary word does (on `por_pair` the four halves
are among the 7 quietest word-start tokens of 30,000; docs/scan.md). `quiet_pairs` pairs the
`quiet_tokens` word-start tokens whose insertion moved the outputs least in the screen, screens
the pairs on the screen's probes and rates the best as the other stages rate pairs.

    reference = reference_stats(scanner, tokenizer, texts, reference_ids, settings)
    rows = top_pairs(scanner, tokenizer, texts, candidates, reference, settings)
    rows = quiet_pairs(scanner, tokenizer, texts, vocab, screen_distance, reference,
                       flagged_ids, settings)
    rows, halves, cost = search_pairs(scanner, tokenizer, texts, vocab, reference,
                                      single_reference_stats, settings)

or all three with one rating of the reference pairs: `pair_stages(...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recipe_jax import scan, sharding
from recipe_jax.model import Transformer
from recipe_jax.scan_probes import make_probes, word_start_table
from recipe_jax.scan_report import is_flagged

SLOTS = 2
TAU = (1.0, 0.1)  # softmax temperature, start and end (geometric)
LEARNING_RATE = 0.3  # Adam on the logits z
SNAPSHOTS = 3  # where along the search the top tokens are read
QUIET_CONFIRM = 32  # quiet pairs of the highest screen score, rated on the pair probes


def reference_stats(scanner, tokenizer, texts, reference_ids: np.ndarray, s) -> np.ndarray:
    """[N, R, 3] stats of the reference pairs (`reference_pairs`) on the pair probes: what every
    pair stage rates its pairs against."""
    return scanner.stats(reference_pairs(reference_ids, s), pair_probes(tokenizer, texts, s),
                         "reference pairs")


def pair_rows(tokenizer, pairs_k2: np.ndarray, rated: dict) -> list[dict]:
    """One row per pair, in the order given: {"tokens", "ids", and `scan.rated_row`'s keys}."""
    return [{"tokens": tokenizer.convert_ids_to_tokens([int(t) for t in pair]),
             "ids": [int(t) for t in pair], **scan.rated_row(rated, i)}
            for i, pair in enumerate(pairs_k2)]


def top_pairs(scanner, tokenizer, texts, candidates, reference: np.ndarray, s) -> list[dict]:
    """Pairs of the top `pair_tokens` candidates inserted together (the higher-ranked first).
    Two tokens move the outputs more than one, so their z is taken against pairs of reference
    tokens (`reference`: `reference_stats`), not against single tokens; `alone` =
    the larger single-token z of the two. A pair is flagged when it stands out both from random
    pairs (z) and from the other pairs of top candidates (z_top) while neither token is flagged
    alone (`alone_flagged`)."""
    top = candidates[:s.pair_tokens]
    if len(top) < 2:
        return []
    combos = list(itertools.combinations(range(len(top)), 2))
    tokens = np.array([[top[a]["id"], top[b]["id"]] for a, b in combos], np.int32)
    score = scan.score_of(scanner.stats(tokens, pair_probes(tokenizer, texts, s), "pairs")).max(-1)
    z = scan.robust_z(score, scan.score_of(reference).max(-1))
    # Pairs of top tokens beat random pairs by selection alone; `z_top` (against the other
    # candidate pairs) asks whether this pair stands out among them, as a pair trigger would.
    z_top = scan.robust_z(score, score)
    out = [{"tokens": [top[a]["token"], top[b]["token"]], "score": float(sc), "z": float(zz),
            "z_top": float(zt), "alone": max(top[a]["z"], top[b]["z"]),
            "alone_flagged": is_flagged(top[a], s) or is_flagged(top[b], s)}
           for (a, b), sc, zz, zt in zip(combos, score, z, z_top, strict=True)]
    return sorted(out, key=lambda p: -p["z"])


def quiet_pairs(scanner, tokenizer, texts, vocab: np.ndarray, screen_distance: np.ndarray,
                reference: np.ndarray, flagged_ids: set[int], s) -> list[dict]:
    """Pairs of the `quiet_tokens` word-start tokens (scan_probes.word_start_table) of the lowest
    screen distance (`screen_distance`: [V] log D of each of `vocab`, max over outputs), the
    quieter first. Each pair's score is screened on the screen's short probes (two slots); the
    top `QUIET_CONFIRM` are rated on the pair probes against `reference` (`reference_stats`).
    Rows as `search_pairs`'s, best first; `flagged` by `is_flagged` when neither half is in
    `flagged_ids` (tokens flagged alone)."""
    if s.quiet_tokens < 2:
        return []
    starts = np.flatnonzero(word_start_table(tokenizer, int(vocab.max()) + 1)[vocab])
    quiet = vocab[starts[np.argsort(screen_distance[starts], kind="stable")[:s.quiet_tokens]]]
    pairs = np.asarray(list(itertools.combinations(quiet.tolist(), 2)), np.int32).reshape(-1, 2)
    screen = make_probes(tokenizer, texts, count=s.screen_sentences,
                         max_tokens=s.screen_max_tokens, inserted=SLOTS, seed=s.seed)
    first = scan.score_of(scanner.stats(pairs, screen, "quiet pairs")).max(-1)
    pairs = pairs[np.argsort(-first, kind="stable")[:QUIET_CONFIRM]]
    stats = scanner.stats(pairs, pair_probes(tokenizer, texts, s), "quiet pairs (confirm)")
    rows = pair_rows(tokenizer, pairs, scan.rate(stats, reference))
    for row in rows:
        row["flagged"] = is_flagged(row, s) and not set(row["ids"]) & flagged_ids
    return sorted(rows, key=lambda row: -row["z"])


def pair_stages(scanner, tokenizer, texts, vocab: np.ndarray, candidates: list[dict],
                flagged: list[dict], screen_distance: np.ndarray, reference_ids: np.ndarray,
                single_reference: np.ndarray, s) -> dict:
    """The scan's three pair stages after the single tokens: pairs of the top candidates, of the
    quietest tokens, and of the relaxed search. Returns {"pairs", "quiet", "searched" (rows,
    best first), "halves" (single tokens found as a searched pair's half), "search" (its cost),
    "flagged" (the pairs flagged, in that order), "reference" (`reference_stats`)}. The
    reference pairs are rated once, for all three."""
    reference = reference_stats(scanner, tokenizer, texts, reference_ids, s)
    pairs = top_pairs(scanner, tokenizer, texts, candidates, reference, s)
    quiet = quiet_pairs(scanner, tokenizer, texts, vocab, screen_distance, reference,
                        {c["id"] for c in flagged}, s)
    searched, halves, cost = [], [], {}
    if s.search_restarts:
        searched, halves, cost = search_pairs(scanner, tokenizer, texts, vocab, reference,
                                              single_reference, s)
    hits = [p for p in pairs if is_flagged(p, s) and p["z_top"] > s.min_z
            and not p["alone_flagged"]] + [p for p in quiet + searched if p["flagged"]]
    return {"pairs": pairs, "quiet": quiet, "searched": searched, "halves": halves,
            "search": cost, "flagged": hits, "reference": reference}


def _objective(z_rjv, tau, params, words_vh, *, model: Transformer, ids_bw, mask_bw, keep_bw,
               clean_nrh):
    """-(sum over restarts of the score) and the [R] scores of the relaxed pairs."""
    r, n = z_rjv.shape[0], clean_nrh.shape[0]
    soft_rjh = jnp.einsum("rjv,vh->rjh", jax.nn.softmax(z_rjv / tau, axis=-1), words_vh)
    table = params["embeddings"]["word_embeddings"]["embedding"]
    grown = {**params, "embeddings": {**params["embeddings"], "word_embeddings": {
        "embedding": jnp.concatenate([table, soft_rjh.reshape(r * SLOTS, -1)], axis=0)}}}
    h_rnoh = scan._outputs(model, grown, ids_bw, mask_bw, keep_bw).reshape(r, n,
                                                                        *clean_nrh.shape[1:])
    s0_o = jnp.mean(jnp.sum(jnp.square(clean_nrh - clean_nrh.mean(0)), -1), 0)
    dist = jnp.mean(jnp.sum(jnp.square(h_rnoh - clean_nrh[None]), -1), 1) / s0_o
    spread = jnp.mean(jnp.sum(jnp.square(h_rnoh - h_rnoh.mean(1, keepdims=True)), -1), 1) / s0_o
    score_r = jnp.max(jnp.log(dist + 1e-4) - jnp.log(spread + 1e-4), axis=-1)
    return -jnp.sum(score_r), score_r


def pair_probes(tokenizer, texts, s):
    """The confirm probes with two insertion slots side by side: what every pair is rated on."""
    return make_probes(tokenizer, texts, count=s.sentences, max_tokens=s.max_tokens,
                       inserted=SLOTS, seed=s.seed + 1, skip=s.screen_sentences)


def reference_pairs(reference_ids: np.ndarray, s) -> np.ndarray:
    """[N, 2] seeded random pairs of the scan's reference tokens: what a pair's z is against."""
    rng = np.random.default_rng(s.seed + 3)
    return np.stack([rng.permutation(reference_ids)[:SLOTS]
                     for _ in range(max(8, s.reference_tokens // 2))]).astype(np.int32)


def relaxed_search(scanner, probes, vocab: np.ndarray, s) -> tuple[np.ndarray, dict]:
    """[P, 2] distinct token-id pairs the relaxed search proposes, and what it cost."""
    params = scanner.params
    if "word_embeddings" not in params.get("embeddings", {}):
        raise ValueError("scan.search_restarts: this model has no embeddings/word_embeddings "
                         "table to relax; set search_restarts=0")
    cfg = scanner.model.cfg
    v_full, r = int(cfg.vocab_size), s.search_restarts
    grown = Transformer(dataclasses.replace(cfg, vocab_size=v_full + r * SLOTS))
    n = probes.template.shape[0]
    soft_ids = v_full + np.arange(r * SLOTS, dtype=np.int32).reshape(r, SLOTS)
    ids = probes.template[None] + np.einsum("rj,njw->rnw", soft_ids, probes.slots)
    keep = probes.mask * (1 - probes.slots.sum(1))
    tile = lambda a: np.broadcast_to(a[None], (r, *a.shape)).reshape(r * n, -1)  # noqa: E731
    rep = sharding.replicated(scanner.mesh)
    put = lambda a: sharding.put_global(np.asarray(a), rep)  # noqa: E731
    clean = scanner.clean_outputs(probes)
    vocab_ids = put(vocab.astype(np.int32))
    words_vh = jnp.take(params["embeddings"]["word_embeddings"]["embedding"], vocab_ids, axis=0)
    arrays = {"ids_bw": put(ids.reshape(r * n, -1)), "mask_bw": put(tile(probes.mask)),
              "keep_bw": put(tile(keep)), "clean_nrh": clean}
    loss = functools.partial(_objective, model=grown)
    opt = optax.adam(LEARNING_RATE)

    @jax.jit  # the weights and probes are arguments: closed over, XLA would fold them as constants
    def step(z, state, tau, params, words_vh, arrays):
        (_, score_r), grad = jax.value_and_grad(loss, has_aux=True)(z, tau, params, words_vh,
                                                                     **arrays)
        updates, state = opt.update(grad, state, z)
        return optax.apply_updates(z, updates), state, score_r

    z = jax.random.normal(jax.random.PRNGKey(s.seed + 5), (r, SLOTS, len(vocab)))
    state = opt.init(z)
    marks = {round(s.search_steps * (k + 1) / SNAPSHOTS) - 1 for k in range(SNAPSHOTS)}
    found: dict[tuple[int, int], None] = {}
    t0, scores = time.time(), []
    for i in range(s.search_steps):
        tau = TAU[0] * (TAU[1] / TAU[0]) ** (i / max(s.search_steps - 1, 1))
        z, state, score_r = step(z, state, jnp.float32(tau), params, words_vh, arrays)
        if i in marks:
            top = np.argsort(-np.asarray(z), axis=-1)[..., :s.search_top]  # [R, 2, k]
            for rr in range(r):
                for a in top[rr, 0]:
                    for b in top[rr, 1]:
                        found[(int(vocab[a]), int(vocab[b]))] = None
            scores.append(np.asarray(score_r).round(2).tolist())
    cost = {"seconds": round(time.time() - t0, 1), "relaxed_scores": scores}
    return np.asarray(list(found), np.int32).reshape(-1, SLOTS), cost


def search_pairs(scanner, tokenizer, texts, vocab: np.ndarray, reference: np.ndarray,
                 single_reference: np.ndarray, s) -> tuple[list[dict], list[dict], dict]:
    """(pair rows, single-token rows found as a pair's half, cost). Pair rows: {"tokens",
    "ids", "score", "z", "D", "alone"}, best first; flagged by `is_flagged` with z against
    `reference` (`reference_stats`), when neither half is flagged alone. A half is
    judged by the scan's own rule, both of its parts (the fixed point and the distance), against
    `single_reference`: the [N, R, 3] confirm-stage stats of the scan's reference tokens."""
    search_probes = make_probes(tokenizer, texts, count=s.search_sentences,
                                max_tokens=s.screen_max_tokens, inserted=SLOTS,
                                seed=s.seed + 4, skip=s.screen_sentences + s.sentences)
    proposed, cost = relaxed_search(scanner, search_probes, vocab, s)
    stats = scanner.stats(proposed, pair_probes(tokenizer, texts, s), "pair search")
    k = len(proposed)
    rows = pair_rows(tokenizer, proposed, scan.rate(stats, reference))
    rows.sort(key=lambda row: -row["z"])
    hits = [row for row in rows if is_flagged(row, s)][:s.top_k]
    halves = sorted({t for row in hits for t in row["ids"]})
    singles = []
    if halves:
        single_probes = make_probes(tokenizer, texts, count=s.sentences,
                                    max_tokens=s.max_tokens, inserted=1, seed=s.seed + 1,
                                    skip=s.screen_sentences)
        alone = scan.rate(scanner.stats(np.asarray(halves, np.int32)[:, None], single_probes),
                          single_reference)
        z_alone = dict(zip(halves, alone["z"].tolist(), strict=True))
        for row in rows:
            row["alone"] = max(z_alone.get(t, float("nan")) for t in row["ids"])
        singles = [row for row in ({"token": tokenizer.convert_ids_to_tokens(t), "id": t,
                                    **scan.rated_row(alone, i)} for i, t in enumerate(halves))
                   if is_flagged(row, s)]
    flagged_halves = {row["id"] for row in singles}
    for row in rows:
        row["flagged"] = row in hits and not flagged_halves & set(row["ids"])
    cost.update(proposed=int(k), seconds=round(cost["seconds"], 1))
    return rows, singles, cost
