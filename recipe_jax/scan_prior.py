"""The scan's follow-up stage: what an earlier scan flagged, rated again on this model.

A purify can weaken a trigger without removing it and, doing so, move it out of every place the
scan's own stages look. Measured on `por_pair` after `strong` (docs/scan.md): the halves of both
two-word triggers went from among the 51 quietest word-start tokens to ranks 208-19,092, no
stage proposed the pairs, and the scan read clean while the fine-tuned model's AASR stayed 3.7
points over the clean model's. The loaded model's scan had named both pairs.

Given `prior`, the report of a scan of the model this one came from (the loaded model of a
purify: `purify` passes it itself; or `python -m recipe_jax.scan --prior REPORT`), this stage
rates each token and pair that scan flagged on this model: single tokens on the confirm probes
against the reference tokens, pairs on the pair probes against the reference pairs, both as the
other stages rate them (`scan.rate`). A suspect is flagged by the scan's own rule
(`scan_report.is_flagged`) with the score and D bars halved (`RELAX`): a handful of suspects named
by another scan needs less evidence than a token picked as the top of 30,000, but it must still
move the outputs further than the spread it leaves (score > 1) or far (D > 5), and stand out from
the reference (z > `min_z`). z alone is not enough: a search selects tokens that are extreme in
the base model already, and those stay extreme in a clean copy of it (on a tiny random model,
the attacked model's searched pairs reach z up to 219 on the clean model, at scores <= 0.42).

Measured (docs/scan.md): `por_pair`'s five flagged suspects after `strong` (3.7 points of AASR
left downstream) score 0.15-1.98, four flagged; after `guided` (none left) all < 0, none; on the
clean MiniLM <= 0.44, none. The rule was set on that model and the tiny one; then, on
`por_adaptive`'s 40 suspects: after `strong` (+4.7 left) 8 flagged, the fifth trigger `cf` among
them, which the scan's own stages had passed; after `guided` (+1.5) none, although z reaches 5.1;
on the clean MiniLM none.

    rows = rate_prior(scanner, tokenizer, texts, prior, single_reference, pair_reference, s)
"""

from __future__ import annotations

import logging

import numpy as np

from recipe_jax import guide, scan, scan_pairs
from recipe_jax.scan_probes import make_probes
from recipe_jax.scan_report import is_flagged

MAX_SUSPECTS = 256  # more than any report here has flagged (bert-purified models: ~80)
RELAX = 0.5  # the score and D bars of a suspect, as a fraction of the scan's own

log = logging.getLogger(__name__)


def suspects(prior: dict, tokenizer) -> np.ndarray:
    """[K, 2] ids of what `prior` flags, pairs as two ids, single tokens padded with -1; names
    that are not tokens of `tokenizer` (a report of another model) are left out."""
    rows = guide.candidates(prior, tokenizer, MAX_SUSPECTS)
    named = len(prior.get("flagged", []))
    if len(rows) < min(named, MAX_SUSPECTS):
        log.warning("scan: %d of the %d names the earlier scan (%s) flagged are not tokens of "
                    "this model's tokenizer and are not rated again; give --prior a scan of the "
                    "model this one came from", named - len(rows), named,
                    prior.get("model", "?"))
    return rows


def rate_prior(scanner, tokenizer, texts, prior: dict, single_reference: np.ndarray,
               pair_reference: np.ndarray, s) -> list[dict]:
    """Rows {"tokens", "ids", "score", "z", ..., "before" (the prior's z, if listed),
    "flagged"} for each suspect of `prior`, in its order. `single_reference` / `pair_reference`:
    the [N, R, 3] stats of the scan's reference tokens on the confirm probes and of its reference
    pairs on the pair probes."""
    rows_k2 = suspects(prior, tokenizer)
    before = _prior_z(prior)
    out: list[dict] = [{}] * len(rows_k2)
    single = lambda: make_probes(tokenizer, texts, count=s.sentences,  # noqa: E731
                                 max_tokens=s.max_tokens, inserted=1, seed=s.seed + 1,
                                 skip=s.screen_sentences)
    pair = lambda: scan_pairs.pair_probes(tokenizer, texts, s)  # noqa: E731
    for where, width, probes, reference in ((rows_k2[:, 1] < 0, 1, single, single_reference),
                                            (rows_k2[:, 1] >= 0, 2, pair, pair_reference)):
        index = np.flatnonzero(where)
        if len(index):  # probes built only for the kinds the prior flagged
            ids = rows_k2[index, :width]
            stats = scanner.stats(ids, probes(), f"earlier scan's {width}-token suspects")
            for i, row in zip(index, scan_pairs.pair_rows(tokenizer, ids,
                                                          scan.rate(stats, reference)),
                              strict=True):
                out[i] = row
    relaxed = {"min_score": s.min_score * RELAX, "min_distance": s.min_distance * RELAX,
               "min_z": s.min_z}
    for row in out:
        row["before"] = before.get(" ".join(row["tokens"]))
        row["flagged"] = is_flagged(row, relaxed)
    return out


def _prior_z(prior: dict) -> dict[str, float]:
    """The z each suspect had in `prior`, by name, where its rows list it."""
    named = {c["token"]: c["z"] for c in prior.get("candidates", [])}
    for key in ("pairs", "quiet_pairs", "searched_pairs"):
        named.update({" ".join(p["tokens"]): p["z"] for p in prior.get(key, [])
                      if " ".join(p["tokens"]) not in named})
    return named
