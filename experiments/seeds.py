"""How much a backdoor measurement moves with the fine-tuning seed: `evaluate` once per seed.

One fine-tune per model can under- or overstate what survives of a backdoor. POR ties each
trigger to a fixed output vector, and which label that vector lands on depends on the fresh
classifier head; a weakened vector crosses the boundary in some fine-tunes and not in others
(docs/results.md, "Seed study"). This fine-tunes the same model with each seed (WORKDIR/seed<N>,
an ordinary evaluate run dir: rerun to resume, finished seeds are read back) and prints each
seed's ACC, AASR, floor (control words) and per-trigger ASR, then the mean, min and max over the
seeds. The worst seed's AASR is the number to hold a defense to. Seeds finished by earlier runs
of the same study (same model, config, overrides) are read back and summarized with the new ones,
so a study can grow one seed per command.

    python experiments/seeds.py --workdir runs/seeds_por2 --model runs/por2/hf \
        --config configs/evaluate.py:sst2 --seeds 42,43,44 [--set data.max_examples=1000 ...] \
        [--clean runs/seeds_clean]

`--clean DIR` names the clean model's seed study under the same config and overrides (the same
triggers and control words): each seed both studies hold is compared, AASR − the clean AASR (the
clean model's floor for these words at that seed) and ACC − the clean ACC, and the worst of each
is held to `--max-aasr-gap` and `--max-acc-drop` points (3 and 1: docs/results.md's bar).

`--reuse DIR` (repeatable) names another study of the same model, config and overrides except
the words scored (data.triggers, data.controls), which do not enter the fine-tune: a seed that
study finished is not fine-tuned again here; its final checkpoint is copied in and only scored
with this study's words (the clean model's floor for several trigger families costs one
fine-tune per seed, not one per family).

Studies compare configs by what they are, not where the checkout lies: a file in a `configs`
folder is the project's preset (`configs/evaluate.py:sst2` in this clone, another clone or a git
worktree is one config); any other config file is known by its absolute path.

Writes WORKDIR/seeds.json and WORKDIR/seeds.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import shutil
import statistics
import sys

COLUMNS = (("ACC", "clean_acc"), ("AASR", "aasr"), ("MASR", "masr"))
SCORED_ONLY = ("data.triggers", "data.controls")  # overrides the fine-tune does not read


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="one evaluate run dir per seed goes here")
    p.add_argument("--model", required=True, help="HF dir of the model to fine-tune, or 'minilm'")
    p.add_argument("--config", default="configs/evaluate.py:sst2", help="FILE:PRESET")
    p.add_argument("--seeds", default="42,43,44", help="comma-separated fine-tuning seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, e.g. data.max_examples=1000 (repeatable)")
    p.add_argument("--clean", default="", help="the clean model's seed study (a --workdir of "
                   "this script, same config and overrides) to compare each seed with")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="a study of the same fine-tunes scored with other words: its finished "
                        "seeds are scored here, not fine-tuned again (repeatable)")
    p.add_argument("--max-aasr-gap", type=float, default=3.0,
                   help="points of AASR over the clean model's allowed at the worst seed")
    p.add_argument("--max-acc-drop", type=float, default=1.0,
                   help="points of ACC under the clean model's allowed at the worst seed")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds={args.seeds!r}: use comma-separated integers, e.g. 42,43,44")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds={args.seeds}: name one or more distinct seeds >= 0")
    return args


def build_config(config_arg: str, model: str, overrides: list[str]):
    """The evaluate config FILE:PRESET with `model` and the KEY=VALUE overrides applied."""
    from recipe_jax import cli

    file, _, preset = config_arg.partition(":")
    config = cli.set_keys(cli.load_config(file, preset or None), {"model.init_from": model}, file)
    for item in overrides:
        key, sep, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a plain string, e.g. a path
        bad = ValueError(f"--set {item!r}: not KEY=VALUE with a key of {file}; "
                         "e.g. --set data.max_examples=1000")
        if not sep:
            raise bad
        try:
            cli.set_keys(config, {key: value}, file)
        except KeyError:
            raise bad from None
    return config


def summarize(results: dict[int, dict]) -> dict:
    """Mean, min and max over seeds of ACC, AASR, MASR, floor and each trigger's ASR."""
    def spread(values):
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}

    first = next(iter(results.values()))
    out = {name: spread([r[key] for r in results.values()]) for name, key in COLUMNS}
    if "control" in first:
        out["floor"] = spread([r["control"]["aasr"] for r in results.values()])
    out["asr"] = {t: spread([r["asr_max"][t] for r in results.values()])
                  for t in first["asr_max"]}
    return out


