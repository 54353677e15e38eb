"""The validation table of docs/results.md, as one prepared, resumable script.

Builds each attacked MiniLM of the tuning/validation split (docs/results.md, "Scan-guided
purification: the tuning/validation split"), purifies it with each defense at the defender's
budget, fine-tunes the result with the full protocol at each seed, and holds the worst seed to
the clean MiniLM fine-tuned at the same seeds with the same triggers and control words:

    python experiments/validation.py --workdir runs/validation --plan   # what runs, what is done
    python experiments/validation.py --workdir runs/validation          # all of it
    python experiments/validation.py --workdir runs/validation --models por,badpre --tasks sst2
    python experiments/validation.py --workdir runs/validation --jobs 2   # 2 stages at a time

What runs by default (the must-show of issue 20): `guided` on every validation model at --seeds
on SST-2, and on AG News for `por` and `badpre`; `strong` and `bert` at the first seed on SST-2;
no defense (`none`: does the attack survive fine-tuning at all?) at the first seed on each task;
the clean MiniLM at the same seeds for each set of trigger words; and `guided` on the clean
MiniLM itself (`minilm`, the reference: does the scan raise a false alarm, and what ACC does the
defense cost when there is nothing to remove?). About 22 hours on 2 CPU cores (--plan adds it
up); on one GPU, a small fraction of that. Every stage is an ordinary run dir of this project
and is read back when finished, so a rerun resumes where a run stopped (a killed fine-tune from
its checkpoint):

    WORKDIR/defender.tsv                    the defender's sentences (the last 2,000 of BookCorpus)
    WORKDIR/attacker2.tsv                   por_cls2's attacker's (BookCorpus sentences 3,000-5,999)
    WORKDIR/attack/<model>/hf               the attacked model (configs/attack.py preset)
    WORKDIR/purify/<defense>-<model>/hf     the purified model; summary.json has its scan verdict
    WORKDIR/eval/<task>/<defense>-<model>/  a seed study of experiments/seeds.py
    WORKDIR/eval/<task>/clean-<words>/      the clean MiniLM's study for the same words

A finished attack or purify is reused only while the settings it recorded (DIR/config.json)
are the ones its preset gives now: one an edited preset has made stale is marked STALE in
--plan, its verdict in the table reads "stale (what changed; was ...)", and a run that would
need it stops before starting anything, naming the dirs to move aside (nothing is deleted).

The clean MiniLM's fine-tune does not depend on the words scored, so each task and seed is
fine-tuned once: the other families' clean studies copy that run's final checkpoint and only
score their own words (experiments/seeds.py --reuse).

`--jobs N` runs up to N stages side by side, each in its own process with its log in
WORKDIR/logs/, each once what it needs is built (a purify after its attack, a fine-tune after
its model, a task's clean studies one after another so that only the first fine-tunes); on 2
CPU cores 2 jobs finish ~15% sooner than one (two fine-tunes side by side take ~1.7× one's wall
time), but the wall times it records are then inflated. A failed stage stops new ones and
the run exits non-zero, naming it and its log.

After each fine-tune it writes WORKDIR/validation.json and WORKDIR/validation.md: per task, each
cell's worst seed against the clean model's (AASR − clean floor ≤ 3 points and ACC − clean ≥ −1
point pass), the scan verdict after purification, and the purify wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fcntl
import json
import multiprocessing
import os
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: its sibling modules are experiments.*
    sys.path.insert(0, str(REPO))

from experiments.validation_models import (  # noqa: E402
    BOOKCORPUS,
    DEFENSES,
    MINUTES,
    MODELS,
    STAGES,
    TASKS,
    VARIANTS,
    attack_config,
    attacker_data,
    eval_overrides,
    is_guided,
    loaded,
    purify_config,
    seeds_module,
    write_attacker2,
    write_defender,
)
from experiments.validation_table import write_table  # noqa: E402


@dataclasses.dataclass
class Stage:
    kind: str  # attack | purify | finetune
    name: str
    path: pathlib.Path
    run: object  # () -> None
    todo: int = 1  # fine-tunes left (finetune stages), else 1 when not done
    scored: int = 0  # seeds only scored, on a fine-tune another clean study made
    done: bool = False
    clean: bool = False  # the clean MiniLM's fine-tunes (--stages clean)
    needs: tuple[str, ...] = ()  # keys of the stages that must finish first
    stale: tuple[str, ...] = ()  # how its finished run's settings differ from the current ones

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"


def _finished(study: pathlib.Path, seeds: list[int]) -> list[int]:
    return [s for s in seeds if (study / f"seed{s}" / "results.json").is_file()]


def stale_settings(run_dir: pathlib.Path, config) -> tuple[str, ...]:
    """How the run recorded in `run_dir` differs from `config`, as "key: X there, Y now"
    (guide.run_differences: an attack's record is compared as it is)."""
    from recipe_jax import guide

    return tuple(f"{k}: {old!r} there, {now!r} now"
                 for k, old, now in guide.run_differences(run_dir, config))


def plan(args) -> tuple[list[Stage], list[dict]]:
    """(stages in run order, cells to judge). A cell: task, model, defense, study, clean, seeds,
    stale (how the settings that made its model differ from the current ones)."""
    w = args.workdir
    defender = w / "defender.tsv"
    stages: dict[str, Stage] = {}
    cells, clean_seeds = [], {}

    def add(stage: Stage) -> None:
        stages.setdefault(stage.key, stage)

    for name in args.models:
        attacked, made_by = loaded(w, name), {}  # defense -> the stage that makes its model
        stale = {}  # defense -> how the settings that made its model changed
        if MODELS[name].preset is not None:
            stale["none"] = stale_settings(attacked.parent, attack_config(
                name, attacker_data(w, name, args.bookcorpus)))
            add(Stage("attack", name, attacked, lambda n=name: _attack(args, n),
                      done=(attacked / "config.json").is_file(), stale=stale["none"]))
            made_by["none"] = f"attack:{name}"
        built = (made_by["none"],) if made_by else ()  # what a purify needs: the attack
        for task in args.tasks:
            if task != "sst2" and not (MODELS[name].agnews or args.all_tasks):
                continue
            for defense in args.defenses:
                seeds = args.seeds if is_guided(defense) else args.seeds[:1]
                if task != "sst2" and not (is_guided(defense) or defense == "none"):
                    continue  # comparison cells: SST-2 only (none: is the task's cell moot?)
                if MODELS[name].preset is None and not is_guided(defense):
                    continue  # undefended, it is the clean study; `strong` = `guided` there
                if defense == "none":
                    model_dir = attacked
                else:
                    model_dir = w / "purify" / f"{defense}-{name}" / "hf"
                    stale[defense] = stale.get("none", ()) + stale_settings(
                        model_dir.parent, purify_config(defense, attacked, defender))
                    add(Stage("purify", f"{defense}-{name}", model_dir,
                              lambda d=defense, n=name: _purify(args, d, n, defender),
                              done=(model_dir / "config.json").is_file(),
                              needs=built, stale=stale[defense]))
                    made_by[defense] = f"purify:{defense}-{name}"
                family = MODELS[name].words
                study = w / "eval" / task / f"{defense}-{name}"
                clean = w / "eval" / task / f"clean-{family}"
                clean_seeds.setdefault((task, family, clean), set()).update(seeds)
                cells.append({"task": task, "model": name, "defense": defense, "study": study,
                              "clean": clean, "seeds": seeds, "model_dir": model_dir,
                              "family": family, "stale": stale.get(defense, ()),
                              "needs": (made_by[defense],) if defense in made_by else ()})
    for (task, family, clean), seeds in clean_seeds.items():
        cells.append({"task": task, "model": "clean", "defense": "-", "study": clean,
                      "clean": None, "seeds": sorted(seeds), "model_dir": "minilm",
                      "family": family, "needs": (), "stale": ()})
    ordered = [s for s in stages.values() if s.kind == "attack"]
    ordered += [s for s in stages.values() if s.kind == "purify"]
    return ordered + _finetune_stages(args, cells), cells


def _finetune_stages(args, cells: list[dict]) -> list[Stage]:
    """The fine-tune stages of the cells: the clean studies first (every other cell is judged
    against them), one per task at a time, the first fine-tuning each seed, the others scoring."""
    cleans, finetunes, last_clean = [], [], {}
    tuned = {}  # task -> the seeds the clean MiniLM is (or will be) fine-tuned at
    for cell in cells:
        if cell["model"] == "clean":
            tuned.setdefault(cell["task"], set()).update(
                s for other in _clean_studies(cell) for s in _finished(other, cell["seeds"]))
    for cell in cells:
        left = [s for s in cell["seeds"] if s not in _finished(cell["study"], cell["seeds"])]
        scored, needs = [], cell["needs"]
        if cell["model"] == "clean":  # one fine-tune per task and seed serves every family
            scored = [s for s in left if s in tuned[cell["task"]]]
            tuned[cell["task"]].update(left)
            # one clean study of a task at a time: the next one scores what this one tunes
            needs = (last_clean[cell["task"]],) if cell["task"] in last_clean else ()
        stage = Stage("finetune", f"{cell['task']}/{cell['study'].name}", cell["study"],
                      lambda c=cell: _finetune(args, c), todo=len(left) - len(scored),
                      done=not left, clean=cell["model"] == "clean", scored=len(scored),
                      needs=needs, stale=cell["stale"])
        if stage.clean:
            last_clean[cell["task"]] = stage.key
        (cleans if cell["model"] == "clean" else finetunes).append(stage)
    return cleans + finetunes  # in the order their fine-tunes were counted above


def _clean_studies(cell: dict) -> list[pathlib.Path]:
    """The other clean-<words> studies of a clean cell's task (they share its fine-tunes)."""
    return [d for d in sorted(cell["study"].parent.glob("clean-*"))
            if d != cell["study"] and (d / "study.json").is_file()]


def _attack(args, name: str) -> None:
    from recipe_jax import attack

    sentences = attacker_data(args.workdir, name, args.bookcorpus)
    if sentences != args.bookcorpus:
        write_attacker2(sentences, args.bookcorpus)
    attack.run(attack_config(name, sentences), str(args.workdir / "attack" / name))


def _purify(args, defense: str, name: str, defender: pathlib.Path) -> None:
    from recipe_jax import purify

    run_dir = args.workdir / "purify" / f"{defense}-{name}"
    config = purify_config(defense, loaded(args.workdir, name), defender)
    t0 = time.time()
    purify.run(config, str(run_dir))
    _times(args.workdir, {f"purify/{defense}-{name}": round(time.time() - t0, 1)})


def _times(workdir: pathlib.Path, new: dict) -> dict:
    from recipe_jax import outputs

    path = workdir / "times.json"
    with open(workdir / ".times.lock", "w") as lock:  # --jobs: stages finish side by side
        fcntl.flock(lock, fcntl.LOCK_EX)
        times = json.loads(path.read_text()) if path.is_file() else {}
        times.update(new)
        outputs.write_atomic(path, json.dumps(times, indent=2))
    return times


def _finetune(args, cell: dict) -> None:
    argv = ["--workdir", str(cell["study"]), "--model", str(cell["model_dir"]),
            "--config", str(REPO / TASKS[cell["task"]]),
            "--seeds", ",".join(map(str, cell["seeds"]))]
    for item in eval_overrides(cell["family"]):
        argv += ["--set", item]
    if cell["model"] == "clean":
        for other in _clean_studies(cell):
            argv += ["--reuse", str(other)]
    seeds_module().main(argv)


def _names(value: str, allowed, flag: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"validation: error: {flag}={value!r}: choose from "
                         f"{', '.join(allowed)}")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path)
    p.add_argument("--models", default=",".join(n for n, m in MODELS.items()
                                                if m.role in ("validation", "reference")))
    p.add_argument("--defenses", default="guided,strong,bert,none",
                   help="none: the attacked model as it is (does the attack survive "
                        "fine-tuning?); also the variants of `guided`: "
                        + ", ".join(VARIANTS))
    p.add_argument("--tasks", default="sst2,agnews")
    p.add_argument("--all-tasks", action="store_true",
                   help="judge every model on every --tasks (default: AG News on por, badpre)")
    p.add_argument("--seeds", default="42,43,44",
                   help="fine-tuning seeds of the `guided` cells (comparison cells: the first)")
    p.add_argument("--bookcorpus", type=pathlib.Path, default=BOOKCORPUS,
                   help="BookCorpus sentences (sentence<TAB>label with a header row)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="which kinds of stage run (clean: the clean MiniLM's fine-tunes, "
                        "finetune: the others), e.g. attack,purify to build the models only")
    p.add_argument("--jobs", type=int, default=1,
                   help="stages run side by side, each in its own process (logs in "
                        "WORKDIR/logs); 2 on 2 CPU cores gains ~15%%, more on an accelerator")
    p.add_argument("--plan", action="store_true", help="print the stages and stop")
    p.add_argument("--table", action="store_true",
                   help="write the table from the finished runs and stop (runs nothing)")
    args = p.parse_args(argv)
    args.models = _names(args.models, MODELS, "--models")
    args.defenses = _names(args.defenses, (*DEFENSES, *VARIANTS), "--defenses")
    args.tasks = _names(args.tasks, TASKS, "--tasks")
    args.stages = _names(args.stages, STAGES, "--stages")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds={args.seeds!r}: use comma-separated integers, e.g. 42,43,44")
    if not args.seeds:
        p.error("--seeds: name at least one seed")
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs}: run at least one stage at a time")
    args.workdir = args.workdir.absolute()
    return args


