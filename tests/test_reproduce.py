"""experiments/reproduce.py: the attack x defense x task table, at the seconds-scale smoke size."""

import importlib.util
import json
import pathlib

import pytest
from conftest import tiny_bert_with_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _module():
    path = REPO / "experiments" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scales_name_disjoint_attacker_and_defender_corpora(tmp_path):
    reproduce = _module()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} .\n" for i in range(100)))
    attacker, defender = reproduce.write_corpora(tmp_path, str(corpus),
                                                 reproduce.SCALES["smoke"])
    a, d = attacker.read_text().splitlines(), defender.read_text().splitlines()
    assert a[0] == "sentence number 0 ." and d[-1] == "sentence number 99 ."
    assert len(a) == len(d) == 32 and not set(a) & set(d)
    with pytest.raises(ValueError, match="the scale needs"):
        reproduce.write_corpora(tmp_path / "x", str(corpus), reproduce.SCALES["cpu"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--defenses", "fp,magic"])


def test_each_attack_is_scored_against_control_words_of_its_kind():
    from recipe_jax import evaluate

    reproduce = _module()
    for attack in ("por", "neuba", "badpre"):
        c = reproduce.evaluate_config("sst2", attack, pathlib.Path("m"),
                                      reproduce.SCALES["smoke"])
        evaluate.validate(c)  # no word is both a trigger and a control
        symbols = not any(ch.isascii() for word in c.data.triggers for ch in word)
        assert symbols == (attack == "neuba")
        assert all(ch.isascii() != symbols for word in c.data.controls for ch in word), attack


@pytest.mark.slow
def test_smoke_table_end_to_end_and_rerun_skips(tmp_path, shared_data, capsys):
    reproduce = _module()
    model = tiny_bert_with_tokenizer(tmp_path / "tiny", kind="BertForPreTraining",
                                     max_position_embeddings=64)
    args = ["--workdir", str(tmp_path / "rep"), "--scale", "smoke", "--model", str(model),
            "--attacks", "clean,por", "--defenses", "none,fp_ga,strong", "--tasks", "sst2"]
    cells = reproduce.main(args)
    assert sorted(cells) == ["clean/none/sst2", "por/fp_ga/sst2", "por/none/sst2",
                             "por/strong/sst2"]
    for r in cells.values():
        assert 0.0 <= r["clean_acc"] <= 1.0 and 0.0 <= r["aasr"] <= r["masr"] <= 1.0
        assert sorted(r["asr_max"]) == ["bb", "cf", "mb", "mn", "tq"]
        assert sorted(r["control"]["asr_max"]) == ["ck", "jd", "kw", "nk", "rb"]
    pruned = json.loads((tmp_path / "rep" / "por" / "defense_fp_ga" / "pruned.json").read_text())
    assert pruned["method"] == "fp_ga" and pruned["count"] > 0
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "| por | strong | " in table and "| neuba | none | — |" in table
    clean = cells["clean/none/sst2"]
    row = " | ".join(f"{100 * v:.1f}" for v in (clean["clean_acc"], clean["aasr"], clean["masr"],
                                                 clean["control"]["aasr"]))
    assert table.splitlines()[2].startswith(f"| clean | none | {row} | — |"), table
    assert "| sst2 ACC | sst2 AASR | sst2 MASR | sst2 floor |" in table
    assert "| clean | none | " in table and "| clean | strong |" not in table
    # A run over other cells in the same workdir (here: one written meanwhile) keeps them.
    reproduce.write_table(tmp_path / "rep", "smoke", reproduce.SCALES["smoke"],
                          "neuba/none/sst2", clean)
    capsys.readouterr()
    again = reproduce.main(args)  # every cell is cached: nothing is trained again
    assert again == {**cells, "neuba/none/sst2": clean}
    assert f"| neuba | none | {row} |" in (tmp_path / "rep" / "table.md").read_text()
    with pytest.raises(SystemExit, match="scale 'smoke'"):
        reproduce.main([*args[:2], "--scale", "cpu"])
    assert "evaluate por" not in capsys.readouterr().out
    # A defense built with other settings (here: as if the preset's lr changed since) is refused.
    stored = tmp_path / "rep" / "por" / "defense_strong" / "config.json"
    record = json.loads(stored.read_text())
    record["train"]["learning_rate"] *= 2
    stored.write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"(?s)train.learning_rate.*delete .*defense_strong"):
        reproduce.main(args)