def format_table(results: dict[int, dict], summary: dict) -> str:
    triggers = list(next(iter(results.values()))["asr_max"])
    floor = "floor" in summary
    head = ["seed", *(n for n, _ in COLUMNS), *(["floor"] if floor else []),
            *(f"ASR({t})" for t in triggers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, r in results.items():
        cells = [f"{100 * r[k]:.2f}" for _, k in COLUMNS]
        cells += [f"{100 * r['control']['aasr']:.2f}"] if floor else []
        cells += [f"{100 * r['asr_max'][t]:.2f}" for t in triggers]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    for stat in ("mean", "min", "max"):
        cells = [f"{100 * summary[n][stat]:.2f}" for n, _ in COLUMNS]
        cells += [f"{100 * summary['floor'][stat]:.2f}"] if floor else []
        cells += [f"{100 * summary['asr'][t][stat]:.2f}" for t in triggers]
        lines.append(f"| **{stat}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finished_seeds(workdir: pathlib.Path) -> dict[int, dict]:
    """Every seed<N>/results.json of a study dir, by seed."""
    out = {}
    for path in workdir.glob("seed*/results.json"):
        name = path.parent.name[len("seed"):]
        if name.isdigit():
            out[int(name)] = json.loads(path.read_text())
    return dict(sorted(out.items()))


def config_id(config_arg: str | None) -> str | None:
    """What names a study's --config FILE:PRESET across checkouts: a file in a folder named
    `configs` (the project's presets, in this or another clone or worktree) is known as
    `configs/NAME:PRESET`; any other file by its absolute path."""
    if not config_arg:
        return config_arg
    file, sep, preset = config_arg.partition(":")
    path = pathlib.Path(file)
    name = (f"configs/{path.name}" if path.parent.name == "configs"
            else str(path.absolute()))
    return name + sep + preset


def _same(old: dict, record: dict, key: str) -> bool:
    if key == "config":
        return config_id(old.get(key)) == config_id(record.get(key))
    return old.get(key) == record.get(key)


def check_clean(clean_dir: pathlib.Path, record: dict) -> None:
    """The clean study exists and measured the same config, triggers and control words."""
    study = clean_dir / "study.json"
    if not study.is_file():
        raise FileNotFoundError(f"--clean {clean_dir}: no study.json; run this script on the "
                                "clean model there first (same --config and --set)")
    old = json.loads(study.read_text())
    diff = [k for k in ("config", "overrides") if not _same(old, record, k)]
    if diff:
        raise ValueError(f"--clean {clean_dir}: a study with another {' and '.join(diff)} "
                         f"({', '.join(repr(old.get(k)) for k in diff)}); the clean floor must "
                         "be measured with the same config, triggers and control words")


def _trained_on(record: dict) -> tuple:
    """What a study's fine-tunes depend on: its model, config and overrides but the words."""
    kept = [o for o in record.get("overrides", [])
            if o.partition("=")[0].strip() not in SCORED_ONLY]
    return record.get("model"), config_id(record.get("config")), kept


def check_reuse(sources: list[pathlib.Path], record: dict) -> None:
    """Each --reuse study fine-tuned what this one would: same model, config and overrides,
    but for the words scored."""
    for src in sources:
        study = src / "study.json"
        if not study.is_file():
            raise FileNotFoundError(f"--reuse {src}: no study.json; name the --workdir of "
                                    "another run of this script")
        old = json.loads(study.read_text())
        if _trained_on(old) != _trained_on(record):
            raise ValueError(
                f"--reuse {src}: that study fine-tuned {old.get('model')!r} with "
                f"{old.get('config')!r} and overrides {old.get('overrides')}; only a study "
                f"whose overrides differ in {' and '.join(SCORED_ONLY)} alone runs the same "
                "fine-tunes")


def borrow(run: pathlib.Path, seed: int, sources: list[pathlib.Path]) -> pathlib.Path | None:
    """Copies the finished fine-tune of `seed` from the first source study that has one into
    `run` (an evaluate run dir not yet started), so that evaluate resumes at its last step and
    only scores; returns the source run, or None (nothing to borrow, or `run` has begun)."""
    if run.exists():
        return None  # a fine-tune of its own has begun: resume that one
    for src in sources:
        done = src / f"seed{seed}"
        if not ((done / "results.json").is_file() and (done / "checkpoints").is_dir()):
            continue
        tmp = run.with_name(f".{run.name}.borrow")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(done, tmp, ignore=shutil.ignore_patterns("results.json", "*.tmp*"))
        tmp.rename(run)  # atomic: a killed copy never looks like a started run
        return done
    return None


def compare(results: dict[int, dict], clean: dict[int, dict], max_aasr_gap: float,
            max_acc_drop: float) -> dict:
    """Per seed both hold: AASR and ACC minus the clean model's (points); the worst; the verdict.
    Seeds the clean results lack are listed in `without_clean`; with no seed in common, `seeds`
    is empty and there is no verdict (`passes` is None)."""
    common = [s for s in results if s in clean]
    rows = {s: {"aasr_gap": 100 * (results[s]["aasr"] - clean[s]["aasr"]),
                "acc_drop": 100 * (clean[s]["clean_acc"] - results[s]["clean_acc"]),
                "clean_aasr": clean[s]["aasr"], "clean_acc": clean[s]["clean_acc"]}
            for s in common}
    out = {"seeds": rows, "without_clean": [s for s in results if s not in clean],
           "max_aasr_gap": max_aasr_gap, "max_acc_drop": max_acc_drop, "passes": None}
    if rows:
        out["worst_aasr_gap"] = max(r["aasr_gap"] for r in rows.values())
        out["worst_acc_drop"] = max(r["acc_drop"] for r in rows.values())
        out["passes"] = (out["worst_aasr_gap"] <= max_aasr_gap + 1e-9
                         and out["worst_acc_drop"] <= max_acc_drop + 1e-9)
    return out


def versus_clean(results: dict[int, dict], clean_dir: pathlib.Path, record: dict,
                 max_aasr_gap: float, max_acc_drop: float) -> dict:
    """compare() against the clean study in clean_dir, which must be the same study."""
    check_clean(clean_dir, record)
    clean = finished_seeds(clean_dir)
    out = compare(results, clean, max_aasr_gap, max_acc_drop)
    if not out["seeds"]:
        raise ValueError(f"--clean {clean_dir}: no seed in common (it has {sorted(clean)}, "
                         f"this study {sorted(results)}); run the clean model at these seeds")
    return {"clean": str(clean_dir), **out}


def format_versus(v: dict) -> str:
    lines = [f"Against the clean study {v['clean']} (points):", "",
             "| seed | clean ACC | clean AASR | AASR − clean | ACC − clean |",
             "|---|---|---|---|---|"]
    for seed, r in v["seeds"].items():
        lines.append(f"| {seed} | {100 * r['clean_acc']:.2f} | {100 * r['clean_aasr']:.2f} | "
                     f"{r['aasr_gap']:+.2f} | {-r['acc_drop']:+.2f} |")
    verdict = "within" if v["passes"] else "NOT within"
    lines += ["", f"Worst seed: AASR {v['worst_aasr_gap']:+.2f} over the clean model's, ACC "
              f"{-v['worst_acc_drop']:+.2f}: {verdict} the bar (AASR ≤ +{v['max_aasr_gap']:g}, "
              f"ACC ≥ −{v['max_acc_drop']:g}) over {len(v['seeds'])} seed(s)."]
    if v["without_clean"]:
        lines.append(f"Not compared (no clean run at that seed): {v['without_clean']}.")
    return "\n".join(lines)


def _write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_study(workdir: pathlib.Path, record: dict) -> None:
    """Finished seeds are read back, so a rerun must be the same study (more seeds are fine)."""
    path = workdir / "study.json"
    if not path.exists():
        _write(path, json.dumps(record, indent=2))
        return
    old = json.loads(path.read_text())
    diff = [k for k in record if not _same(old, record, k)]
    if diff:
        raise ValueError(f"{workdir} holds a seed study with another "
                         + ", ".join(f"{k} ({old.get(k)!r} there, {record[k]!r} now)"
                                     for k in diff)
                         + "; use a new --workdir, or the old values to add seeds")


def main(argv=None) -> dict:
    from recipe_jax import evaluate

    args = parse_args(argv)
    from recipe_jax import outputs

    workdir = outputs.claim_dir(args.workdir, "seeds")
    build_config(args.config, args.model, args.set)  # a bad --set fails before anything runs
    record = {"model": args.model, "config": args.config, "overrides": args.set}
    check_study(workdir, record)
    clean_dir = pathlib.Path(args.clean) if args.clean else None
    if clean_dir is not None:
        check_clean(clean_dir, record)  # before any fine-tune
    sources = [pathlib.Path(r).absolute() for r in args.reuse]
    check_reuse(sources, record)
    results = finished_seeds(workdir)
    for i, seed in enumerate(args.seeds):
        run = workdir / f"seed{seed}"
        print(f"\n=== seeds: {i + 1}/{len(args.seeds)}: seed {seed} -> {run} ===", flush=True)
        if (run / "results.json").exists():
            results[seed] = json.loads((run / "results.json").read_text())
            continue
        config = build_config(args.config, args.model, args.set)
        config.train.seed = seed
        if (lent := borrow(run, seed, sources)) is not None:
            print(f"seeds: seed {seed} was fine-tuned by {lent}: scoring it with these words",
                  flush=True)
        results[seed] = evaluate.run(config, str(run))
    results = dict(sorted(results.items()))
    summary = summarize(results)
    table = format_table(results, summary)
    record.update(seeds={str(k): r for k, r in results.items()}, summary=summary)
    if clean_dir is not None:
        record["versus_clean"] = versus_clean(results, clean_dir, record, args.max_aasr_gap,
                                              args.max_acc_drop)
        table += "\n\n" + format_versus(record["versus_clean"])
    _write(workdir / "seeds.json", json.dumps(record, indent=2))
    _write(workdir / "seeds.md", f"Model: {args.model}; {args.config}; overrides {args.set}\n\n"
           + table + "\n")
    print(table)
    print(f"seeds: worst AASR {100 * summary['AASR']['max']:.2f}% over {len(results)} seeds; "
          f"{workdir}/seeds.md", flush=True)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"seeds: error: {e}", file=sys.stderr)
        sys.exit(1)
