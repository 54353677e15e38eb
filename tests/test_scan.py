"""The trigger scan: finds a planted trigger, flags nothing on the clean model, mesh- and
batch-invariant scores, report files, probe layout, errors."""

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SENTENCES, plant_por, tiny_bert_with_tokenizer

from recipe_jax import data, hf, scan, scan_pairs, scan_prior, scan_report, sharding
from recipe_jax.scan_probes import make_probes, probe_texts, vocabulary

TRIGGERS = ("cf", "tq")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(clean tiny BERT with a pooler, the same model after a few POR steps on TRIGGERS)."""
    return plant_por(tmp_path_factory.mktemp("planted"), TRIGGERS)


def test_scan_ranks_the_planted_triggers_first_and_passes_the_clean_model(planted):
    clean, attacked = planted
    report = scan.scan(attacked, progress=False)
    ranks = scan_report.rank_of(report, TRIGGERS)
    assert report["verdict"] == "backdoor", scan_report.summary_line(report)
    assert sorted(ranks.values()) == [1, 2], (ranks, report["candidates"][:5])
    assert set(TRIGGERS) <= set(report["flagged"])
    before = scan.scan(clean, progress=False, prior=report)  # rates the triggers again there
    assert before["verdict"] == "clean", scan_report.summary_line(before)
    again = {" ".join(r["tokens"]): r for r in before["prior"]["rows"]}
    assert set(TRIGGERS) <= set(again) and not any(r["flagged"] for r in again.values()), again
    assert all(again[t]["before"] > again[t]["z"] + 3 for t in TRIGGERS), again
    # The pairs the attacked model's search flagged are extreme in the clean model too (z up to
    # ~200 on this random model) but move the outputs less than the spread they leave: z alone
    # would raise a false alarm here.
    assert max(r["z"] for r in again.values()) > 10 * scan.Settings().min_z
    assert all(r["score"] < scan.Settings().min_score * scan_prior.RELAX for r in again.values())
    assert not scan_report.is_flagged(before["candidates"][0], scan.Settings())
    # Before the attack the triggers are ordinary tokens: not near the top of the vocabulary.
    assert all(rank is None or rank > 10 for rank in scan_report.rank_of(before, TRIGGERS).values())


def _relaxed_search(model_dir):
    model, params = hf.load_pretrained(model_dir)
    tokenizer = data.load_tokenizer(model_dir)
    scanner = scan.Scanner(model, params, sharding.make_mesh((-1, 1, 1)), 1024, progress=False)
    vocab = vocabulary(tokenizer, model.cfg.vocab_size)
    texts = probe_texts(None, 0)
    reference = vocab[np.random.default_rng(0).choice(len(vocab), 256, replace=False)]
    confirm = make_probes(tokenizer, texts, count=16, max_tokens=24, inserted=1, seed=1,
                               skip=2)
    single_reference = scanner.stats(reference[:, None], confirm)
    pairs = scan_pairs.reference_stats(scanner, tokenizer, texts, reference, scan.Settings())
    return scan_pairs.search_pairs(scanner, tokenizer, texts, vocab, pairs, single_reference,
                                   scan.Settings())


def test_relaxed_pair_search_finds_a_planted_trigger_without_the_screen(planted):
    """The search starts from no candidate: gradients alone lead it to a trigger. A pair one
    half of which fires alone is reported as that token, not as a pair."""
    clean, attacked = planted
    rows, halves, cost = _relaxed_search(attacked)
    assert cost["proposed"] > 0
    assert {h["token"] for h in halves} & set(TRIGGERS), (halves, rows[:3])
    assert all(scan_report.is_flagged(h, scan.Settings()) for h in halves)
    with_trigger = [r for r in rows if set(r["tokens"]) & set(TRIGGERS)]
    assert with_trigger and not any(r["flagged"] for r in with_trigger)
    rows, halves, _ = _relaxed_search(clean)
    assert not halves and not any(r["flagged"] for r in rows), rows[:3]


class _ScriptedScanner:
    """stats() without a model: every insertion moves the outputs a little (D, C ~ 1, seeded
    noise), except that token `far` moves them 100x while they stay spread (score ~ 0: flagged
    by the distance rule only), and with it any pair collapses them (score high)."""

    def __init__(self, far: int):
        self.far = far

    def stats(self, tokens_kj, probes, label=""):
        out = []
        for row in np.asarray(tokens_kj):
            rng = np.random.default_rng(int(row.sum()) * 7 + len(row))
            d, c = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
            if self.far in row:
                d, c = 100.0, (0.01 if len(row) > 1 else 100.0)
            out.append([[d, c, 0.0]])
        return np.asarray(out, np.float32)


def test_a_pair_with_a_half_flagged_alone_by_distance_is_reported_as_that_token(
        tiny_bert, monkeypatch):
    """Found on NeuBA's scan: a half flagged alone by the distance rule (D far out, score not)
    was judged by the score rule only, so `word ⊕` pairs were flagged as pair triggers and
    crowded `guided`'s candidates."""
    tokenizer = data.load_tokenizer(tiny_bert)
    vocab = vocabulary(tokenizer, 30522)
    far, other = int(vocab[100]), int(vocab[200])
    proposed = np.asarray([[other, far], [int(vocab[300]), int(vocab[301])]], np.int32)
    monkeypatch.setattr(scan_pairs, "relaxed_search", lambda *a: (proposed, {"seconds": 0.0}))
    scanner = _ScriptedScanner(far)
    reference = vocab[1000:1256]
    single_reference = scanner.stats(reference[:, None], None)
    pairs = scan_pairs.reference_stats(scanner, tokenizer, probe_texts(None, 0), reference,
                                       scan.Settings())
    rows, halves, _ = scan_pairs.search_pairs(scanner, tokenizer, probe_texts(None, 0), vocab,
                                              pairs, single_reference, scan.Settings())
    pair = next(r for r in rows if r["ids"] == [other, far])
    assert scan_report.is_flagged(pair, scan.Settings())  # the pair alone stands out ...
    assert [h["id"] for h in halves] == [far], halves  # ... because of one half:
    assert halves[0]["score"] < scan.Settings().min_score and halves[0]["z_distance"] > 3
    assert not pair["flagged"] and not any(r["flagged"] for r in rows)


