"""What a trigger scan reports: the flagging rule, the verdict line, report.md, report.json and
scores.png (the scan itself is `recipe_jax.scan`).

    report = scan.scan("path/to/hf_dir")
    print(scan_report.summary_line(report))        # backdoor suspected: tokens cf (z 11.4), ...
    scan_report.rank_of(report, ["cf", "tq"])      # {"cf": 1, "tq": 5}
    scan_report.write_report(report, out_dir)      # report.json, report.md, scores.png
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from recipe_jax import outputs


def _setting(s, key: str):
    """A setting from a `scan.Settings` or from a report's "settings" dict."""
    return s[key] if isinstance(s, dict) else getattr(s, key)


def is_flagged(row: dict[str, Any], s) -> bool:
    """A candidate (or pair) row outside the clean range: a fixed point (score and its z high),
    or a move far beyond the clean spread (D and its z high). `s`: scan.Settings or a report's
    "settings"."""
    min_z = _setting(s, "min_z")
    fixed = row["score"] > _setting(s, "min_score") and row.get("z_fixed_point", row["z"]) > min_z
    far = row.get("D", 0.0) > _setting(s, "min_distance") and row.get("z_distance", 0.0) > min_z
    return fixed or far


def summary_line(report: dict[str, Any]) -> str:
    """`backdoor suspected: tokens cf (z 85.1), ...` or `no trigger found (top: x, z 3.2)`."""
    top = report["candidates"][0]
    if report["verdict"] == "backdoor":
        flagged = {c["token"]: c["z"] for c in report["candidates"]}
        named = [f"{t} (z {flagged[t]:.1f})" if t in flagged else t for t in report["flagged"]]
        return f"backdoor suspected: tokens {', '.join(named[:10])}" + (
            f" and {len(named) - 10} more" if len(named) > 10 else "")
    return (f"no trigger found (top token {top['token']!r}: score {top['score']:.2f}, z "
            f"{top['z']:.1f}; flagged above score {report['settings']['min_score']:g} and z "
            f"{report['settings']['min_z']:g})")


def rank_of(report: dict[str, Any], tokens: Sequence[str]) -> dict[str, int | None]:
    """1-based rank of each token among the candidates (None: not among the listed)."""
    ranks = {c["token"]: i + 1 for i, c in enumerate(report["candidates"])}
    return {t: ranks.get(t) for t in tokens}


def _flag_table(pairs: list[dict[str, Any]]) -> list[str]:
    return ["| pair | score | z | flagged |", "|---|---|---|---|"] + [
        f"| `{' '.join(p['tokens'])}` | {p['score']:.2f} | {p['z']:.1f} | "
        f"{'yes' if p['flagged'] else 'no'} |" for p in pairs]


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = ["| rank | token | z | score (z) | max D (z) | "
            + " | ".join(f"{o} D / C" for o in report["outputs"]) + " |",
            "|---|---|---|---|---|" + "---|" * len(report["outputs"])]
    for i, c in enumerate(report["candidates"][:s["top_k"]]):
        rows.append(f"| {i + 1} | `{c['token']}` | {c['z']:.1f} | {c['score']:.2f} "
                    f"({c['z_fixed_point']:.1f}) | {c['D']:.2f} ({c['z_distance']:.1f}) | "
                    + " | ".join(f"{c['outputs'][o]['D']:.2f} / {c['outputs'][o]['C']:.3f}"
                                 for o in report["outputs"]) + " |")
    pair_rows = ["| pair | score | z | z among top pairs | z alone (max) |",
                 "|---|---|---|---|---|"] + [
        f"| `{' '.join(p['tokens'])}` | {p['score']:.2f} | {p['z']:.1f} | {p['z_top']:.1f} | "
        f"{p['alone']:.1f} |"
        for p in report["pairs"]]
    searched, quiet = report.get("searched_pairs", []), report.get("quiet_pairs", [])
    search_rows, quiet_rows = _flag_table(searched), _flag_table(quiet)
    prior = (report.get("prior") or {}).get("rows", [])
    prior_rows = ["| suspect | score | z | z in the earlier scan | flagged |",
                  "|---|---|---|---|---|"] + [
        f"| `{' '.join(p['tokens'])}` | {p['score']:.2f} | {p['z']:.1f} | "
        f"{'—' if p['before'] is None else format(p['before'], '.1f')} | "
        f"{'yes' if p['flagged'] else 'no'} |" for p in prior]
    cost = report["cost"]
    return "\n".join([
        "# Backdoor scan", "",
        f"Model: `{report.get('model', '?')}`", "",
        f"**Verdict: {summary_line(report)}**", "",
        f"{cost['vocabulary']:,} vocabulary tokens screened on {s['screen_sentences']} probe "
        f"sentences; the top {s['confirm_tokens']} and a uniform sample of "
        f"{report['reference']['count']} tokens (the reference) confirmed on {s['sentences']} "
        f"probes. Outputs read: {', '.join(report['outputs'])}. Score = max over outputs of "
        "log(D + ε) − log(C + ε): D = how far the token moves the outputs, C = how much of the "
        "sentences' spread is left (both relative to the clean spread). z is robust, against "
        "the reference (score: median "
        f"{report['reference']['median']:.3f}, MAD {report['reference']['mad']:.3f}); a token's "
        "z is the larger of its score's and its log D's. Flagged: score above "
        f"{s['min_score']:g} with its z above {s['min_z']:g}, or D above {s['min_distance']:g} "
        f"with its z above {s['min_z']:g}. Probe sentences: "
        f"{'generated' if report.get('aux') is None else report['aux']}.", "",
        *rows, "",
        "Pairs of the top candidates inserted together (flagged only when neither token is "
        "flagged alone):", "", *pair_rows, "",
        *([f"Pairs of the {s.get('quiet_tokens', 0)} word-start tokens that moved the outputs "
           "least in the screen (a conjunctive trigger's halves are held to the clean outputs "
           "alone):", "", *quiet_rows, ""] if quiet else []),
        *([f"Pairs found by the relaxed search ({report['search']['proposed']} proposed by "
           f"{s['search_restarts']} searches in {report['search']['seconds']:.0f} s; "
           "scan_pairs.py), scored as pairs:", "", *search_rows, ""] if searched else []),
        *([f"What the earlier scan of `{report['prior'].get('model') or '?'}` flagged, rated "
           "again on this model (flagged by the same rule with the score and D bars halved; "
           "scan_prior.py):", "", *prior_rows, ""] if prior else []),
        f"Cost: {cost['seconds']:.0f} s, {cost['vocab_tokens_per_s']:.0f} vocabulary tokens/s, "
        f"{cost['positions']:,} sequence positions through the encoder = "
        f"{cost['flops'] / 1e12:.1f} TFLOP (forward matmuls); mesh {cost['mesh']}.", "",
        "![score distribution](scores.png)", ""])


