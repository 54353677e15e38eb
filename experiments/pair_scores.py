"""Given token pairs scored by the scan's pair rule under several models, side by side.

    python experiments/pair_scores.py --workdir runs/pair_scores \
        --model clean=minilm --model por=runs/validation/attack/por/hf \
        --model guided=runs/validation/purify/guided-por/hf \
        --pairs "f theory;ac compliance;cf painter;the theory"

A scan flags pairs its relaxed search proposes (recipe_jax/scan_pairs.py); this asks how the same
pairs score under other models: the clean one, the attacked one, each defense's result. Each pair
(two word pieces of the model's vocabulary, space-separated) is inserted into the scan's confirm
probes and rated against the scan's reference pairs of that model (seeded random pairs of its
reference tokens): the raw score (log D − log C, max over outputs), and its robust z. The
reference's median and MAD are given too: z is relative to them, so a model whose ordinary pairs
move its outputs less gives the same raw score a larger z. Writes WORKDIR/pair_scores.md and
.json; runs in a few minutes per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


class PairRater:
    """One model with the scan's pair probes and reference pairs: rates token-id pairs as the
    scan's pair rule does (also experiments/pair_waves.py)."""

    def __init__(self, model_dir, s):
        from recipe_jax import data, hf, scan, scan_pairs, sharding
        from recipe_jax.scan_probes import probe_texts, vocabulary

        d = hf.resolve_model_dir(str(model_dir))
        self.model_dir, self.settings = model_dir, s
        self.model, self.params = hf.load_pretrained(d)
        self.tokenizer = data.load_tokenizer(d)
        self.scanner = scan.Scanner(self.model, self.params, sharding.make_mesh((-1, 1, 1)),
                                    s.batch_size, progress=False)
        self.vocab = vocabulary(self.tokenizer, self.model.cfg.vocab_size)
        reference = self.vocab[scan.reference_indices(len(self.vocab), s)]  # the scan's own
        self.texts = probe_texts(None, s.seed)
        self.probes = scan_pairs.pair_probes(self.tokenizer, self.texts, s)
        self.reference = scan_pairs.reference_stats(self.scanner, self.tokenizer, self.texts,
                                                    reference, s)

    def ids(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """[K, 2] ids of word-piece pairs; an error names the pieces the vocabulary lacks."""
        tok = self.tokenizer
        ids = [tok.convert_tokens_to_ids(list(p)) for p in pairs]
        unknown = [" ".join(p) for p, i in zip(pairs, ids, strict=True)
                   if tok.unk_token_id in i and tok.unk_token not in p]
        if unknown:
            raise ValueError(f"{self.model_dir}: not word pieces of its vocabulary: "
                             f"{', '.join(unknown)}; give pairs as the tokenizer splits them "
                             "(e.g. 'cf painter')")
        return np.asarray(ids, np.int32).reshape(-1, 2)

    def rate(self, ids_k2: np.ndarray) -> list[dict]:
        """[{"pair", "ids", "score", "z", "D", ...}] in the order given."""
        from recipe_jax import scan, scan_pairs

        rated = scan.rate(self.scanner.stats(ids_k2, self.probes), self.reference)
        return [{"pair": " ".join(row["tokens"]), **row}
                for row in scan_pairs.pair_rows(self.tokenizer, ids_k2, rated)]

    def spread(self) -> dict:
        """Median and MAD of the reference pairs' scores: what z is relative to."""
        from recipe_jax import scan

        return scan.spread(scan.score_of(self.reference).max(-1))


def score_pairs(model_dir, pairs: list[tuple[str, str]], s) -> dict:
    """{"rows": [{"pair", "score", "z", "D"}], "reference": {"median", "mad"}} under one model."""
    rater = PairRater(model_dir, s)
    return {"rows": rater.rate(rater.ids(pairs)), "reference": rater.spread()}


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["Pair score (z against the model's reference pairs); scan.rate, confirm probes.", "",
             "| pair | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k, row in enumerate(next(iter(results.values()))["rows"]):
        cells = [f"{results[n]['rows'][k]['score']:.2f} ({results[n]['rows'][k]['z']:.1f})"
                 for n in names]
        lines.append(f"| `{row['pair']}` | " + " | ".join(cells) + " |")
    lines.append("| reference median (MAD) | " + " | ".join(
        f"{results[n]['reference']['median']:.2f} ({results[n]['reference']['mad']:.2f})"
        for n in names) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path)
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a model to score the pairs under (DIR: an HF dir, or minilm)")
    p.add_argument("--pairs", required=True,
                   help="';'-separated pairs of word pieces, e.g. 'f theory;cf painter'")
    args = p.parse_args(argv)
    models = [m.partition("=") for m in args.model]
    bad = [m for m, (name, eq, path) in zip(args.model, models, strict=True)
           if not (name and eq and path)]
    pairs = [tuple(x.split()) for x in args.pairs.split(";") if x.strip()]
    if bad:
        p.error(f"--model {bad[0]!r}: use NAME=DIR")
    if not pairs or any(len(x) != 2 for x in pairs):
        p.error(f"--pairs {args.pairs!r}: give ';'-separated pairs of two word pieces")
    args.models, args.pairs = {name: path for name, _, path in models}, pairs
    return args


def main(argv=None) -> dict:
    from recipe_jax import outputs, scan

    args = parse_args(argv)
    workdir = outputs.claim_dir(args.workdir, "pair_scores")
    results = {}
    for name, path in args.models.items():
        results[name] = score_pairs(path, args.pairs, scan.Settings())
        print(f"pair_scores: {name} scored", flush=True)
    table = format_table(results)
    outputs.write_atomic(workdir / "pair_scores.json", json.dumps(results, indent=2))
    outputs.write_atomic(workdir / "pair_scores.md", table)
    print(table, flush=True)
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    try:
        main()
    except ValueError as e:
        print(f"pair_scores: error: {e}", file=sys.stderr)
        sys.exit(1)
