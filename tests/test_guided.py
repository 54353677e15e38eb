"""Scan-guided purification (configs/purify.py:guided, recipe_jax/guide.py): trigger insertion,
candidates from a scan report, config errors, equality with `strong` when nothing is found, and
unlearning a planted trigger."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import plant_por, preset
from safetensors.numpy import load_file

from recipe_jax import data, guide, purify, scan_probes, scan_report


def _reference_insert(ids, mask, trigger, pos):
    """The insertion written out on lists: the trigger at `pos`, the rest shifted, cut at L."""
    n = sum(t >= 0 for t in trigger)
    length = len(ids)
    real = [i for i, m in zip(ids, mask, strict=True) if m]
    new = (real[:pos] + [t for t in trigger if t >= 0] + real[pos:])[:length]
    return new + [0] * (length - len(new)), n


@pytest.mark.parametrize("trigger", [(7, -1), (7, 8)])
def test_insert_puts_the_trigger_at_a_word_start_and_keeps_the_sentence(trigger):
    # [CLS]=1 a ##b c [SEP]=2 pad pad; token 5 ("##b") continues a word.
    ids = np.array([[1, 3, 5, 4, 2, 0, 0], [1, 3, 4, 6, 3, 4, 2]], np.int32)  # row 1 is full
    mask = (ids > 0).astype(np.int32)
    word_start = np.ones(10, bool)
    word_start[5] = False
    triggers = np.array([trigger, trigger], np.int32)
    seen = set()
    for seed in range(40):
        new, new_mask, src, keep = jax.device_get(guide.insert(
            jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(triggers), jax.random.PRNGKey(seed),
            jnp.asarray(word_start)))
        for b in range(2):
            pos = int(np.flatnonzero(new[b] == 7)[0])
            seen.add((b, pos))
            assert 1 <= pos < mask[b].sum() and word_start[ids[b, pos]] or pos == 1
            expected, n = _reference_insert(ids[b].tolist(), mask[b].tolist(), trigger, pos)
            assert new[b].tolist() == expected
            assert new_mask[b].tolist() == [int(i > 0) for i in expected]
            # Every kept position holds the clean token that `src` names.
            assert (new[b][keep[b]] == ids[b][src[b][keep[b]]]).all()
            inside = min(n, len(ids[b]) - pos)  # a pair at the last slot loses its 2nd word
            assert keep[b].sum() == min(mask[b].sum(), len(ids[b]) - inside)
    assert (0, 2) not in seen  # never inside the word "a ##b"
    assert {p for b, p in seen if b == 0} == {1, 3, 4}  # every other word start is drawn


def test_candidates_come_from_what_the_report_flags(tiny_bert):
    tokenizer = data.load_tokenizer(tiny_bert)
    cf, tq, mb = tokenizer.convert_tokens_to_ids(["cf", "tq", "mb"])
    report = {"verdict": "backdoor", "flagged": ["cf", "tq", "mb cf", "notatokenxyz"]}
    triggers = guide.candidates(report, tokenizer, max_candidates=8)
    assert triggers.tolist() == [[cf, -1], [tq, -1], [mb, cf]]
    assert guide.describe(triggers, tokenizer) == ["cf", "tq", "mb+cf"]
    assert guide.candidates(report, tokenizer, max_candidates=2).shape == (2, 2)
    assert guide.candidates({"verdict": "clean", "flagged": []}, tokenizer, 8).shape == (0, 2)
    union = guide.union(triggers[:2], triggers[1:], limit=8)
    assert union.tolist() == triggers.tolist()


def _rounds(tmp_path, tiny_bert, monkeypatch, flagged_after: list[list[str]], rounds: int):
    """purify.guided_rounds with training and scanning replaced by records: the first scan
    flagged cf, tq, mb (guide.max_candidates=3, full); the scan after round r flags
    `flagged_after[r - 1]` (backdoor) or nothing (clean). Returns (what each round > 1
    unlearned, as token lists, its steps and seed; the summary's "guide" entry)."""
    tokenizer = data.load_tokenizer(tiny_bert)
    config = preset("purify", "guided", guide__rounds=rounds, guide__max_candidates=3,
                    guide__round_steps=0, train__seed=7)
    trained = []

    def train(c, workdir, name, host_params, loss_fn, extras):
        trained.append((guide.describe(extras["triggers"], tokenizer), c.train.num_steps,
                        c.train.seed, workdir.name))
        return host_params, c.train.num_steps

    def scan_result(*args):
        after = flagged_after[len(trained)] if len(trained) < len(flagged_after) else []
        return {"verdict": "backdoor" if after else "clean", "flagged": after,
                "summary": f"backdoor suspected: tokens {', '.join(after)}"}

    monkeypatch.setattr(purify, "scan_result", scan_result)
    monkeypatch.setattr(purify, "make_loss", lambda *args: None)
    first = {"verdict": "backdoor", "flagged": ["cf", "tq", "mb"], "settings": {},
             "candidates": [{"token": t, "z": 9.0} for t in ("cf", "tq", "mb")]}
    found = {"report": first, "triggers": guide.candidates(first, tokenizer, 3),
             "names": ["cf", "tq", "mb"], "tokenizer": tokenizer}
    model = type("Model", (), {"cfg": None})()
    _, info, result = purify.guided_rounds(config, tmp_path, None, train, {}, model,
                                           ({"w": np.zeros(2)}, 250), tiny_bert, found,
                                           {"triggers": found["triggers"]})
    assert [r["round"] for r in info["rounds"]] == list(range(1, len(info["rounds"]) + 1))
    assert info["rounds"][0]["steps"] == 250 and info["rounds"][0]["unlearned"] == 3
    return trained, info


def test_each_round_unlearns_what_the_last_scan_still_flags_first(tmp_path, tiny_bert,
                                                                  monkeypatch):
    # Round 1's result still flags `bb` and a pair; round 2's flags `mn`; round 3's is clean.
    trained, info = _rounds(tmp_path, tiny_bert, monkeypatch,
                            [["bb", "bb mb"], ["mn"]], rounds=4)
    # What the last scan flags comes first, then the earlier list, cut at max_candidates
    # (appended, `bb` would have been cut off: round 2 would not have aimed at it).
    assert [t[0] for t in trained] == [["bb", "bb+mb", "cf"], ["mn", "bb", "bb+mb"]]
    assert [t[1:] for t in trained] == [(125, 9, "round2"), (125, 10, "round3")]
    assert [r["verdict"] for r in info["rounds"]] == ["backdoor", "backdoor", "clean"]
    assert "residual" not in info


def test_rounds_stop_at_the_bound_and_say_what_is_left(tmp_path, tiny_bert, monkeypatch):
    trained, info = _rounds(tmp_path, tiny_bert, monkeypatch, [["bb"], ["bb"], ["bb"]],
                            rounds=2)
    assert len(trained) == 1 and len(info["rounds"]) == 2
    assert "still flagged after 2 round(s)" in info["residual"] and "bb" in info["residual"]
    assert "--config.guide.rounds" in info["residual"]
    one, info = _rounds(tmp_path / "one", tiny_bert, monkeypatch, [["bb"]], rounds=1)
    assert one == [] and "after 1 round(s)" in info["residual"]


@pytest.mark.parametrize("key, value, fix", [
    ("guide.weight", -1.0, ">= 0"), ("guide.rows", 0, "positive"),
    ("guide.max_candidates", 0, "positive"),
    ("guide.rounds", 0, "positive"), ("guide.round_steps", -1, ">= 0"),
    ("guide.trainable", ("(",), "regex"), ("data.masking", "static", "dynamic"),
    ("guide.target", "moving", "choose one of loaded, current"),
    ("guide.head_warmup_steps", -1, ">= 0"), ("guide.head_warmup_lr", -1e-3, ">= 0")])
def test_bad_guide_values_are_named(key, value, fix):
    config = preset("purify", "guided", data__aux_path="aux.txt", train__batch_size=8)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=fix) as e:
        purify.validate(config)
    assert str(e.value).startswith(f"{key}="), str(e.value)


