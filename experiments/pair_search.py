"""The scan's relaxed pair search alone (recipe_jax/scan_pairs.py), without the vocabulary screen.

    python experiments/pair_search.py --model runs/por_pair/hf --aux runs/defender.tsv
    python experiments/pair_search.py --model minilm --aux runs/defender.tsv

Prints the relaxed scores of the searches, the pairs they propose scored as real tokens (best
first, flagged or not) and the single tokens found as a pair's half. The reference (random token
pairs, and single tokens for the halves) is drawn as the full scan draws it. docs/scan.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    from recipe_jax import data, hf, scan, scan_pairs, sharding
    from recipe_jax.scan_probes import make_probes, probe_texts, vocabulary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model dir, or 'minilm'")
    parser.add_argument("--aux", default=None, help="probe sentences (default: generated)")
    parser.add_argument("--restarts", type=int, default=scan.Settings.search_restarts)
    parser.add_argument("--steps", type=int, default=scan.Settings.search_steps)
    args = parser.parse_args(argv)
    model_dir = hf.resolve_model_dir(args.model)
    model, params = hf.load_pretrained(model_dir)
    tokenizer = data.load_tokenizer(model_dir)
    s = scan.Settings(search_restarts=args.restarts, search_steps=args.steps)
    scanner = scan.Scanner(model, params, sharding.make_mesh((-1, 1, 1)), s.batch_size)
    vocab = vocabulary(tokenizer, model.cfg.vocab_size)
    texts = probe_texts(args.aux, s.seed)
    ref_idx = scan.reference_indices(len(vocab), s)  # the scan's own reference tokens
    confirm = make_probes(tokenizer, texts, count=s.sentences, max_tokens=s.max_tokens,
                               inserted=1, seed=s.seed + 1, skip=s.screen_sentences)
    single_ref = scanner.stats(vocab[ref_idx][:, None], confirm)
    pair_ref = scan_pairs.reference_stats(scanner, tokenizer, texts, vocab[ref_idx], s)
    rows, halves, cost = scan_pairs.search_pairs(scanner, tokenizer, texts, vocab, pair_ref,
                                                 single_ref, s)
    print(json.dumps(cost))
    for row in rows[:15]:
        print(f"{' '.join(row['tokens']):30s} score {row['score']:6.2f}  z {row['z']:6.1f}  "
              f"D {row['D']:6.2f}  {'FLAGGED' if row['flagged'] else ''}")
    print("single tokens found as a half:", [(h["token"], round(h["z"], 1)) for h in halves])
    return {"rows": rows, "halves": halves, "cost": cost}


if __name__ == "__main__":
    main()