def category(stage: Stage) -> str:
    """The --stages name of a stage: its kind, or "clean" for the clean MiniLM's fine-tunes."""
    return "clean" if stage.clean else stage.kind


def describe(stages: list[Stage]) -> str:
    lines, minutes = [], 0
    for s in stages:
        if s.kind == "finetune":
            cost = MINUTES["finetune"] * s.todo + MINUTES["score"] * s.scored
        elif s.kind == "attack":
            cost = MINUTES["attack"] * MODELS[s.name].steps // 250
        else:
            cost = MINUTES[s.name.split("-")[0]]
        state = "done" if s.done else f"todo (~{cost} min on 2 CPU cores)"
        if s.stale:
            state = f"STALE, made with other settings ({'; '.join(s.stale[:3])})"
        minutes += 0 if s.done else cost
        what = ""
        if s.kind == "finetune" and not s.done:
            what = f"{s.todo} fine-tune(s) left" + (f", {s.scored} seed(s) only scored"
                                                    if s.scored else "")
        lines.append(f"  {s.kind:8s} {s.name:32s} {state} {what}".rstrip())
    lines.append(f"left: {sum(not s.done for s in stages)} of {len(stages)} stages, "
                 f"~{minutes / 60:.1f} h on 2 CPU cores")
    return "\n".join(lines)


