"""Data stage: text readers (and their errors), tokenization, BERT masking, batch order."""

import functools
import json
import pathlib
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipe_jax import data, masks

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path: pathlib.Path, content: str | bytes) -> str:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


# ------------------------------------------------------------------------------------ readers

def test_txt_strips_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "a.txt", "\ufeff first line \n\n   \n\tsecond\r\nthird")
    assert data.read_texts(path) == ["first line", "second", "third"]


def test_tsv_keeps_bare_quotes_and_finds_either_column(tmp_path):
    path = _write(tmp_path / "a.tsv", 'sentence\tlabel\nhe said "hi\t1\n\t0\n"quoted" too\t0\n')
    assert data.read_texts(path) == ['he said "hi', '"quoted" too']
    path = _write(tmp_path / "b.tsv", "label\tText\n1\tone\n0\ttwo\n")
    assert data.read_texts(path) == ["one", "two"]


def test_csv_multiline_quoted_fields_and_huge_field(tmp_path):
    path = _write(tmp_path / "a.csv", 'id,text\n1,"line one\nline two"\n2,"a, b ""c"""\n3,\n')
    assert data.read_texts(path) == ["line one\nline two", 'a, b "c"']
    huge = "x" * 300_000  # over csv's default 128 KiB field limit
    path = _write(tmp_path / "b.csv", f"sentence\n{huge}\nshort\n")
    assert data.read_texts(path) == [huge, "short"]


def test_jsonl_text_or_sentence_field(tmp_path):
    lines = [json.dumps({"text": " a "}), "", json.dumps({"sentence": "b", "label": 1}),
             json.dumps({"text": "  "})]
    path = _write(tmp_path / "a.jsonl", "\n".join(lines))
    assert data.read_texts(path) == ["a", "b"]


def test_max_examples_keeps_the_first_and_stops_reading(tmp_path):
    # A broken line after the first N is never reached.
    path = _write(tmp_path / "a.txt", "\n".join(str(i) for i in range(10)) + "\n\xff\n")
    assert data.read_texts(path, max_examples=3) == ["0", "1", "2"]
    assert len(data.read_texts(str(tmp_path / "a.txt"), max_examples=10)) == 10
    with pytest.raises(ValueError, match="max_examples"):
        data.read_texts(path, max_examples=-1)


@pytest.mark.parametrize("name, content, match", [
    ("a.parquet", "x", r"unsupported file type '\.parquet'.*\.txt, \.tsv, \.csv, \.jsonl"),
    ("a.txt", b"ok\n\xff\xfe bad\n", "line 2 is not valid UTF-8"),
    ("a.txt", b"ok\nbin\x00ary\n", "line 2 contains a NUL byte"),
    ("a.txt", "", "empty"),
    ("a.txt", "\n  \n\t\n", "empty"),
    ("a.tsv", "sentence\tlabel\n", "empty"),
    ("a.tsv", "label\tsentences\n1\tx\n", r"no 'sentence' or 'text' column.*'label', 'sentences'"),
    ("a.tsv", "label\ttext\n1\tx\n0\n", "line 3 has 1 fields"),
    ("a.csv", "tweet,class\nx,1\n", r"no 'sentence' or 'text' column.*'tweet'"),
    ("a.csv", 'text\n"unterminated\n', "not valid .csv"),
    ("a.csv", 'text\n"a"b\n', "line 2 is not valid .csv"),
    ("a.jsonl", '{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ("a.jsonl", '{"text": "a"}\n["text"]\n', "line 2 is a JSON list"),
    ("a.jsonl", '{"body": "a"}\n', r"line 1 has no 'text' or 'sentence' field.*'body'"),
    ("a.jsonl", '{"text": 3}\n', "line 1: field 'text' is a int"),
    ("a.jsonl", '{"text": "\\ud800"}\n', "unpaired surrogate"),
    ("a.jsonl", "[" * 100_000 + "\n", "line 1 is not valid JSON"),
])
def test_reader_errors_name_path_problem_and_line(tmp_path, name, content, match):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=match) as e:
        data.read_texts(path)
    assert path in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        data.read_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="is a directory"):
        data.read_texts(str(tmp_path))


def test_shared_data_first_rows(shared_data):
    for rel in ("bookcorpus/train.tsv", "sst2/dev.tsv"):
        path = shared_data / rel
        texts = data.read_texts(str(path), max_examples=100)
        lines = path.read_text(encoding="utf-8").splitlines()[1:101]
        assert texts == [line.split("\t")[0].strip() for line in lines]