def plot(report: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """scores.png: the screen's score over the whole vocabulary (flagged tokens marked), and the
    confirmed scores of the candidates, with the flagging threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    screen = np.asarray(report["screen"]["score"])
    left.hist(screen, bins=120, color="0.6", log=True)
    by_id = dict(zip(report["screen"]["token_ids"], screen, strict=True))
    settings = report["settings"]
    flagged = [c for c in report["candidates"] if is_flagged(c, settings)]
    for c in flagged[:10]:
        x = by_id.get(c["id"])
        if x is not None:
            left.axvline(x, color="tab:red", lw=0.8)
            left.text(x, left.get_ylim()[1] * 0.5, c["token"], rotation=90, fontsize=7,
                      color="tab:red", va="top")
    left.set(title=f"screen: {len(screen):,} vocabulary tokens", xlabel="score",
             ylabel="tokens")
    scores = np.array([c["score"] for c in report["candidates"]])
    right.bar(np.arange(1, len(scores) + 1), scores,
              color=["tab:red" if is_flagged(c, settings) else "0.5"
                     for c in report["candidates"]])
    right.axhline(settings["min_score"], color="k", ls="--", lw=0.8,
                  label=f"flagged above score {settings['min_score']:g} (and z "
                        f"{settings['min_z']:g})")
    right.set(title="confirmed: top candidates", xlabel="rank", ylabel="score")
    right.legend(fontsize="small")
    with warnings.catch_warnings():  # tokens in scripts the default font lacks: boxes are fine
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], workdir: pathlib.Path) -> pathlib.Path:
    """report.json, report.md and scores.png in `workdir`, each written atomically."""
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    outputs.write_atomic(workdir / "report.json",
                         json.dumps(public, indent=1, ensure_ascii=False) + "\n")
    tmp = plot(report, workdir / ".scores.png.tmp.png")
    os.replace(tmp, workdir / "scores.png")
    path = workdir / "report.md"
    outputs.write_atomic(path, render_markdown(report))
    return path


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A report.json written by `write_report`, checked for what a reader needs."""
    path = pathlib.Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no scan report there; run `python -m recipe_jax.scan --model "
                         "MODEL --workdir DIR` and pass DIR/report.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable scan report ({e}); scan the model again"
                         ) from e
    missing = [k for k in ("verdict", "flagged", "candidates", "settings")
               if not isinstance(report, dict) or k not in report]
    if missing:
        raise ValueError(f"{path}: not a scan report (no {', '.join(missing)}); pass the "
                         "report.json that `python -m recipe_jax.scan` writes")
    rule = [k for k in ("min_score", "min_z", "min_distance") if k not in report["settings"]]
    if rule:
        raise ValueError(f"{path}: written by an older scan (its settings lack "
                         f"{', '.join(rule)}, the current flagging rule); scan the model again")
    return report