def run_stages(stages: list[Stage], selected, jobs: int, submit, finished) -> list[str]:
    """Runs the stages not done for which `selected(stage)` holds, at most `jobs` at a time,
    each once every stage it needs is done (finished before, or here). `submit(stage)` starts
    one and returns a concurrent.futures.Future; `finished(stage)` is called after each success.
    After a failure nothing new starts; the running ones finish. Returns the failures, as
    "KEY: why" lines (a stage whose needs cannot be met, not selected or failed, is one)."""
    done = {s.key for s in stages if s.done}
    todo = [s for s in stages if not s.done and selected(s)]
    planned = done | {s.key for s in todo}
    failures = [f"{s.key}: needs {', '.join(n for n in s.needs if n not in planned)}, which "
                "is neither done nor selected (--stages)" for s in todo
                if any(n not in planned for n in s.needs)]
    todo = [s for s in todo if all(n in planned for n in s.needs)]
    running: dict[concurrent.futures.Future, Stage] = {}
    while todo or running:
        while not failures and len(running) < jobs:
            ready = next((s for s in todo if all(n in done for n in s.needs)), None)
            if ready is None:
                break
            todo.remove(ready)
            running[submit(ready)] = ready
        if not running:
            break  # a failure stopped the rest
        finished_now, _ = concurrent.futures.wait(
            running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished_now:
            stage = running.pop(future)
            if future.exception() is not None:
                failures.append(f"{stage.key}: {type(future.exception()).__name__}: "
                                f"{future.exception()}")
                continue
            done.add(stage.key)
            finished(stage)
    failures += [f"{s.key}: not started (an earlier stage failed)" for s in todo
                 if failures]
    return failures


def _run_in_child(argv: list[str], key: str, log: str) -> None:
    """One stage of a --jobs run, in a fresh process; its output goes to `log`."""
    with open(log, "a", buffering=1) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        stages, _ = plan(parse_args(argv))
        stage = next(s for s in stages if s.key == key)
        try:
            stage.run()
        except BaseException:
            traceback.print_exc()  # the whole story in the log; the parent names the error
            raise
        finally:
            sys.stdout.flush()


def _run_parallel(args, argv: list[str], stages: list[Stage], cells: list[dict]) -> None:
    """--jobs N: independent stages side by side, each in a spawned process with its own log
    (WORKDIR/logs/<stage>.log); a failure stops new stages and exits non-zero."""
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=True)
    # several JAX processes on one accelerator: none may take most of its memory up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
    started = {}

    def submit(stage: Stage):
        log = logs / f"{stage.key.replace(':', '-').replace('/', '-')}.log"
        print(f"validation: start {stage.key} (log: {log})", flush=True)
        started[stage.key] = time.time()
        return pool.submit(_run_in_child, argv, stage.key, str(log))

    def finished(stage: Stage):
        print(f"validation: done {stage.key} in {time.time() - started[stage.key]:.0f} s",
              flush=True)
        if stage.kind == "finetune":
            write_table(cells, args.workdir)

    with pool:
        failures = run_stages(stages, lambda s: category(s) in args.stages, args.jobs, submit,
                              finished)
    if failures:
        raise SystemExit("validation: error: stages failed (their logs are in "
                         f"{logs}):\n  " + "\n  ".join(failures))