# ---------------------------------------------------------------------------- reader properties

# Newlines end a line, NUL marks a binary file, a leading U+FEFF is a byte-order mark and tabs
# split TSV fields: none of them can be part of a one-field line.
_LINE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n\r\t\x00\ufeff"))


def _expected(lines):
    return [line.strip() for line in lines if line.strip()]


def _round_trip(suffix: str, content: str, lines):
    with tempfile.TemporaryDirectory() as d:
        path = _write(pathlib.Path(d) / f"a{suffix}", content)
        if not _expected(lines):
            with pytest.raises(ValueError, match="empty"):
                data.read_texts(path)
        else:
            assert data.read_texts(path) == _expected(lines)


@FAST
@given(st.lists(_LINE, max_size=15))
def test_txt_and_tsv_round_trip(lines):
    _round_trip(".txt", "\n".join(lines), lines)
    _round_trip(".tsv", "sentence\n" + "\n".join(lines), lines)


@FAST
@given(st.lists(st.text(st.characters(exclude_categories=("Cs",))), max_size=15))
def test_jsonl_round_trip(lines):
    content = "\n".join(json.dumps({"text": line}) for line in lines)
    _round_trip(".jsonl", content, lines)


_NOISE = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b'"', b",", b"\t", b"\n", b"\r", b"{", b"}", b"[", b":", b"text",
                              b"sentence", b'{"text": ', b"\xff", b"\xc3", b"\x00", b" ", b"a",
                              b"\xef\xbb\xbf", b"\\ud800"]), max_size=60).map(b"".join),
)


@FAST
@given(_NOISE, st.sampled_from(data.SUFFIXES))
def test_random_bytes_only_raise_value_errors(content, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = _write(pathlib.Path(d) / f"a{suffix}", content)
        try:
            texts = data.read_texts(path)
        except (ValueError, FileNotFoundError) as e:
            assert path in str(e)
        else:
            assert texts and all(isinstance(t, str) and t == t.strip() and t for t in texts)


# --------------------------------------------------------------------------------------- tfds

def test_tfds_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ValueError, match="tensorflow_datasets is not installed.*tfds build"):
        data.read_texts("tfds:imdb_reviews")


def test_tfds_unknown_or_unprepared_dataset(monkeypatch, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="no tfds dataset 'no_such_dataset_xyz'.*tfds build"):
        data.read_texts("tfds:no_such_dataset_xyz")
    with pytest.raises(ValueError, match="'imdb_reviews' is not prepared.*tfds build"):
        data.read_texts("tfds:imdb_reviews:test")


def test_tfds_reads_first_text_feature(monkeypatch):
    calls = {}

    class Builder:
        info = types.SimpleNamespace(features={"label": 0, "sentence": 0, "description": 0},
                                     splits={"train": 0}, file_format="tfrecord")

        def is_prepared(self):
            return True

        def as_dataset(self, split):
            calls["split"] = split
            return [{"sentence": b" caf\xc3\xa9 ", "label": 1}, {"sentence": b""},
                    {"sentence": b"two"}]

    def builder(name):
        calls["name"] = name
        return Builder()

    fake = types.SimpleNamespace(builder=builder, as_numpy=lambda ds: ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    assert data.read_texts("tfds:glue/sst2") == ["café", "two"]
    assert calls == {"name": "glue/sst2", "split": "train"}
    assert data.read_texts("tfds:x:validation[:10]", max_examples=1) == ["café"]
    assert calls == {"name": "x", "split": "validation[:10]"}


# ------------------------------------------------------------------------------- tokenization

def test_tokenize_candidates_exclude_special_and_padding(minilm_dir):
    tokenizer = data.load_tokenizer(minilm_dir)
    assert tokenizer.is_fast
    texts = ["hello world", "a [MASK] b", "word " * 100]
    out = data.tokenize(tokenizer, texts, max_length=16)
    ids_nl, attention_nl, candidates_nl = out["input_ids"], out["attention_mask"], out["candidates"]
    assert ids_nl.shape == attention_nl.shape == candidates_nl.shape == (3, 16)
    assert ids_nl.dtype == attention_nl.dtype == np.int32 and candidates_nl.dtype == bool
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
               tokenizer.mask_token_id]
    assert not candidates_nl[np.isin(ids_nl, special)].any()
    assert not candidates_nl[attention_nl == 0].any()
    assert candidates_nl.sum(axis=1).tolist() == [2, 2, 14]  # [MASK] is never a candidate
    assert ids_nl[2, -1] == tokenizer.sep_token_id  # truncated, still closed


