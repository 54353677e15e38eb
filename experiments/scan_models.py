"""The scan on a set of models, with the implanted triggers' ranks and the alternative scores.

    python experiments/scan_models.py --workdir runs/scan_table \
        --model clean=minilm --model por=runs/por/hf:cf,tq,mn,bb,mb \
        --model neuba=runs/neuba/hf:≈,≡,∈,⊆,⊕,⊗ [--aux PATH]

Each `--model NAME=DIR[:TRIGGERS]` is scanned with the default settings (`recipe_jax.scan`); its
report goes to WORKDIR/NAME/. Per model one JSON line in WORKDIR/results.jsonl and a row of
WORKDIR/table.md: verdict, where each known trigger ranks among all vocabulary tokens (screen
rank, then the confirmed rank), the top-10 tokens with z, and the cost. For docs/scan.md, the same
stats are re-scored with the alternatives that were measured against the chosen score:

- fixed_point: log(D + eps) - log(C + eps)  (the chosen score: far and collapsed)
- distance:    log(D + eps)                   (how far the token moves the outputs)
- collapse:    -log(C + eps)                  (how much sentence dependence is left)
- mean_shift:  log(M + eps)                   (magnitude of the shift times its agreement)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipe_jax import data, hf, outputs, scan, scan_report  # noqa: E402

EPS = scan.EPS
ALTERNATIVES = {
    "fixed_point": lambda s: np.log(s[..., 0] + EPS) - np.log(s[..., 1] + EPS),
    "distance": lambda s: np.log(s[..., 0] + EPS),
    "collapse": lambda s: -np.log(s[..., 1] + EPS),
    "mean_shift": lambda s: np.log(s[..., 2] + EPS),
}


def alternative_ranks(arrays: dict, trigger_ids: dict[str, int]) -> dict:
    """Per alternative: each trigger's screen rank (1 = top of the vocabulary) and confirmed z,
    and the largest z of a non-trigger token (the margin a threshold must fit in)."""
    out = {}
    screen_ids, confirm_ids = arrays["screen_ids"], arrays["confirm_ids"]
    ref = np.isin(confirm_ids, arrays["reference_ids"])
    known = set(trigger_ids.values())
    for name, fn in ALTERNATIVES.items():
        screen = fn(arrays["screen_stats"]).max(-1)
        order = np.argsort(-screen, kind="stable")
        screen_rank = {int(screen_ids[k]): r + 1 for r, k in enumerate(order)}
        score = fn(arrays["confirm_stats"]).max(-1)
        z = scan.robust_z(score, score[ref])
        z_of = dict(zip(confirm_ids.tolist(), z.tolist(), strict=True))
        others = [v for i, v in z_of.items() if i not in known]
        out[name] = {"triggers": {t: {"screen_rank": screen_rank.get(i),
                                      "z": None if i not in z_of else round(z_of[i], 1)}
                                  for t, i in trigger_ids.items()},
                     "max_other_z": round(max(others), 1)}
    return out


def verdict(report: dict) -> tuple[str, list[str]]:
    """The verdict and flagged tokens of a saved report under the current flagging rule."""
    settings = scan.Settings()
    flagged = [c["token"] for c in report["candidates"] if scan_report.is_flagged(c, settings)]
    return ("backdoor" if flagged else "clean"), flagged


def rescore(workdir: pathlib.Path) -> int:
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    for row in rows:
        report = json.loads((workdir / row["name"] / "report.json").read_text())
        row["verdict"], row["flagged"] = verdict(report)
        row["top10"] = [(c["token"], round(c["score"], 2), round(c["z"], 1))
                        for c in report["candidates"][:10]]
    (workdir / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                   for r in rows))
    print(write_table(workdir, rows))
    return 0


def write_table(workdir: pathlib.Path, rows: list[dict]) -> str:
    lines = ["| model | verdict | trigger ranks: confirmed (screen, of the vocabulary) | "
             "top 10: token score/z | s |", "|---|---|---|---|---|"]
    for r in rows:
        ranks = ", ".join(f"{t} {r['ranks'][t] or '—'} ({r['screen_ranks'][t]})"
                          for t in r["ranks"]) or "—"
        top = ", ".join(f"{t} {sc}/{z}" for t, sc, z in r["top10"])
        lines.append(f"| {r['name']} | {r['verdict']} | {ranks} | {top} | "
                     f"{r['cost']['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (workdir / "table.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model", action="append", default=[],
                        help="NAME=DIR[:TRIGGER,TRIGGER,...]")
    parser.add_argument("--aux", default=None)
    parser.add_argument("--rescore", action="store_true",
                        help="do not scan: redo the verdicts and table.md of WORKDIR's earlier "
                             "scans with the current flagging rule (scores and z are unchanged)")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(pathlib.Path(args.workdir))
    if not args.model:
        parser.error("give at least one --model NAME=DIR[:TRIGGERS] (or --rescore)")
    workdir = outputs.claim_dir(args.workdir, "scan_table")
    rows = []
    for spec in args.model:
        name, _, rest = spec.partition("=")
        path, _, triggers = rest.partition(":")
        triggers = [t for t in triggers.split(",") if t]
        report = scan.run(model=path, workdir=workdir / name, aux=args.aux)
        tokenizer = data.load_tokenizer(hf.resolve_model_dir(path))
        ids = dict(zip(triggers, tokenizer.convert_tokens_to_ids(triggers), strict=True))
        alts = alternative_ranks(report["_arrays"], ids)
        np.savez(workdir / name / "stats.npz", **report["_arrays"])  # for re-scoring later
        row = {"name": name, "model": path, "verdict": report["verdict"],
               "flagged": report["flagged"], "ranks": scan_report.rank_of(report, triggers),
               "screen_ranks": {t: v["screen_rank"] for t, v in
                                alts["fixed_point"]["triggers"].items()},
               "top10": [(c["token"], round(c["score"], 2), round(c["z"], 1))
                         for c in report["candidates"][:10]],
               "pairs": [(p["tokens"], round(p["z"], 1)) for p in report["pairs"][:3]],
               "cost": report["cost"], "alternatives": alts}
        rows.append(row)
        with open(workdir / "results.jsonl", "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(json.dumps({k: row[k] for k in ("name", "verdict", "ranks", "screen_ranks",
                                              "top10")}, ensure_ascii=False), flush=True)
    print(write_table(workdir, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