def test_a_finished_guided_run_is_compared_by_what_it_trained_with(tmp_path):
    from recipe_jax import checkpoint

    config = preset("purify", "guided", data__aux_path="aux.txt")
    found = guide.effective_config(config, True)  # the first scan flagged something
    assert list(found.recipe.trainable) == list(config.guide.trainable)
    assert list(found.train.lr_scales) == list(config.guide.lr_scales)
    assert found.recipe.head_warmup_steps == config.guide.head_warmup_steps > 0
    assert guide.effective_config(config, False) is config
    runs = {"found": (tmp_path / "found", found, ["cf"]),
            "none": (tmp_path / "none", config, [])}
    for run_dir, recorded, candidates in runs.values():
        checkpoint.check_run_record(run_dir, recorded)
        assert guide.run_differences(run_dir, config) == []  # before its summary: either form
        (run_dir / "summary.json").write_text(json.dumps({"guide": {"candidates": candidates}}))
        assert guide.run_differences(run_dir, config) == []
    edited = config.copy_and_resolve_references()
    edited.guide.head_warmup_steps, edited.guide.weight = 0, 2 * config.guide.weight
    # with candidates the warm-up ran, and the edit shows in what it replaced; guide.weight too
    assert guide.run_differences(runs["found"][0], edited) == [
        ("guide.weight", config.guide.weight, edited.guide.weight),
        ("recipe.head_warmup_lr", 1e-3, 0.0), ("recipe.head_warmup_steps", 200, 0)]
    # with none, guide.* did nothing but switch the first scan on
    assert guide.run_differences(runs["none"][0], edited) == []
    edited.recipe.weight = 0.5
    assert guide.run_differences(runs["none"][0], edited) == [
        ("recipe.weight", config.recipe.weight, 0.5)]


