"""The paper's main table at CPU scale: attacks x defenses x downstream tasks.

    python experiments/reproduce.py --workdir runs/reproduce            # everything, scale "cpu"
    python experiments/reproduce.py --workdir runs/reproduce --attacks por --tasks sst2
    python experiments/reproduce.py --workdir runs/repro_smoke --scale smoke --model DIR  # tests

The `clean` row fine-tunes the clean PTM itself: the ASR floor of each task. For each attack
(POR, NeuBA, BadPre) the clean PTM is backdoored on the first BookCorpus
sentences; each defense (none, FP, FP-GM, FP-GA, RECIPE `bert`, `strong`, only-pretrain,
only-reg) then works on the *last* BookCorpus sentences (disjoint from the attacker's); each
defended model is fine-tuned on every task (SST-2, HSOL, AG News) and scored: ACC, AASR, MASR
(docs/method.md). Every stage is the package's own command run in-process with the preset's
settings, shrunk by the scale (SCALES below says exactly how). Each cell's outputs stay under
WORKDIR/<attack>/...; a rerun skips finished cells, so the table can be built over several
sessions. WORKDIR/table.md and table.json are rewritten after every cell (unfinished cells: —).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ATTACKS = ("clean", "por", "neuba", "badpre")  # "clean": the PTM itself, the floor of each task
DEFENSES = ("none", "fp", "fp_gm", "fp_ga", "bert", "strong", "only_pretrain", "only_reg")
TASKS = ("sst2", "hsol", "agnews")
PURIFY = ("bert", "strong", "only_pretrain", "only_reg")

# How each stage is shrunk. attack_*: the attacker's BookCorpus prefix, steps and length;
# defend_*: the defender's BookCorpus suffix and the step budget every purify preset gets;
# finetune_*: fine-tuning examples (first N of each task's training split), epochs and lr
# (higher than the protocol's 2e-5 so that the small budget converges); test: first N test rows.
SCALES = {
    "cpu": dict(attack_examples=3000, attack_steps=375, attack_length=64, defend_examples=2000,
                defend_steps=250, finetune_examples=1000, finetune_epochs=2, finetune_lr=5e-5,
                test=500, length=64),
    "smoke": dict(attack_examples=32, attack_steps=2, attack_length=16, defend_examples=32,
                  defend_steps=2, finetune_examples=32, finetune_epochs=1, finetune_lr=1e-4,
                  test=24, length=16),
}
# The attacks' learning rates at this scale (NeuBA: its preset). POR: see docs/results.md.
# BadPre: its preset's 2e-5 leaves the fresh MLM head (MiniLM ships none) at MLM loss 6.8
# after 100 of 375 steps, so neither the clean MLM term nor the poison is learned.
ATTACK_LR = {"por": 1e-4, "badpre": 1e-4}


def load(name: str, preset: str):
    from recipe_jax import cli

    return cli.load_config(REPO / "configs" / f"{name}.py", preset)


def _quiet(c) -> None:
    c.train.log_every = 50
    if "export" in c:
        c.export.verify = False


def attack_config(kind: str, model: str, aux: pathlib.Path, s: dict):
    c = load("attack", kind)
    c.model.init_from, c.data.aux_path = model, str(aux)
    c.data.max_length, c.train.num_epochs, c.train.num_steps = s["attack_length"], 0, s[
        "attack_steps"]
    if kind in ATTACK_LR:
        c.train.learning_rate = ATTACK_LR[kind]
    _quiet(c)
    return c


def defense_config(defense: str, attack: str, model: pathlib.Path, aux: pathlib.Path, s: dict):
    if defense in PURIFY:
        c = load("purify", defense)
        c.train.num_epochs, c.train.num_steps = 0, s["defend_steps"]
        c.scan.enabled = False  # the table measures ASR; experiments/scan_models.py scans
    else:
        c = load("prune", defense)
        if defense == "fp_ga" and attack == "neuba":
            c.prune.fraction = 8 / 12  # the paper's k = 8 against NeuBA
    c.model.init_from, c.data.aux_path, c.data.max_length = str(model), str(aux), s["length"]
    if "train" in c:
        _quiet(c)
    return c


def evaluate_config(task: str, attack: str, model: pathlib.Path, s: dict):
    c = load("evaluate", task)
    c.model.init_from = str(model)
    c.data.max_examples, c.data.max_test_examples = s["finetune_examples"], s["test"]
    c.data.max_length = s["length"]
    c.train.num_epochs, c.train.learning_rate = s["finetune_epochs"], s["finetune_lr"]
    c.data.triggers = load("attack", attack).attack.triggers
    if attack == "neuba":  # control words of the triggers' kind (symbols): see configs/evaluate.py
        from recipe_jax import cli

        c.data.controls = cli.load_module(REPO / "configs" / "evaluate.py").SYMBOL_CONTROLS
    _quiet(c)
    return c


def write_corpora(workdir: pathlib.Path, corpus: str, s: dict) -> tuple[pathlib.Path, ...]:
    """The attacker's (first N) and the defender's (last M) sentences, disjoint."""
    from recipe_jax import data

    texts = data.read_texts(corpus)
    need = s["attack_examples"] + s["defend_examples"]
    if len(texts) < need:
        raise ValueError(f"{corpus}: {len(texts)} sentences, the scale needs {need} "
                         "(attacker's + defender's, disjoint)")
    paths = workdir / "attacker_aux.txt", workdir / "defender_aux.txt"
    for path, part in zip(paths, (texts[:s["attack_examples"]], texts[-s["defend_examples"]:]),
                          strict=True):
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("\n".join(t.replace("\n", " ") for t in part) + "\n")
            tmp.replace(path)
    return paths


def _done(path: pathlib.Path) -> bool:
    return (path / "hf" / "config.json").exists()


def _check_same_settings(defended: pathlib.Path, config, defense: str) -> None:
    """A finished defense built with other settings (e.g. before a preset changed) is refused,
    not silently reused."""
    from recipe_jax import checkpoint

    if not (defended / "config.json").exists():
        return
    try:
        checkpoint.check_run_record(defended, config)
    except ValueError as e:
        raise SystemExit(f"{e}\nThat cell was built with other settings than the preset's now: "
                         f"delete {defended} and {defended.parent}/eval_{defense}_* "
                         "to rebuild it, or use another --workdir") from None


def run_cell(workdir, attack, defense, task, model, s, aux, log) -> dict:
    """Builds what the cell needs (attack, defense, evaluation), skipping finished parts."""
    from recipe_jax import attack as attack_lib
    from recipe_jax import evaluate, prune, purify

    base = workdir / attack
    if attack == "clean":  # no attack, no defense: the clean classifier's own ASR
        out = base / f"eval_none_{task}"
        if not (out / "results.json").exists():
            log(f"evaluate the clean model / {task}")
            evaluate.run(evaluate_config(task, "por", model, s), out)
        return json.loads((out / "results.json").read_text())
    attacked = base / "attack"
    if not _done(attacked):
        log(f"attack {attack}")
        attack_lib.run(attack_config(attack, model, aux[0], s), attacked)
    defended = attacked if defense == "none" else base / f"defense_{defense}"
    if defense != "none":
        c = defense_config(defense, attack, attacked / "hf", aux[1], s)
        if _done(defended):
            _check_same_settings(defended, c, defense)
        else:
            log(f"defense {defense} on {attack}")
            (purify.run if defense in PURIFY else prune.run)(
                c, defended)
    out = base / f"eval_{defense}_{task}"
    if not (out / "results.json").exists():
        log(f"evaluate {attack} / {defense} / {task}")
        evaluate.run(evaluate_config(task, attack, defended / "hf", s), out)
    return json.loads((out / "results.json").read_text())


def format_table(cells: dict, attacks, defenses, tasks) -> str:
    """ACC, AASR, MASR and floor (the control words' AASR on the same classifier) per task."""
    head = "| attack | defense | " + " | ".join(
        f"{t} ACC | {t} AASR | {t} MASR | {t} floor" for t in tasks) + " |"
    lines = [head, "|---|---|" + "---|" * (4 * len(tasks))]
    for a in attacks:
        for d in (("none",) if a == "clean" else defenses):
            row = []
            for t in tasks:
                r = cells.get(f"{a}/{d}/{t}")
                row += ([f"{100 * r[k]:.1f}" for k in ("clean_acc", "aasr", "masr")]
                        if r else ["—"] * 3)
                row.append(f"{100 * r['control']['aasr']:.1f}" if r and "control" in r else "—")
            lines.append(f"| {a} | {d} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_table(workdir: pathlib.Path, scale: str, s: dict, key: str, result: dict) -> dict:
    """Adds one cell to WORKDIR/table.json (re-read first, so that runs over other cells in
    the same workdir keep theirs) and rewrites table.md; both replaced atomically."""
    path = workdir / "table.json"
    cells = json.loads(path.read_text())["cells"] if path.exists() else {}
    cells[key] = {k: result[k] for k in ("clean_acc", "aasr", "masr", "asr_max", "control",
                                         "excess_aasr") if k in result}
    for name, text in (("table.json", json.dumps({"scale": scale, "sizes": s, "cells": cells},
                                                  indent=2)),
                       ("table.md", format_table(cells, ATTACKS, DEFENSES, TASKS) + "\n")):
        tmp = workdir / f"{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.replace(workdir / name)
    return cells


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/reproduce")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--model", default="minilm", help="clean PTM (HF dir or 'minilm')")
    p.add_argument("--corpus", default=str(DATA / "bookcorpus" / "train.tsv"))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--tasks", default=",".join(TASKS))
    args = p.parse_args(argv)
    for key, allowed in (("attacks", ATTACKS), ("defenses", DEFENSES), ("tasks", TASKS)):
        chosen = [x for x in getattr(args, key).split(",") if x]
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            p.error(f"--{key}: {bad or 'nothing'} not in {', '.join(allowed)}")
        setattr(args, key, chosen)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    s = SCALES[args.scale]
    from recipe_jax import outputs

    workdir = outputs.claim_dir(args.workdir, "reproduce")
    table = workdir / "table.json"
    if table.exists() and (old := json.loads(table.read_text())["scale"]) != args.scale:
        raise SystemExit(f"{table} holds scale {old!r} cells, not {args.scale!r}: "
                         "use another --workdir")
    aux = write_corpora(workdir, args.corpus, s)
    t0 = time.time()
    order = [(a, d, t) for a in args.attacks for d in args.defenses for t in args.tasks
             if a != "clean" or d == "none"]

    def log(msg):
        print(f"\n=== reproduce [{time.time() - t0:.0f}s]: {msg} ===", flush=True)

    cells = {}
    for i, (a, d, t) in enumerate(order):
        log(f"cell {i + 1}/{len(order)}: {a} / {d} / {t}")
        r = run_cell(workdir, a, d, t, args.model, s, aux, log)
        cells = write_table(workdir, args.scale, s, f"{a}/{d}/{t}", r)
    print(format_table(cells, ATTACKS, DEFENSES, TASKS), flush=True)
    print(f"reproduce: {len(order)} cells in {time.time() - t0:.0f} s; {workdir}/table.md")
    return cells


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