def test_tokenizer_and_tokenize_errors(minilm_dir, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no tokenizer files"):
        data.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.load_tokenizer(tmp_path / "absent")
    tokenizer = data.load_tokenizer(str(minilm_dir))
    with pytest.raises(ValueError, match="max_length must be >= 3"):
        data.tokenize(tokenizer, ["a"], 2)
    with pytest.raises(ValueError, match="non-empty list"):
        data.tokenize(tokenizer, [], 8)


# ------------------------------------------------------------------------------------ masking

VOCAB, MASK_ID = 1000, 4


def _batch(seed=0, batch=64, length=32):
    """Ids in [5, VOCAB) (never MASK_ID) with 0..length candidates per row, all counts hit."""
    r = np.random.default_rng(seed)
    ids_bl = r.integers(5, VOCAB, (batch, length)).astype(np.int32)
    counts = np.arange(batch) % (length + 1)
    candidates_bl = np.zeros((batch, length), bool)
    for b, c in enumerate(counts):
        candidates_bl[b, r.choice(length, c, replace=False)] = True
    return ids_bl, candidates_bl


def _mask(rng, ids_bl, candidates_bl, **kw):
    m = masks.num_masked_positions(ids_bl.shape[1], kw.get("mask_prob", 0.15))
    kw = dict(mask_token_id=MASK_ID, vocab_size=VOCAB, num_positions=m) | kw
    out = masks.mask_tokens(rng, jnp.asarray(ids_bl), jnp.asarray(candidates_bl), **kw)
    return {k: np.asarray(v) for k, v in out.items()}


def test_num_masked_positions():
    assert [masks.num_masked_positions(n) for n in (1, 10, 30, 64, 128)] == [1, 2, 4, 10, 19]
    with pytest.raises(ValueError, match="mask_prob"):
        masks.num_masked_positions(64, 0.0)


def test_mask_tokens_exact_count_valid_positions_and_labels():
    ids_bl, candidates_bl = _batch()
    out = _mask(jax.random.key(0), ids_bl, candidates_bl)
    m = masks.num_masked_positions(32)
    assert out["positions"].shape == out["labels"].shape == out["weights"].shape == (64, m)
    assert out["input_ids"].dtype == out["positions"].dtype == out["labels"].dtype == np.int32
    assert out["weights"].dtype == np.float32
    count = candidates_bl.sum(1)
    n = np.round(np.float32(0.15) * count.astype(np.float32)).astype(int)
    n = np.where(count > 0, np.clip(n, 1, m), 0)
    assert (out["weights"].sum(1) == n).all()
    for b in range(64):
        valid = out["weights"][b] == 1
        assert (valid == (np.arange(m) < n[b])).all()  # real slots first, then padding
        pos = out["positions"][b][valid]
        assert len(set(pos.tolist())) == n[b] and candidates_bl[b, pos].all()
        assert (out["labels"][b][valid] == ids_bl[b, pos]).all()
        assert (out["positions"][b][~valid] == 0).all() and (out["labels"][b][~valid] == 0).all()
        untouched = np.ones(32, bool)
        untouched[pos] = False
        assert (out["input_ids"][b, untouched] == ids_bl[b, untouched]).all()


def test_mask_tokens_80_10_10_and_uniform_choice():
    batch, length = 8192, 32
    ids_bl = np.random.default_rng(1).integers(5, VOCAB, (batch, length)).astype(np.int32)
    candidates_bl = np.ones((batch, length), bool)
    candidates_bl[:, [0, -1]] = False  # [CLS] ... [SEP]
    out = _mask(jax.random.key(1), ids_bl, candidates_bl)
    rows = np.repeat(np.arange(batch)[:, None], out["positions"].shape[1], 1)
    valid = out["weights"] == 1
    new = out["input_ids"][rows, out["positions"]][valid]
    old = out["labels"][valid]
    masked, kept = np.mean(new == MASK_ID), np.mean(new == old)
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01
    assert abs(1 - masked - kept - 0.1) < 0.01  # random replacements
    random_ids = new[(new != MASK_ID) & (new != old)]
    assert random_ids.min() >= 0 and random_ids.max() < VOCAB and random_ids.max() > 0.9 * VOCAB
    freq = np.bincount(out["positions"][valid], minlength=length)
    assert freq[0] == freq[-1] == 0
    assert np.abs(freq[1:-1] / freq[1:-1].mean() - 1).max() < 0.15


def test_mask_tokens_replacement_extremes():
    ids_bl, candidates_bl = _batch()
    rng = jax.random.key(2)
    out = _mask(rng, ids_bl, candidates_bl, mask_replace_prob=1.0, random_replace_prob=0.0)
    rows = np.repeat(np.arange(64)[:, None], out["positions"].shape[1], 1)
    assert (out["input_ids"][rows, out["positions"]][out["weights"] == 1] == MASK_ID).all()
    out = _mask(rng, ids_bl, candidates_bl, mask_replace_prob=0.0, random_replace_prob=0.0)
    assert (out["input_ids"] == ids_bl).all() and out["weights"].sum() > 0


def test_mask_tokens_deterministic_jittable_and_rng_dependent():
    ids_bl, candidates_bl = _batch()
    a = _mask(jax.random.key(3), ids_bl, candidates_bl)
    b = _mask(jax.random.key(3), ids_bl, candidates_bl)
    c = _mask(jax.random.key(4), ids_bl, candidates_bl)
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["positions"] == c["positions"]).all()
    jitted = jax.jit(functools.partial(masks.mask_tokens, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                       num_positions=masks.num_masked_positions(32)))
    d = jitted(jax.random.key(3), jnp.asarray(ids_bl), jnp.asarray(candidates_bl))
    assert all((a[k] == np.asarray(d[k])).all() for k in a)