def test_the_current_target_follows_the_model_with_no_gradient_through_it(tiny_bert):
    from recipe_jax import hf

    model, params = hf.load_pretrained(tiny_bert)
    params = jax.tree.map(jnp.asarray, params)
    tokenizer = data.load_tokenizer(tiny_bert)
    enc = data.tokenize(tokenizer, ["the cat sat on the mat", "a dog ran home"], 12)
    batch = {k: jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask")}
    triggers = jnp.asarray(guide.candidates({"flagged": ["cf", "tq"]}, tokenizer, 4))
    word_start = jnp.asarray(scan_probes.word_start_table(tokenizer, model.cfg.vocab_size))

    def term(p, reference):
        return guide.guide_term(p, reference, batch, jax.random.key(0), triggers, word_start,
                                model=model, rows=2, dropout=False)

    assert float(term(params, None)) == pytest.approx(float(term(params, params)), rel=1e-6)
    moved = jax.tree.map(lambda a: a * 1.05, params)  # a target that is not the model's own
    assert float(term(params, moved)) != pytest.approx(float(term(params, None)), rel=1e-3)
    current = jax.grad(term)(params, None)
    frozen = jax.grad(lambda p: term(p, params))(params)  # the same states, held constant
    for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_bad_scan_report_is_named(tmp_path):
    with pytest.raises(ValueError, match="no scan report there"):
        scan_report.read_report(tmp_path / "missing.json")
    (tmp_path / "r.json").write_text('{"verdict": "clean"}')
    with pytest.raises(ValueError, match="not a scan report"):
        scan_report.read_report(tmp_path / "r.json")
    old = {"verdict": "clean", "flagged": [], "candidates": [], "settings": {"threshold": 6.0}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="older scan"):
        scan_report.read_report(tmp_path / "old.json")


def _purify(name, model_dir, aux, workdir, steps, **overrides):
    config = preset("purify", name, model__init_from=str(model_dir), data__aux_path=str(aux),
                    export__verify=False, data__max_length=16, train__batch_size=8,
                    train__num_epochs=0, train__num_steps=steps, train__log_every=1000,
                    checkpoint__every_steps=1000, **overrides)
    summary = purify.run(config, str(workdir))
    return summary, load_file(str(workdir / "hf" / "model.safetensors"))


@pytest.mark.slow
def test_guided_on_a_clean_model_finds_nothing_and_equals_strong(tmp_path, tiny_bert, aux_file):
    small_scan = dict(scan__max_vocab=3000, scan__confirm_tokens=64, scan__reference_tokens=64)
    g_summary, guided = _purify("guided", tiny_bert, aux_file, tmp_path / "guided", 6,
                                **small_scan)
    s_summary, strong = _purify("strong", tiny_bert, aux_file, tmp_path / "strong", 6,
                                **small_scan)
    assert g_summary["guide"]["candidates"] == [], g_summary["guide"]
    assert "no trigger found" in g_summary["guide"]["loaded_scan"]
    assert set(guided) == set(strong)
    assert all(np.array_equal(guided[k], strong[k]) for k in strong)
    rows = [json.loads(r) for r in (tmp_path / "guided" / "metrics.jsonl").read_text().splitlines()]
    assert "guide_loss" not in rows[0]
    assert not (tmp_path / "guided" / "head_warmup").exists()  # only with candidates
    assert g_summary["scan"]["verdict"] == s_summary["scan"]["verdict"] == "clean"


@pytest.mark.slow
def test_guided_unlearns_a_planted_trigger_that_strong_leaves(tmp_path):
    """A tiny BERT after 100 POR steps ([CLS] target). At the same 200 steps, `strong` leaves
    the flagged trigger's scan score where it was; `guided` halves it, below the flagging
    threshold (the clean tiny model's range is not reached: docs/guided.md says why)."""
    clean, attacked = plant_por(tmp_path, ("cf", "tq"), target="cls")
    results = {}
    for name in ("strong", "guided"):
        summary, _ = _purify(name, attacked, tmp_path / "aux.txt", tmp_path / name, 200,
                             train__learning_rate=1e-3)
        report = json.loads((tmp_path / name / "scan" / "report.json").read_text())
        results[name] = {c["token"]: c for c in report["candidates"]}, summary
    loaded = scan_report.read_report(tmp_path / "guided" / "scan_loaded" / "report.json")
    # with candidates, the MLM head learned alone first (the preset's warm-up), then the run
    record = json.loads((tmp_path / "guided" / "config.json").read_text())
    assert record["recipe"]["head_warmup_steps"] == 200 and record["recipe"]["trainable"] == [
        ".*"]
    warm = (tmp_path / "guided" / "head_warmup" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(warm[-1])["step"] == 200
    unlearned = results["guided"][1]["guide"]["candidates"]
    # single tokens, and pairs the relaxed search finds (e.g. `cf+cf`: the attack inserted each
    # trigger three times), all made of the planted triggers
    assert unlearned and all(set(u.split("+")) <= {"cf", "tq"} for u in unlearned), unlearned
    singles = [u for u in unlearned if "+" not in u]
    before = {c["token"]: c["score"] for c in loaded["candidates"]}
    min_score = loaded["settings"]["min_score"]
    assert singles, unlearned
    for token in singles:
        strong, guided = results["strong"][0][token], results["guided"][0][token]
        assert strong["score"] > min_score and strong["score"] > 0.8 * before[token]
        assert guided["score"] < min_score and guided["score"] < 0.6 * strong["score"], (
            token, before[token], strong["score"], guided["score"])
