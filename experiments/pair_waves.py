"""The scan's relaxed pair search run again and again, each wave without the tokens of the pairs
the waves before flagged (and, optionally, their nearest neighbours in the embedding table).

    python experiments/pair_waves.py --workdir runs/pair_waves \
        --model runs/validation/attack/por_pair/hf --waves 3 --neighbours 500 \
        --watch "qb xv;hq wb;wb hq"

A question about the scan (recipe_jax/scan_pairs.py), not a part of it: its relaxed search finds
the strongest pair trigger's basin. Does a second search, with that basin taken out of the
vocabulary, find a second pair trigger? Each wave proposes pairs as the scan does
(`scan_pairs.relaxed_search`), rates them with the scan's pair probes against its reference
pairs (experiments/pair_scores.py), and flags them by the scan's rule (`scan_report.is_flagged`;
unlike the scan, a pair with a half flagged alone is not set apart). Waves stop at one that
flags nothing. `--watch` pairs (known triggers, when studying an attack we built) are rated too,
and each wave says whether its proposals hold their tokens. Writes WORKDIR/pair_waves.json and
.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments.pair_scores


def neighbours(params, token_ids, k: int) -> set[int]:
    """The `k` nearest tokens (cosine, word embeddings) of each of `token_ids`, themselves
    included."""
    table = np.asarray(params["embeddings"]["word_embeddings"]["embedding"], np.float32)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    out = set(int(t) for t in token_ids)
    for t in token_ids:
        out |= set(np.argsort(-(unit @ unit[t]))[:k].tolist())
    return out


def waves(rater, s, count: int, k_neighbours: int, watch_ids: np.ndarray) -> list[dict]:
    """Up to `count` searches, each without what the ones before flagged; per wave its top
    rated proposals, what it flagged and excluded, whether the watched tokens were proposed."""
    from recipe_jax import scan_pairs
    from recipe_jax.scan_probes import make_probes
    from recipe_jax.scan_report import is_flagged

    tok = rater.tokenizer
    probes = make_probes(tok, rater.texts, count=s.search_sentences,
                         max_tokens=s.screen_max_tokens, inserted=scan_pairs.SLOTS,
                         seed=s.seed + 4, skip=s.screen_sentences + s.sentences)
    watched = set(watch_ids.ravel().tolist())
    vocab, out = rater.vocab, []
    for wave in range(count):
        t0 = time.time()
        proposed, cost = scan_pairs.relaxed_search(rater.scanner, probes, vocab, s)
        rows = sorted(rater.rate(proposed), key=lambda r: -r["z"])
        flagged = [r for r in rows if is_flagged(r, s)]
        found = set(proposed.ravel().tolist())
        out.append({"wave": wave + 1, "vocabulary": int(len(vocab)), "proposed": len(rows),
                    "seconds": round(time.time() - t0, 1),
                    "relaxed_scores": cost["relaxed_scores"][-1], "top": rows[:10],
                    "flagged": [r["pair"] for r in flagged],
                    "watched_proposed": tok.convert_ids_to_tokens(sorted(watched & found))})
        print(f"pair_waves: wave {wave + 1}: {len(rows)} proposed, flagged "
              f"{out[-1]['flagged'][:8] or 'nothing'}; watched tokens proposed: "
              f"{out[-1]['watched_proposed'] or 'none'} ({out[-1]['seconds']:.0f} s)", flush=True)
        if not flagged:
            break
        drop = neighbours(rater.params, sorted({t for r in flagged for t in r["ids"]}),
                          k_neighbours) if k_neighbours else {t for r in flagged for t in r["ids"]}
        out[-1]["excluded"] = int(np.isin(vocab, sorted(drop)).sum())
        vocab = vocab[~np.isin(vocab, sorted(drop))]
    return out


def format_report(model: str, result: dict) -> str:
    lines = [f"# Relaxed pair search in waves: {model}", ""]
    for w in result["waves"]:
        lines += [f"## Wave {w['wave']} ({w['vocabulary']:,} tokens searched, {w['proposed']} "
                  f"proposed, {w['seconds']:.0f} s)", "",
                  f"Flagged: {', '.join(w['flagged']) or 'nothing'}. Watched tokens proposed: "
                  f"{', '.join(w['watched_proposed']) or 'none'}."
                  + (f" Excluded from the next wave: {w['excluded']} tokens." if "excluded" in w
                     else ""), "", "| pair | score | z | D |", "|---|---|---|---|"]
        lines += [f"| `{r['pair']}` | {r['score']:.2f} | {r['z']:.1f} | {r['D']:.2f} |"
                  for r in w["top"]]
        lines.append("")
    if result["watched"]:
        lines += ["## Watched pairs", "", "| pair | score | z | D |", "|---|---|---|---|"]
        lines += [f"| `{r['pair']}` | {r['score']:.2f} | {r['z']:.1f} | {r['D']:.2f} |"
                  for r in result["watched"]]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path)
    p.add_argument("--model", required=True, help="an HF model dir, or minilm")
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--neighbours", type=int, default=0,
                   help="also exclude this many embedding neighbours of each flagged token")
    p.add_argument("--restarts", type=int, default=None, help="scan.search_restarts")
    p.add_argument("--steps", type=int, default=None, help="scan.search_steps")
    p.add_argument("--watch", default="", help="';'-separated pairs to rate and look for")
    args = p.parse_args(argv)
    if args.waves < 1 or args.neighbours < 0:
        p.error("--waves must be >= 1 and --neighbours >= 0")
    args.watch = [tuple(x.split()) for x in args.watch.split(";") if x.strip()]
    if any(len(x) != 2 for x in args.watch):
        p.error(f"--watch: give ';'-separated pairs of two word pieces, not {args.watch}")
    return args


def main(argv=None) -> dict:
    from experiments.pair_scores import PairRater
    from recipe_jax import outputs, scan

    args = parse_args(argv)
    s = scan.Settings()
    s = dataclasses.replace(s, **{k: v for k, v in (("search_restarts", args.restarts),
                                                    ("search_steps", args.steps)) if v})
    s.check()
    rater = PairRater(args.model, s)
    watch_ids = rater.ids(args.watch) if args.watch else np.zeros((0, 2), np.int32)
    workdir = outputs.claim_dir(args.workdir, "pair_waves")
    result = {"model": str(args.model), "settings": dataclasses.asdict(s),
              "waves": waves(rater, s, args.waves, args.neighbours, watch_ids),
              "watched": rater.rate(watch_ids) if len(watch_ids) else []}
    outputs.write_atomic(workdir / "pair_waves.json", json.dumps(result, indent=2))
    outputs.write_atomic(workdir / "pair_waves.md", format_report(str(args.model), result))
    print(format_report(str(args.model), result), flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"pair_waves: error: {e}", file=sys.stderr)
        sys.exit(1)