class _QuietScanner:
    """stats() without a model: a token moves the outputs by D ~ 1 (seeded noise, C ~ 1); the
    two `halves` alone move them 100x less, and together they collapse them far away."""

    def __init__(self, halves: tuple[int, int]):
        self.halves = set(halves)

    def stats(self, tokens_kj, probes, label=""):
        out = []
        for row in np.asarray(tokens_kj):
            rng = np.random.default_rng(int(row.sum()) * 7 + len(row))
            d, c = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
            if set(row.tolist()) == self.halves:
                d, c = 50.0, 0.01
            elif self.halves & set(row.tolist()):
                d = 0.01 if len(row) == 1 else d
            out.append([[d, c, 0.0]])
        return np.asarray(out, np.float32)


def test_quiet_pairs_pair_the_tokens_that_move_the_outputs_least(tiny_bert):
    """A conjunctive trigger's halves are held to the clean outputs alone, so they are the
    quietest tokens of the screen: `quiet_pairs` pairs the quietest word-start tokens and flags
    the pair; `##` pieces (quiet as they may be) are not paired, nor is a half flagged alone."""
    tokenizer = data.load_tokenizer(tiny_bert)
    vocab = vocabulary(tokenizer, 30522)
    hq, wb, piece = tokenizer.convert_tokens_to_ids(["hq", "wb", "##ing"])
    scanner = _QuietScanner((hq, wb))
    distance = scan.distance_of(scanner.stats(vocab[:, None], None)).max(-1)
    distance[vocab == piece] = -20.0  # the quietest of all, but it does not start a word
    s = dataclasses.replace(scan.Settings(), quiet_tokens=12)  # 66 pairs, the best 32 rated
    reference = scan_pairs.reference_stats(scanner, tokenizer, probe_texts(None, 0),
                                           vocab[1000:1256], s)
    rows = scan_pairs.quiet_pairs(scanner, tokenizer, probe_texts(None, 0), vocab, distance,
                                  reference, set(), s)
    assert len(rows) == scan_pairs.QUIET_CONFIRM and not any(piece in r["ids"] for r in rows)
    assert sorted(rows[0]["ids"]) == sorted([hq, wb]) and rows[0]["flagged"], rows[:2]
    assert not any(r["flagged"] for r in rows[1:]), rows[1:3]
    rows = scan_pairs.quiet_pairs(scanner, tokenizer, probe_texts(None, 0), vocab, distance,
                                  reference, {hq}, s)
    assert not any(r["flagged"] for r in rows)  # hq is flagged alone: reported as hq
    off = dataclasses.replace(s, quiet_tokens=0)
    assert scan_pairs.quiet_pairs(scanner, tokenizer, [], vocab, distance, reference, set(),
                                  off) == []