def refuse_stale(args, stages: list[Stage]) -> None:
    """A run whose preset changed since it finished is neither reused nor overwritten: say which,
    and how to rerun it (its dir moved aside: nothing is deleted)."""
    stale = [s for s in stages if s.stale and s.kind != "finetune"
             and category(s) in args.stages]
    if stale:
        raise SystemExit(
            "validation: error: these runs were made with other settings than the current "
            "presets, so their results would be reported under settings they did not use:\n  "
            + "\n  ".join(f"{s.kind} {s.name}: {'; '.join(s.stale)}" for s in stale)
            + f"\nTo rerun them, move their dirs aside (e.g. mv {stale[0].path.parent} "
            f"{stale[0].path.parent}.old, and likewise the fine-tunes under "
            f"{args.workdir / 'eval'} made from them), or leave them out of --models/--defenses")


def main(argv=None) -> str:
    args = parse_args(argv)
    stages, cells = plan(args)
    print(describe(stages), flush=True)
    if args.plan:
        return describe(stages)
    if args.table:
        text = write_table(cells, args.workdir)
        print(text, flush=True)
        return text
    refuse_stale(args, stages)
    if not args.bookcorpus.is_file() and not all(s.done for s in stages if s.kind == "attack"):
        raise FileNotFoundError(f"--bookcorpus {args.bookcorpus}: no such file; the attacks "
                                "train on its first sentences (../shared/data/bookcorpus)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if any(not s.done for s in stages if s.kind == "purify"):
        write_defender(args.workdir / "defender.tsv", args.bookcorpus)
    if args.jobs > 1:
        _run_parallel(args, list(sys.argv[1:] if argv is None else argv), stages, cells)
    for i, stage in enumerate(stages if args.jobs == 1 else []):
        if stage.done or category(stage) not in args.stages:
            continue
        print(f"\n=== validation: {i + 1}/{len(stages)}: {stage.kind} {stage.name} ===",
              flush=True)
        stage.run()
        if stage.kind == "finetune":
            write_table(cells, args.workdir)
    text = write_table(cells, args.workdir)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
