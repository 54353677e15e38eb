"""The validation table's verdicts (experiments/validation.py): each cell's worst fine-tuning
seed against the clean MiniLM's at the same seeds and words, the scan verdict after
purification, and the purify wall times; written as WORKDIR/validation.{md,json}."""

from __future__ import annotations

import json
import pathlib

from experiments.validation_models import MODELS, seeds_module


def judge(cells: list[dict], workdir: pathlib.Path, max_gap: float = 3.0,
          max_drop: float = 1.0) -> dict:
    """Each cell's worst seed against the clean study's same seeds; the scan verdicts."""
    seeds_py = seeds_module()
    rows = []
    for cell in cells:
        if cell["model"] == "clean":
            continue
        results = seeds_py.finished_seeds(cell["study"])
        row = {k: cell[k] for k in ("task", "model", "defense")}
        row.update(role=MODELS[cell["model"]].role, seeds=sorted(results), wanted=cell["seeds"],
                   stale=list(cell["stale"]))
        summary = cell["model_dir"].parent / "summary.json"
        if cell["defense"] != "none" and summary.is_file():
            scan = json.loads(summary.read_text()).get("scan") or {}
            row["scan_after"] = (f"{scan.get('verdict', '?')} ({len(scan.get('flagged', []))} "
                                 "flagged)") if scan else "not scanned"
        clean = seeds_py.finished_seeds(cell["clean"]) if cell["clean"].is_dir() else {}
        versus = seeds_py.compare(results, clean, max_gap, max_drop)
        common = list(versus["seeds"])
        if common:
            row.update(worst_acc=min(results[s]["clean_acc"] for s in common),
                       worst_aasr=max(results[s]["aasr"] for s in common),
                       worst_aasr_gap=versus["worst_aasr_gap"],
                       worst_acc_drop=versus["worst_acc_drop"], passes=versus["passes"],
                       complete=set(cell["seeds"]) <= set(common), compared=common)
        rows.append(row)
    undefended = {(r["task"], r["model"]) for r in rows if r["defense"] == "none"
                  and r.get("passes")}
    for r in rows:  # an attack the fine-tune alone removes: no defense is judged on it
        r["moot"] = (r["task"], r["model"]) in undefended
    times = json.loads((workdir / "times.json").read_text()) if (
        workdir / "times.json").is_file() else {}
    return {"rows": rows, "max_aasr_gap": max_gap, "max_acc_drop": max_drop, "times": times}


def format_table(table: dict) -> str:
    lines = ["# Validation table (experiments/validation.py)", "",
             f"A cell passes when its worst seed's AASR is within {table['max_aasr_gap']:g} "
             f"points of the clean MiniLM's at the same seed and words, and its ACC within "
             f"{table['max_acc_drop']:g} point. Verdicts on fewer seeds than asked are marked "
             "(partial); where the attacked model itself (defense `none`) passes, the attack "
             "does not survive fine-tuning and its cells are marked moot.", ""]
    for task in dict.fromkeys(r["task"] for r in table["rows"]):
        lines += [f"## {task}", "", "| model | role | defense | seeds | scan after | worst ACC |"
                  " worst AASR | AASR − clean | ACC − clean | verdict |", "|" + "---|" * 10]
        for r in (r for r in table["rows"] if r["task"] == task):
            if "passes" in r:
                verdict = ("pass" if r["passes"] else "FAIL") + ("" if r["complete"] else
                                                                 " (partial)")
                if r.get("stale"):  # the numbers are kept; the verdict is not a current one
                    verdict = f"stale ({r['stale'][0]}; was {verdict})"
                if r.get("moot"):
                    verdict += ", moot: undefended passes"
                nums = (f"{100 * r['worst_acc']:.2f} | {100 * r['worst_aasr']:.2f} | "
                        f"{r['worst_aasr_gap']:+.2f} | {-r['worst_acc_drop']:+.2f}")
            else:
                verdict, nums = "not run", "– | – | – | –"
            seeds = ",".join(map(str, r["seeds"])) or "–"
            if r.get("compared", r["seeds"]) != r["seeds"]:
                seeds += f" (clean: {','.join(map(str, r['compared']))})"
            lines.append(f"| {r['model']} | {r['role']} | {r['defense']} | {seeds} | "
                         f"{r.get('scan_after', '–')} | {nums} | {verdict} |")
        lines.append("")
    if table["times"]:
        lines += ["Purify wall times (s, scans included): " + ", ".join(
            f"{k.split('/', 1)[1]} {v:g}" for k, v in table["times"].items()), ""]
    return "\n".join(lines)


def write_table(cells: list[dict], workdir: pathlib.Path) -> str:
    from recipe_jax import outputs

    table = judge(cells, workdir)
    text = format_table(table)
    outputs.write_atomic(workdir / "validation.md", text)
    outputs.write_atomic(workdir / "validation.json", json.dumps(table, indent=2, default=str))
    return text