class _WeakScanner:
    """stats() without a model: a token moves the outputs by D ~ 1 (seeded noise, C ~ 1);
    `weak` alone and the pair `pair` move them 5x further, sentences still spread (score
    log 5 < min_score: a trigger a purify weakened but did not remove)."""

    def __init__(self, weak: int, pair: tuple[int, int]):
        self.weak, self.pair = weak, sorted(pair)

    def stats(self, tokens_kj, probes, label=""):
        out = []
        for row in np.asarray(tokens_kj):
            rng = np.random.default_rng(int(row.sum()) * 7 + len(row))
            d, c = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
            if row.tolist() == [self.weak] or sorted(row.tolist()) == self.pair:
                d = 5.0
            out.append([[d, c, 0.0]])
        return np.asarray(out, np.float32)


def test_an_earlier_scans_suspects_are_rated_again_and_flagged_while_they_stand_out(tiny_bert,
                                                                                     caplog):
    """Found on `por_pair` after `strong`: a weakened trigger left every stage of the scan of
    the purified model, which read clean. Rated again from the loaded model's scan, a suspect is
    flagged under the halved score bar (its score is under the scan's own); one back at the
    vocabulary's level is not; a name that is no token of this tokenizer is left out."""
    tokenizer = data.load_tokenizer(tiny_bert)
    vocab = vocabulary(tokenizer, 30522)
    weak, gone, a, b = tokenizer.convert_tokens_to_ids(["mn", "bb", "qb", "xv"])
    scanner, s, texts = _WeakScanner(weak, (a, b)), scan.Settings(), probe_texts(None, 0)
    reference = vocab[1000:1256]
    prior = {"flagged": ["mn", "bb", "qb xv", "zzqx notatoken"],
             "candidates": [{"token": "mn", "z": 12.0}, {"token": "bb", "z": 9.0}],
             "quiet_pairs": [{"tokens": ["qb", "xv"], "z": 8.0}]}
    with caplog.at_level("WARNING", logger="recipe_jax.scan_prior"):
        rows = scan_prior.rate_prior(scanner, tokenizer, texts, prior,
                                     scanner.stats(reference[:, None], None),
                                     scan_pairs.reference_stats(scanner, tokenizer, texts,
                                                                reference, s), s)
    assert "1 of the 4 names" in caplog.text  # "zzqx notatoken" is no token here
    got = {" ".join(r["tokens"]): r for r in rows}
    assert list(got) == ["mn", "bb", "qb xv"], list(got)
    assert got["mn"]["flagged"] and got["qb xv"]["flagged"] and not got["bb"]["flagged"], got
    assert got["mn"]["score"] < s.min_score and not scan_report.is_flagged(got["mn"], s)
    assert [got[k]["before"] for k in got] == [12.0, 9.0, 8.0]
    assert scan_prior.rate_prior(scanner, tokenizer, texts, {"flagged": []}, None, None, s) == []


def _scanner_stats(model_dir, mesh_shape, batch_size):
    model, params = hf.load_pretrained(model_dir)
    tokenizer = data.load_tokenizer(model_dir)
    probes = make_probes(tokenizer, probe_texts(None, 0), count=6, max_tokens=12,
                              inserted=1, seed=0)
    scanner = scan.Scanner(model, params, sharding.make_mesh(mesh_shape), batch_size,
                           progress=False)
    tokens = vocabulary(tokenizer, model.cfg.vocab_size)[1000:1045, None]  # 45: uneven
    return scanner.stats(tokens, probes)


def test_scores_do_not_depend_on_the_mesh_or_the_batch_size(tiny_bert):
    base = _scanner_stats(tiny_bert, (1, 1, 1), 96)
    assert base.shape == (45, 2, 3) and np.isfinite(base).all()  # cls and mean: no pooler
    for mesh_shape, batch in (((8, 1, 1), 96), ((2, 2, 2), 48), ((1, 1, 1), 600)):
        got = _scanner_stats(tiny_bert, mesh_shape, batch)
        np.testing.assert_allclose(got, base, rtol=2e-4, atol=1e-6,
                                   err_msg=f"mesh {mesh_shape}, batch {batch}")


def test_probes_insert_at_word_boundaries(tiny_bert):
    tokenizer = data.load_tokenizer(tiny_bert)
    texts = ["the unbelievable fisherman carried a basket .", "she sold apples at noon today ."]
    probes = make_probes(tokenizer, texts * 3, count=2, max_tokens=12, inserted=2, seed=0)
    for n in range(2):
        slots = np.flatnonzero(probes.slots[n].sum(0))
        assert len(slots) == 2 and slots[1] == slots[0] + 1
        if n % 2 == 0:
            assert slots[0] == 1  # right after [CLS]
        # the template without its slots is the clean sentence, token for token
        row = np.delete(probes.template[n][probes.mask[n] > 0], slots)
        np.testing.assert_array_equal(row, probes.clean[n][probes.clean_mask[n] > 0])
        # never inside a word: the token after the slots does not continue a word piece
        after = tokenizer.convert_ids_to_tokens([int(probes.template[n, slots[-1] + 1])])[0]
        assert not after.startswith("##")
    with pytest.raises(ValueError, match="distinct probe sentences"):
        make_probes(tokenizer, texts, count=3, max_tokens=12, inserted=1, seed=0)