def test_mask_tokens_on_real_tokens_never_touches_special(minilm_dir):
    tokenizer = data.load_tokenizer(minilm_dir)
    enc = data.tokenize(tokenizer, ["the quick brown fox jumps over the lazy dog"] * 32 + ["x"], 16)
    out = masks.mask_tokens(jax.random.key(5), enc["input_ids"], enc["candidates"],
                           mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                           num_positions=masks.num_masked_positions(16))
    changed = np.asarray(out["input_ids"]) != enc["input_ids"]
    assert not changed[~enc["candidates"]].any() and changed.any()


@pytest.mark.parametrize("kw, match", [
    (dict(num_positions=33), r"num_positions must be in \[1, L=32\]"),
    (dict(mask_replace_prob=0.95), "summing to <= 1"),
    (dict(mask_token_id=VOCAB), "outside the vocabulary"),
])
def test_mask_tokens_errors(kw, match):
    ids_bl, candidates_bl = _batch()
    with pytest.raises(ValueError, match=match):
        _mask(jax.random.key(0), ids_bl, candidates_bl, **kw)
    with pytest.raises(ValueError, match="candidates shape"):
        _mask(jax.random.key(0), ids_bl, candidates_bl[:, :5])


# -------------------------------------------------------------------------------- batch order

def test_epochs_are_permutations_covering_each_row_once():
    n, batch = 103, 10
    assert data.steps_per_epoch(n, batch) == 10
    for epoch in range(3):
        rows = np.concatenate([data.batch_rows(7, epoch * 10 + i, n, batch) for i in range(10)])
        assert len(set(rows.tolist())) == 100 and rows.min() >= 0 and rows.max() < n
        assert (rows == data.epoch_order(7, epoch, n)[:100]).all()
    assert not (data.epoch_order(7, 0, n) == data.epoch_order(7, 1, n)).all()
    assert sorted(data.epoch_order(7, 0, n).tolist()) == list(range(n))


def test_process_slices_concatenate_to_global_batch_deterministically():
    for step in (0, 5, 13):
        whole = data.batch_rows(3, step, 50, 8)
        parts = [data.batch_rows(3, step, 50, 8, process_index=p, process_count=4)
                 for p in range(4)]
        assert all(len(p) == 2 for p in parts) and (np.concatenate(parts) == whole).all()
        assert (data.batch_rows(3, step, 50, 8) == whole).all()
    assert not (data.batch_rows(3, 0, 50, 8) == data.batch_rows(4, 0, 50, 8)).all()


def test_batch_order_errors():
    with pytest.raises(ValueError, match="5 examples make no full batch of 8"):
        data.steps_per_epoch(5, 8)
    with pytest.raises(ValueError, match="global_batch 8 does not split evenly over 3"):
        data.batch_rows(0, 0, 50, 8, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        data.batch_rows(0, 0, 50, 8, process_index=4, process_count=4)
