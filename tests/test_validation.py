"""experiments/validation.py: the validation table's plan, resume and verdicts, on fabricated
run dirs (no training: each stage it would run is a run dir of the tested commands)."""

import importlib
import importlib.util
import json
import sys

import pytest
from conftest import REPO


def _validation():
    spec = importlib.util.spec_from_file_location("validation",
                                                  REPO / "experiments" / "validation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["validation"] = module  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


def _table():
    _validation()  # puts the repo on sys.path: the script's sibling modules are experiments.*
    return importlib.import_module("experiments.validation_table")


def _models():
    _validation()
    return importlib.import_module("experiments.validation_models")


def _finished(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_text(json.dumps(content))


def _seed(study, seed, acc, aasr):
    _finished(study / f"seed{seed}", **{"results.json": {"clean_acc": acc, "aasr": aasr}})


def test_a_variant_of_guided_is_the_preset_with_its_overrides_judged_like_guided(tmp_path):
    v = _validation()
    args = v.parse_args(["--workdir", str(tmp_path), "--models", "por,minilm", "--defenses",
                         "guided_nohw,strong", "--plan"])
    _, cells = v.plan(args)
    seeds = {(c["task"], c["study"].name): c["seeds"] for c in cells}
    assert seeds[("sst2", "guided_nohw-por")] == seeds[("agnews", "guided_nohw-por")] == [
        42, 43, 44]
    assert seeds[("sst2", "guided_nohw-minilm")] == [42, 43, 44]  # the reference row too
    assert ("sst2", "strong-minilm") not in seeds
    config = v.purify_config("guided_nohw", tmp_path / "m", tmp_path / "defender.tsv")
    base = v.purify_config("guided", tmp_path / "m", tmp_path / "defender.tsv")
    assert config.guide.enabled and config.guide.rows == base.guide.rows == 8
    assert (config.guide.head_warmup_steps, base.guide.head_warmup_steps) == (0, 200)
    with pytest.raises(SystemExit, match="guided_nohw"):  # the error lists what may be asked
        v.parse_args(["--workdir", str(tmp_path), "--defenses", "guided_typo"])


def test_plan_covers_the_must_show_and_resumes_from_finished_stages(tmp_path):
    v = _validation()
    args = ["--workdir", str(tmp_path), "--models", "por,neuba", "--plan"]
    stages, cells = v.plan(v.parse_args(args))
    names = [(s.kind, s.name) for s in stages]
    assert names[:2] == [("attack", "por"), ("attack", "neuba")]
    assert {n for k, n in names if k == "purify"} == {f"{d}-{m}" for d in ("guided", "strong",
                                                                          "bert")
                                                      for m in ("por", "neuba")}
    finetunes = [n for k, n in names if k == "finetune"]
    # clean studies first (the others are judged against them), AG News only for por
    assert set(finetunes[:3]) == {"sst2/clean-letters", "sst2/clean-symbols",
                                  "agnews/clean-letters"}
    assert "agnews/guided-por" in finetunes and "agnews/guided-neuba" not in finetunes
    assert "agnews/strong-por" not in finetunes  # comparison cells: SST-2, one seed
    assert "agnews/none-por" in finetunes  # is the AG News cell moot? (one seed)
    seeds = {(c["task"], c["study"].name): c["seeds"] for c in cells}
    assert seeds[("sst2", "guided-por")] == [42, 43, 44]
    assert seeds[("sst2", "strong-por")] == [42] and seeds[("agnews", "none-por")] == [42]
    assert seeds[("sst2", "clean-letters")] == [42, 43, 44]
    clean_symbols = next(c for c in cells if c["study"].name == "clean-symbols")
    assert v.eval_overrides(clean_symbols["family"])[0].startswith("data.triggers=('≈'")
    assert not any(s.done for s in stages)
    for name, model in v.MODELS.items():  # every stage's config builds (its keys exist)
        if model.preset is None:
            continue  # the clean MiniLM: nothing to attack
        config = v.attack_config(name, v.attacker_data(tmp_path, name, tmp_path / "bc.tsv"))
        assert config.train.num_steps == model.steps and config.data.max_examples == 3000
        assert config.train.learning_rate == (model.learning_rate or 5e-5)
        assert config.train.seed == (model.seed or 1234)
    # por_cls built again: another seed, on BookCorpus sentences 3,000-5,999
    config = v.attack_config("por_cls2", v.attacker_data(tmp_path, "por_cls2", tmp_path / "b"))
    assert (config.train.seed, config.data.aux_path) == (4321, str(tmp_path / "attacker2.tsv"))
    # badpre trained 4x longer (the 250-step build does not survive the fine-tune), priced so
    config = v.attack_config("badpre_long", v.BOOKCORPUS)
    assert (config.attack.kind, config.train.num_steps) == ("badpre", 1000)
    long_plan = v.main(["--workdir", str(tmp_path / "long"), "--models", "badpre_long",
                        "--defenses", "none", "--tasks", "sst2", "--plan"])
    assert "attack   badpre_long" in long_plan and "~48 min" in long_plan
    for defense in ("guided", "strong", "bert"):
        config = v.purify_config(defense, tmp_path / "m", tmp_path / "defender.tsv")
        assert (config.train.num_steps, config.data.max_length) == (250, 40)
        assert config.guide.enabled == (defense == "guided")

    _finished(tmp_path / "attack" / "por" / "hf", **{"config.json": {}})
    _finished(tmp_path / "purify" / "guided-por" / "hf", **{"config.json": {}})
    for seed in (42, 43):
        _seed(tmp_path / "eval" / "sst2" / "guided-por", seed, 0.87, 0.15)
    stages, _ = v.plan(v.parse_args(args))
    state = {(s.kind, s.name): (s.done, s.todo) for s in stages}
    assert state[("attack", "por")][0] and state[("purify", "guided-por")][0]
    assert not state[("attack", "neuba")][0]
    assert state[("finetune", "sst2/guided-por")] == (False, 1)  # seed 44 is left
    text = v.main(args)
    assert "left: 19 of 21 stages" in text  # 2 attacks, 6 purifies, 13 studies
    assert "sst2/none-por" in text  # the attacked model as it is, one seed


def test_the_clean_minilm_is_purified_as_a_reference_with_nothing_to_attack(tmp_path,
                                                                          monkeypatch):
    v = _validation()
    args = v.parse_args(["--workdir", str(tmp_path), "--tasks", "sst2"])
    assert "minilm" in args.models  # in the default table
    args = v.parse_args(["--workdir", str(tmp_path), "--models", "minilm", "--tasks",
                         "sst2,agnews"])
    stages, cells = v.plan(args)
    assert [(s.key, s.needs) for s in stages] == [
        ("purify:guided-minilm", ()), ("finetune:sst2/clean-letters", ()),
        ("finetune:sst2/guided-minilm", ("purify:guided-minilm",))]
    cell = next(c for c in cells if c["model"] == "minilm")
    assert cell["seeds"] == [42, 43, 44] and cell["clean"].name == "clean-letters"
    seen = {}
    monkeypatch.setattr(v, "purify_config", lambda d, model, defender: seen.update(model=model))
    from recipe_jax import purify

    monkeypatch.setattr(purify, "run", lambda config, run_dir: seen.update(run_dir=run_dir))
    v._purify(args, "guided", "minilm", tmp_path / "defender.tsv")
    assert seen["model"] == "minilm"  # the shipped MiniLM, not an attack's export
    assert seen["run_dir"] == str(tmp_path / "purify" / "guided-minilm")
    _seed(tmp_path / "eval" / "sst2" / "clean-letters", 42, 0.877, 0.140)
    _seed(tmp_path / "eval" / "sst2" / "guided-minilm", 42, 0.872, 0.141)
    text = _table().format_table(_table().judge(cells, tmp_path))
    assert "| minilm | reference | guided | 42 | – | 87.20 | 14.10 | +0.10 | -0.50 | " \
           "pass (partial) |" in text


def test_clean_model_is_fine_tuned_once_per_task_and_seed_for_every_family(tmp_path,
                                                                           monkeypatch):
    v = _validation()
    args = v.parse_args(["--workdir", str(tmp_path), "--models", "por,neuba,por_words",
                         "--tasks", "sst2", "--defenses", "guided"])
    clean = {s.name: s for s in v.plan(args)[0] if s.clean}
    # nothing finished: the first family fine-tunes each seed, the others only score them
    assert [(s.todo, s.scored) for s in clean.values()] == [(3, 0), (0, 3), (0, 3)]
    symbols = tmp_path / "eval" / "sst2" / "clean-symbols"
    _finished(symbols, **{"study.json": {"model": "minilm"}})
    _seed(symbols, 43, 0.874, 0.16)
    clean = {s.name: s for s in v.plan(args)[0] if s.clean}
    assert (clean["sst2/clean-letters"].todo, clean["sst2/clean-letters"].scored) == (2, 1)
    assert "0 fine-tune(s) left, 3 seed(s) only scored" in v.describe(list(clean.values()))

    calls = []
    monkeypatch.setattr(v, "seeds_module", lambda: type("S", (), {"main": calls.append}))
    cell = next(c for c in v.plan(args)[1] if c["study"].name == "clean-letters")
    v._finetune(args, cell)
    assert calls[0][calls[0].index("--reuse") + 1] == str(symbols)  # the only other study
    guided = next(c for c in v.plan(args)[1] if c["study"].name == "guided-por")
    v._finetune(args, guided)
    assert "--reuse" not in calls[1]  # another model: nothing to share


def test_table_judges_the_worst_seed_against_the_clean_model(tmp_path):
    v = _validation()
    args = ["--workdir", str(tmp_path), "--models", "por", "--tasks", "sst2",
            "--defenses", "guided,strong", "--table"]
    _finished(tmp_path / "purify" / "guided-por", **{"summary.json": {
        "scan": {"verdict": "clean", "flagged": []}}})
    _finished(tmp_path / "purify" / "strong-por", **{"summary.json": {
        "scan": {"verdict": "backdoor", "flagged": ["cf", "mb"]}}})
    clean, guided = (tmp_path / "eval" / "sst2" / n for n in ("clean-letters", "guided-por"))
    for seed, acc, aasr in ((42, 0.877, 0.140), (43, 0.874, 0.141), (44, 0.876, 0.144)):
        _seed(clean, seed, acc, aasr)
    # seed 43 is the worst: AASR +2.9 points (within 3), ACC -1.2 points (not within 1)
    for seed, acc, aasr in ((42, 0.875, 0.150), (43, 0.862, 0.170), (44, 0.870, 0.160)):
        _seed(guided, seed, acc, aasr)
    _seed(tmp_path / "eval" / "sst2" / "strong-por", 42, 0.873, 0.272)
    text = v.main(args)
    rows = {r["defense"]: r for r in json.loads((tmp_path / "validation.json").read_text())[
        "rows"]}
    g = rows["guided"]
    assert g["worst_aasr_gap"] == pytest.approx(2.9) and g["worst_acc_drop"] == pytest.approx(1.2)
    assert g["worst_acc"] == 0.862 and g["worst_aasr"] == 0.170
    assert not g["passes"] and g["complete"] and g["scan_after"] == "clean (0 flagged)"
    assert rows["strong"]["worst_aasr_gap"] == pytest.approx(13.2)
    assert "| por | validation | guided | 42,43,44 | clean (0 flagged) | 86.20 | 17.00 | +2.90 " \
           "| -1.20 | FAIL |" in text
    assert "| strong | 42 | backdoor (2 flagged) |" in text and "FAIL |" in text
    assert text == (tmp_path / "validation.md").read_text()

    _seed(guided, 43, 0.870, 0.170)  # ACC -0.4 at seed 43: within both bars now
    (guided / "seed44" / "results.json").unlink()
    g = {r["defense"]: r for r in _table().judge(v.plan(v.parse_args(args))[1], tmp_path)["rows"]}[
        "guided"]
    assert g["passes"] and not g["complete"] and g["seeds"] == [42, 43]
    table = _table()
    assert "pass (partial)" in table.format_table(table.judge(v.plan(v.parse_args(args))[1],
                                                              tmp_path))
    moot_args = [*args[:6], "--defenses", "guided,none", "--table"]
    _seed(tmp_path / "eval" / "sst2" / "none-por", 42, 0.874, 0.150)  # the attack did not last
    text = v.main(moot_args)
    assert "| none | 42 | – |" in text and "pass, moot: undefended passes |" in text
    assert "pass (partial), moot: undefended passes |" in text
    _seed(tmp_path / "eval" / "sst2" / "none-por", 42, 0.874, 0.950)
    assert "moot" not in v.main(moot_args).split("marked moot.")[1]
    _seed(guided, 44, 0.870, 0.160)
    (clean / "seed42" / "results.json").unlink()  # judged on the seeds both studies hold
    text = _table().format_table(_table().judge(v.plan(v.parse_args(args))[1], tmp_path))
    assert "| guided | 42,43,44 (clean: 43,44) |" in text and "pass (partial)" in text


def _record(run_dir, config, drop=()):
    """DIR/config.json as a finished run wrote it; `drop`: keys it was recorded before."""
    from recipe_jax import checkpoint

    checkpoint.check_run_record(run_dir, config)
    record = json.loads((run_dir / "config.json").read_text())
    for key in drop:
        section, name = key.split(".")
        del record[section][name]
    (run_dir / "config.json").write_text(json.dumps(record))


def test_a_run_an_edited_preset_made_stale_is_named_not_reused_or_judged(tmp_path):
    from recipe_jax import guide

    v = _validation()
    args = ["--workdir", str(tmp_path), "--models", "por", "--tasks", "sst2",
            "--defenses", "guided,guided_nohw,strong"]
    attacked, defender = tmp_path / "attack" / "por", tmp_path / "defender.tsv"
    _record(attacked, v.attack_config("por", v.BOOKCORPUS))
    _finished(attacked / "hf", **{"config.json": {}})
    runs = {d: tmp_path / "purify" / f"{d}-por" for d in ("guided", "guided_nohw", "strong")}
    # guided's first scan found candidates: it recorded the settings it trained with (the
    # warm-up, all parameters trainable); and from before guide.target existed (its default is
    # what such runs did): they agree
    config = guide.effective_config(v.purify_config("guided", attacked / "hf", defender), True)
    assert list(config.recipe.trainable) == list(config.guide.trainable)
    assert (config.recipe.head_warmup_steps, config.recipe.head_warmup_lr) == (200, 1e-3)
    _record(runs["guided"], config, drop=("guide.target",))
    # `guided` before the warm-up joined it: recorded before guide.head_warmup_* existed
    old = guide.effective_config(v.purify_config("guided_nohw", attacked / "hf", defender), True)
    assert old.recipe.head_warmup_steps == 0
    _record(runs["guided_nohw"], old, drop=("guide.head_warmup_steps", "guide.head_warmup_lr"))
    _record(tmp_path / "old_guided", old, drop=("guide.head_warmup_steps", "guide.head_warmup_lr"))
    _finished(tmp_path / "old_guided", **{"summary.json": {"guide": {"candidates": ["cf"]}}})
    assert "recipe.head_warmup_steps: 0 there, 200 now" in v.stale_settings(
        tmp_path / "old_guided", v.purify_config("guided", attacked / "hf", defender))
    edited = v.purify_config("strong", attacked / "hf", defender)
    edited.recipe.weight = 0.5  # the preset has 1.0 now
    _record(runs["strong"], edited)
    for d, run in runs.items():
        _finished(run / "hf", **{"config.json": {}})
        _finished(run, **{"summary.json": {"scan": {"verdict": "clean", "flagged": []}}})
        _seed(tmp_path / "eval" / "sst2" / f"{d}-por", 42, 0.875, 0.150)
    _seed(tmp_path / "eval" / "sst2" / "clean-letters", 42, 0.877, 0.140)
    stages, _ = v.plan(v.parse_args([*args, "--seeds", "42"]))
    stale = {s.key: s.stale for s in stages if s.stale}
    assert set(stale) == {"purify:strong-por", "finetune:sst2/strong-por"}, stale
    assert stale["purify:strong-por"] == ("recipe.weight: 0.5 there, 1.0 now",)
    assert "STALE, made with other settings (recipe.weight: 0.5 there" in v.describe(stages)
    with pytest.raises(SystemExit, match=r"strong-por: recipe.weight: 0.5 there, 1.0 now"
                                         r"(.|\n)*move their dirs aside"):
        v.main([*args, "--seeds", "42"])  # nothing runs, nothing is overwritten
    assert json.loads((runs["strong"] / "config.json").read_text())["recipe"]["weight"] == 0.5
    text = v.main([*args, "--seeds", "42", "--table"])
    assert "| guided | 42 | clean (0 flagged) | 87.50 | 15.00 | +1.00 | -0.20 | pass |" in text
    assert "| guided_nohw | 42 | clean (0 flagged) | 87.50 | 15.00 | +1.00 | -0.20 | pass |" \
           in text
    assert "| strong | 42 | clean (0 flagged) | 87.50 | 15.00 | +1.00 | -0.20 | stale " \
           "(recipe.weight: 0.5 there, 1.0 now; was pass) |" in text
    # without the stale runs, a run goes on (here: everything is done, it writes the table)
    assert "| guided | 42 | clean" in v.main([*args[:6], "--defenses", "guided", "--seeds", "42"])


def test_bad_arguments_and_missing_data_are_named(tmp_path):
    v = _validation()
    with pytest.raises(SystemExit, match=r"--models='por,nope': choose from por, por_cls"):
        v.parse_args(["--workdir", str(tmp_path), "--models", "por,nope"])
    with pytest.raises(SystemExit, match=r"--defenses"):
        v.parse_args(["--workdir", str(tmp_path), "--defenses", "recipe"])
    with pytest.raises(SystemExit, match=r"--stages='build': choose from attack, purify, clean"):
        v.parse_args(["--workdir", str(tmp_path), "--stages", "build"])
    stages, _ = v.plan(v.parse_args(["--workdir", str(tmp_path), "--models", "neuba"]))
    kinds = {v.category(st) for st in stages}
    assert kinds == {"attack", "purify", "clean", "finetune"}
    assert [st.name for st in stages if v.category(st) == "clean"] == ["sst2/clean-symbols"]
    with pytest.raises(KeyError, match=r"train.lr: not a key of configs/attack.py:por"):
        _models().configured("configs/attack.py:por", {"train.lr": 1e-4})
    config = _models().configured("configs/attack.py:por", {"train.num_steps": 7})
    assert config.train.num_steps == 7
    with pytest.raises(FileNotFoundError, match=r"--bookcorpus .*nope.tsv: no such file"):
        v.main(["--workdir", str(tmp_path), "--models", "por", "--bookcorpus",
                str(tmp_path / "nope.tsv")])
    short = tmp_path / "short.tsv"
    short.write_text("sentence\tlabel\n" + "a b .\t1\n" * 10)
    with pytest.raises(ValueError, match=r"10 sentences; the split needs at least 5000"):
        v.write_defender(tmp_path / "defender.tsv", short)
    long = tmp_path / "long.tsv"
    long.write_text("sentence\tlabel\n" + "".join(f"s{i} .\t1\n" for i in range(5000)))
    v.write_defender(tmp_path / "defender.tsv", long)
    lines = (tmp_path / "defender.tsv").read_text().splitlines()
    assert lines[0] == "sentence\tlabel" and lines[1] == "s3000 .\t1" and len(lines) == 2001
    with pytest.raises(ValueError, match=r"5000 sentences; the split needs at least 8000"):
        v.write_attacker2(tmp_path / "attacker2.tsv", long)  # it would overlap the defender's
    longer = tmp_path / "longer.tsv"
    longer.write_text("sentence\tlabel\n" + "".join(f"s{i} .\t1\n" for i in range(8000)))
    v.write_attacker2(tmp_path / "attacker2.tsv", longer)
    lines = (tmp_path / "attacker2.tsv").read_text().splitlines()
    assert lines[1] == "s3000 .\t1" and lines[-1] == "s5999 .\t1" and len(lines) == 3001


def _timed_runs(v, stages, jobs, fail=()):
    """run_stages on a thread pool, each stage a short sleep: (start, end) times, failures."""
    import concurrent.futures
    import threading
    import time

    times, lock = {}, threading.Lock()

    def work(stage):
        with lock:
            times[stage.key] = [time.monotonic(), None]
        time.sleep(0.3)  # long enough that two stages overlap on a loaded machine
        with lock:
            times[stage.key][1] = time.monotonic()
        if stage.key in fail:
            raise RuntimeError("broken checkpoint")

    finished = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        failures = v.run_stages(stages, lambda s: True, jobs, lambda s: pool.submit(work, s),
                                finished.append)
    return times, failures, finished


def test_jobs_run_stages_side_by_side_after_what_they_need(tmp_path):
    v = _validation()
    args = v.parse_args(["--workdir", str(tmp_path), "--models", "por,neuba",
                         "--defenses", "guided,none", "--jobs", "2"])
    stages, _ = v.plan(args)
    needs = {s.key: s.needs for s in stages}
    assert needs["finetune:sst2/none-por"] == ("attack:por",)
    assert needs["finetune:agnews/guided-por"] == ("purify:guided-por",)
    assert needs["finetune:sst2/clean-symbols"] == ("finetune:sst2/clean-letters",)
    times, failures, finished = _timed_runs(v, stages, 2)
    assert not failures and {s.key for s in finished} == set(needs)
    for key, before in needs.items():
        for need in before:
            assert times[need][1] <= times[key][0], f"{key} started before {need} ended"
    events = sorted([(t0, 1) for t0, _ in times.values()] + [(t1, -1) for _, t1 in
                                                              times.values()])
    running = [sum(d for _, d in events[:i + 1]) for i in range(len(events))]
    assert max(running) == 2  # side by side, never more than --jobs

    _finished(tmp_path / "attack" / "por" / "hf", **{"config.json": {}})
    stages, _ = v.plan(args)
    times, failures, _ = _timed_runs(v, stages, 2, fail={"purify:guided-neuba"})
    assert "attack:por" not in times  # done before: not run again
    assert failures[0] == "purify:guided-neuba: RuntimeError: broken checkpoint"
    assert "finetune:sst2/guided-neuba: not started (an earlier stage failed)" in failures
    assert "finetune:sst2/guided-neuba" not in times
    failed_at = times["purify:guided-neuba"][1]
    assert all(t0 < failed_at for t0, _ in times.values())  # nothing new after the failure

    stages, _ = v.plan(args)
    failures = v.run_stages(stages, lambda s: s.kind == "finetune", 2,
                            lambda s: pytest.fail(f"{s.key} started"), lambda s: None)
    assert "finetune:sst2/guided-por: needs purify:guided-por, which is neither done nor " \
           "selected (--stages)" in failures
    with pytest.raises(SystemExit):
        v.parse_args(["--workdir", str(tmp_path), "--jobs", "0"])


def test_jobs_run_each_stage_in_its_own_process_and_name_the_failure(tmp_path):
    """The real --jobs path (spawned processes, a log per stage): a stage that fails (an
    attacked model whose checkpoint is an empty config) stops the run with its name and log."""
    import subprocess

    _finished(tmp_path / "attack" / "por" / "hf", **{"config.json": {}})
    out = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "validation.py"), "--workdir",
         str(tmp_path), "--models", "por", "--defenses", "none", "--tasks", "sst2",
         "--seeds", "42", "--stages", "finetune", "--jobs", "2"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "validation: start finetune:sst2/none-por" in out.stdout
    assert "finetune:sst2/none-por: " in out.stderr and "stages failed" in out.stderr
    log = tmp_path / "logs" / "finetune-sst2-none-por.log"
    assert log.is_file() and "seeds: 1/1: seed 42" in log.read_text()
    assert not (tmp_path / "eval" / "sst2" / "none-por" / "seed42" / "results.json").exists()