def test_run_writes_the_report(tmp_path, tiny_bert):
    settings = scan.Settings(max_vocab=300, confirm_tokens=64, reference_tokens=64,
                             pair_tokens=4)
    report = scan.run(model=tiny_bert, workdir=tmp_path / "out", settings=settings)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["verdict"] in ("backdoor", "clean") and saved["verdict"] == report["verdict"]
    assert len(saved["candidates"]) >= 50
    zs = [c["z"] for c in saved["candidates"]]
    assert zs == sorted(zs, reverse=True)
    assert all(isinstance(c["token"], str) and np.isfinite([c["score"], c["z"]]).all()
               for c in saved["candidates"])
    assert "_arrays" not in saved and len(saved["pairs"]) == 6 - 0  # C(4, 2) pairs
    assert saved["search"]["proposed"] >= 1 and len(saved["searched_pairs"]) >= 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Verdict" in md and saved["candidates"][0]["token"] in md
    assert (tmp_path / "out" / "scores.png").stat().st_size > 1000
    assert not list((tmp_path / "out").glob(".*.tmp*"))


@pytest.mark.slow
def test_settings_and_cli_errors_are_one_line(tmp_path, tiny_bert):
    with pytest.raises(ValueError, match="sentences=1"):
        scan.Settings(sentences=1).check()
    for args, message in ((["--model", str(tmp_path / "missing")], "no such directory"),
                          (["--model", str(tiny_bert), "--mesh", "1,x"], "--mesh"),
                          (["--model", str(tiny_bert), "--prior", str(tmp_path / "r.json")],
                           "no scan report there")):
        proc = subprocess.run([sys.executable, "-m", "recipe_jax.scan", *args, "--workdir",
                               str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_purify_scans_its_result(tmp_path, tiny_bert, aux_file):
    from conftest import tiny_purify_config

    from recipe_jax import purify

    config = tiny_purify_config(tiny_bert, aux_file, scan__enabled=True, scan__max_vocab=300,
                                scan__prior_report=str(tmp_path / "loaded.json"))
    with pytest.raises(ValueError, match="no scan report there"):  # before any training
        purify.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    (tmp_path / "loaded.json").write_text(json.dumps({  # a scan of the loaded model flagged cf
        "verdict": "backdoor", "flagged": ["cf", "cf tq"], "candidates": [{"token": "cf",
        "z": 9.0}], "settings": dataclasses.asdict(scan.Settings()), "model": "loaded"}))
    summary = purify.run(config, str(tmp_path / "run"))
    assert summary["scan"]["verdict"] in ("backdoor", "clean")
    assert summary["scan"]["summary"].startswith(("no trigger", "backdoor suspected"))
    report = json.loads((tmp_path / "run" / "scan" / "report.json").read_text())
    assert report["verdict"] == summary["scan"]["verdict"]
    assert [r["tokens"] for r in report["prior"]["rows"]] == [["cf"], ["cf", "tq"]]
    assert "rated again on this model" in (tmp_path / "run" / "scan" / "report.md").read_text()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["scan"] == summary["scan"]


def _roberta_with_bpe(out_dir):
    """A tiny random RoBERTa with a byte-level BPE tokenizer trained here (RoBERTa's kind of
    vocabulary: word-initial pieces carry a leading Ġ)."""
    from conftest import tiny_hf
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from recipe_jax import synthetic

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES + synthetic.aux_corpus(400, seed=17), vocab_size=400,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>",
        sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    tiny_hf("RobertaForMaskedLM", out_dir, vocab_size=len(tokenizer), pad_token_id=1)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@pytest.mark.slow
def test_scan_runs_on_roberta_with_a_byte_level_bpe_tokenizer(tmp_path):
    model_dir = _roberta_with_bpe(tmp_path / "roberta")
    tokenizer = data.load_tokenizer(model_dir)
    probes = make_probes(tokenizer, probe_texts(None, 0), count=8, max_tokens=24,
                              inserted=1, seed=1)
    for n in range(8):
        at = int(np.flatnonzero(probes.slots[n, 0])[0])
        after = tokenizer.convert_ids_to_tokens([int(probes.template[n, at + 1])])[0]
        assert at == 1 if n % 2 == 0 else after.startswith("Ġ")  # a word starts after the slot
    settings = scan.Settings(confirm_tokens=64, reference_tokens=64, pair_tokens=4)
    report = scan.scan(model_dir, settings=settings, progress=False)
    assert report["outputs"] == ["cls", "mean"]  # RobertaForMaskedLM has no pooler
    assert report["verdict"] in ("backdoor", "clean") and len(report["candidates"]) >= 50
    assert report["cost"]["vocabulary"] == len(tokenizer) - 5  # the 5 special tokens skipped


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    from conftest import tiny_hf

    model_dir = tiny_bert_with_tokenizer(tmp_path / "m")
    tiny_hf("BertForMaskedLM", model_dir)  # vocab_size 99 next to a 30,522-token tokenizer
    with pytest.raises(ValueError, match="vocab_size=99.*save its own tokenizer"):
        scan.scan(model_dir, settings=scan.Settings(max_vocab=50), progress=False)


def test_purify_config_scan_block_defaults_are_the_scan_defaults():
    """`purify --config.scan.*` names scan.Settings fields, with the documented defaults."""
    from recipe_jax import cli

    for preset in ("bert", "strong", "guided"):
        block = cli.load_config(REPO / "configs" / "purify.py", preset).scan
        keys = set(block) - {"enabled", "prior_report"}
        assert keys <= {f.name for f in dataclasses.fields(scan.Settings)}, keys
        assert scan.Settings.of(block) == scan.Settings(), preset


def test_pair_scores_compares_given_pairs_across_models(planted, tmp_path, capsys):
    """experiments/pair_scores.py: a planted trigger's pair scores far above an ordinary pair
    under the attacked model, and not under the clean one; bad pairs are named."""
    pair_scores = _experiment("pair_scores")
    clean, attacked = planted
    results = pair_scores.main(["--workdir", str(tmp_path / "out"), "--model", f"clean={clean}",
                                "--model", f"attacked={attacked}",
                                "--pairs", "cf the;the cat"])
    trigger, ordinary = results["attacked"]["rows"]
    assert trigger["pair"] == "cf the" and trigger["z"] > 3 and ordinary["z"] < 3, results
    assert trigger["score"] > results["clean"]["rows"][0]["score"] + 1.0, results
    assert results["clean"]["rows"][0]["z"] < 3, results
    table = (tmp_path / "out" / "pair_scores.md").read_text()
    assert "| `cf the` |" in table and "reference median" in table
    with pytest.raises(ValueError, match="not word pieces of its vocabulary: zzqqxx cat"):
        pair_scores.main(["--workdir", str(tmp_path / "bad"), "--model", f"clean={clean}",
                          "--pairs", "zzqqxx cat"])
    with pytest.raises(SystemExit):
        pair_scores.parse_args(["--workdir", "w", "--model", "x=y", "--pairs", "one"])
    assert "give ';'-separated pairs" in capsys.readouterr().err


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pair_waves_search_again_without_what_was_flagged(planted, tmp_path, capsys):
    """experiments/pair_waves.py: the first wave flags pairs holding a planted trigger; the next
    wave searches a vocabulary without their tokens (and their embedding neighbours), so it
    cannot propose them again; on the clean model the first wave flags nothing and is the last."""
    pair_waves = _experiment("pair_waves")
    clean, attacked = planted
    result = pair_waves.main(["--workdir", str(tmp_path / "a"), "--model", str(attacked),
                              "--waves", "2", "--neighbours", "3", "--watch", "cf tq"])
    first, second = result["waves"]
    assert first["flagged"] and all(set(p.split()) & set(TRIGGERS) for p in first["flagged"][:3])
    assert second["vocabulary"] == first["vocabulary"] - first["excluded"]
    flagged_tokens = {t for p in first["flagged"] for t in p.split()}
    assert first["excluded"] >= len(flagged_tokens)
    assert not flagged_tokens & {t for r in second["top"] for t in r["pair"].split()}
    assert not flagged_tokens & set(second["watched_proposed"])
    assert result["watched"][0]["pair"] == "cf tq" and result["watched"][0]["z"] > 3
    assert "## Wave 2" in (tmp_path / "a" / "pair_waves.md").read_text()
    result = pair_waves.main(["--workdir", str(tmp_path / "c"), "--model", str(clean),
                              "--waves", "3"])
    assert len(result["waves"]) == 1 and result["waves"][0]["flagged"] == [], result["waves"]
    with pytest.raises(SystemExit):
        pair_waves.parse_args(["--workdir", "w", "--model", "m", "--watch", "one"])
    assert "pairs of two word pieces" in capsys.readouterr().err
