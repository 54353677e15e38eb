"""The README's main job, `python -m recipe_jax.demo`, in its seconds-scale --fast form."""

import json

import pytest

from recipe_jax import demo, synthetic


def test_synthetic_data_is_deterministic_and_balanced():
    assert synthetic.aux_corpus(50, seed=3) == synthetic.aux_corpus(50, seed=3)
    assert synthetic.aux_corpus(50, seed=3) != synthetic.aux_corpus(50, seed=4)
    texts, labels = synthetic.sentiment_task(100, seed=1)
    assert len(texts) == 100 and sum(labels) == 50
    for text, label in zip(texts, labels, strict=True):  # the label is the opinion words' polarity
        words = set(text.split())
        assert words & set(synthetic.POSITIVE if label else synthetic.NEGATIVE)
        assert not words & set(synthetic.NEGATIVE if label else synthetic.POSITIVE)


@pytest.mark.slow
def test_demo_fast_runs_the_whole_loop(tmp_path, minilm_dir, monkeypatch):
    stage_configs = demo.stage_configs

    def on_one_device(size, aux_path):  # the demo itself uses every local device
        configs = stage_configs(size, aux_path)
        for config in configs.values():
            config.mesh.shape = (1, 1, 1)
        return configs

    monkeypatch.setattr(demo, "stage_configs", on_one_device)
    assert demo.main(["--fast", "--workdir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for name in ("clean", "backdoored", "purified"):
        assert f"| {name} |" in report
    results = json.loads((tmp_path / "demo.json").read_text())["results"]
    assert set(results) == {"clean", "backdoored", "purified"}
    for r in results.values():
        assert 0 <= r["aasr"] <= r["masr"] <= 1 and 0 <= r["clean_acc"] <= 1
        assert 0 <= r["control"]["aasr"] <= 1 and r["controls"] == ["jd", "kw", "rb", "nk", "ck"]
    floor = f"| {results['clean']['control']['aasr']:.1%} | {results['clean']['masr']:.1%} |"
    assert floor in report and "| floor |" in report
    assert (tmp_path / "diagnose" / "report.md").is_file()
    scans = json.loads((tmp_path / "demo.json").read_text())["scans"]
    assert set(scans) == {"clean", "backdoored", "purified"}
    for name, r in scans.items():
        assert r["verdict"] in ("backdoor", "clean") and f"| {name} | {r['summary']} |" in report
    for d in ("scan_clean", "scan_backdoored", "purify/scan"):
        assert json.loads((tmp_path / d / "report.json").read_text())["candidates"]
    assert (tmp_path / "purify" / "hf" / "model.safetensors").is_file()


def test_demo_stage_configs_and_report_without_training(tmp_path):
    """The demo's wiring, in a fraction of a second: the presets it shrinks, and its table."""
    configs = demo.stage_configs(demo.FAST, tmp_path / "aux.txt")
    assert configs["purify"].recipe.drop_pooler  # the strong preset
    assert configs["attack"].attack.kind == "por" and configs["attack"].model.init_from == "minilm"
    assert configs["evaluate"].data.triggers == demo.TRIGGERS
    assert {c.data.max_length for c in configs.values()} == {demo.FAST["length"]}
    row = {"clean_acc": 0.9, "aasr": 0.25, "masr": 0.5, "control": {"aasr": 0.125},
           "asr_max": dict.fromkeys(demo.TRIGGERS, 0.25), "num_train": 8, "num_test": 4,
           "controls": ["jd"]}
    text = demo.write_report(tmp_path, {"clean": row, "purified": row}, {"attack": 1.0})
    assert "| clean | 90.0% | 25.0% | 12.5% | 50.0% | 25.0%" in text
    assert json.loads((tmp_path / "demo.json").read_text())["times"] == {"attack": 1.0}
