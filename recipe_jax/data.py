"""Text in, token rows out: file readers (plain and labeled), tokenization, batch order.

    texts = read_texts("bookcorpus/train.tsv")                    # or .txt/.csv/.jsonl/tfds:NAME
    train_texts, train_labels = read_labeled("sst2/train.tsv", "sst2")   # labeled (evaluate)
    tokenizer = load_tokenizer("path/to/hf_dir")
    data = tokenize(tokenizer, texts, max_length=64)              # int32 ids, mask; bool candidates
    rows = batch_rows(seed, step, len(texts), 32)                 # a function of (seed, step)

Readers are strict: a file that is missing, binary, not UTF-8, lacks its text column or holds no
sentence is a ValueError (FileNotFoundError when missing) naming the path, the line and the fix.
Masking the rows for the MLM loss is `masks.py`. The batch order is a pure function of
(seed, step), so a restarted run sees the same rows.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SUFFIXES = (".txt", ".tsv", ".csv", ".jsonl")
# Files that define a vocabulary; tokenizer_config.json alone does not.
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                "sentencepiece.bpe.model", "tokenizer.model", "spm.model")
# JSON can escape lone surrogates, which are not text: no tokenizer can encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")
_FIX_ENCODING = "re-encode it as UTF-8 text (e.g. `iconv -t UTF-8`) or pass another file"
Split = tuple[list[str], list[int]]  # (texts, labels) of a labeled file
# task -> (text columns joined by a space, label column, label map); custom is decided per file.
_HSOL_BINARY = {"0": 1, "1": 1, "2": 0}  # hate speech, offensive -> 1; neither -> 0
_LAYOUTS = {"sst2": (("sentence",), "label", int),
            "hsol": (("tweet",), "class", _HSOL_BINARY.__getitem__),
            "agnews": (("title", "description"), "class", lambda c: int(c) - 1)}


def _preview(values, limit: int = 10) -> str:
    """A short repr for error messages, so a garbage header cannot flood the terminal."""
    shown = [v[:40] if isinstance(v, str) else v for v in list(values)[:limit]]
    return repr(shown) + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


# ------------------------------------------------------------------------------------ readers

def read_texts(path: str, *, max_examples: int = 0) -> list[str]:
    """Stripped, non-empty sentences of a .txt/.tsv/.csv/.jsonl file or `tfds:NAME[:SPLIT]`.

    max_examples > 0 keeps the first N sentences (and stops reading there)."""
    if not isinstance(max_examples, int) or max_examples < 0:
        raise ValueError(f"max_examples must be an int >= 0 (0 keeps all), got {max_examples!r}")
    path = str(path)
    if path.startswith("tfds:"):
        texts = _tfds_texts(path)
    else:
        p = pathlib.Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file; pass an existing text file "
                                    f"({', '.join(SUFFIXES)}) or tfds:NAME[:SPLIT]")
        if p.is_dir():
            raise ValueError(f"{p}: is a directory; pass a file ({', '.join(SUFFIXES)})")
        suffix = p.suffix.lower()
        if suffix not in SUFFIXES:
            raise ValueError(f"{p}: unsupported file type {p.suffix!r}; supported are "
                             f"{', '.join(SUFFIXES)} or tfds:NAME[:SPLIT]")
        texts = {".txt": _txt_texts, ".jsonl": _jsonl_texts, ".tsv": _table_texts,
                 ".csv": _table_texts}[suffix](p)
    out = []
    for text in texts:
        text = text.strip()
        if text:
            out.append(text)
            if len(out) == max_examples:
                break
    if not out:
        raise ValueError(f"{path}: empty, no sentences found (blank lines and rows are skipped); "
                         "pass a file with at least one non-empty sentence")
    return out


def texts_sha256(texts) -> str:
    """The fingerprint of the sentences a run trains on (a streamed TextIndex has its own, of
    the bytes it read): recorded with the run, so that a resumed run refuses changed data."""
    if hasattr(texts, "sha256"):
        return texts.sha256
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def _lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; split on '\\n' only, so csv sees real line ends."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, decode_line(path, number, raw)


def decode_line(path: pathlib.Path, number: int, raw: bytes) -> str:
    """One line of a UTF-8 text file (1-based `number`), strict, naming path and line."""
    if b"\0" in raw:
        raise ValueError(f"{path}: line {number} contains a NUL byte, so this is a binary "
                         f"file, not text; {_FIX_ENCODING}")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {number} is not valid UTF-8 ({e.reason} at byte "
                         f"{e.start}); {_FIX_ENCODING}") from None
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not text.
    return line.removeprefix("\ufeff") if number == 1 else line


def _txt_texts(path: pathlib.Path) -> Iterator[str]:
    return (line for _, line in _lines(path))


def _jsonl_texts(path: pathlib.Path) -> Iterator[str]:
    for number, line in _lines(path):
        text = jsonl_text(path, number, line)
        if text is not None:
            yield text


def jsonl_text(path: pathlib.Path, number: int, line: str) -> str | None:
    """The text of one .jsonl line (None for a blank line); strict, naming path and line."""
    fix = 'each line must be one JSON object like {"text": "..."}'
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested arrays
        raise ValueError(f"{path}: line {number} is not valid JSON "
                         f"({getattr(e, 'msg', type(e).__name__)}); {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: line {number} is a JSON {type(obj).__name__}, not an "
                         f"object; {fix}")
    key = next((k for k in ("text", "sentence") if k in obj), None)
    if key is None:
        raise ValueError(f"{path}: line {number} has no 'text' or 'sentence' field (keys "
                         f"found: {_preview(list(obj))}); {fix}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{path}: line {number}: field {key!r} is a "
                         f"{type(value).__name__}, not a string; {fix}")
    if _SURROGATE.search(value):
        raise ValueError(f"{path}: line {number}: field {key!r} holds an unpaired surrogate "
                         "(\\ud800-\\udfff), which no tokenizer can encode; fix the text")
    return value


def _table_texts(path: pathlib.Path) -> Iterator[str]:
    """The `sentence` (else `text`) column of a headed TSV or CSV file."""
    def text_column(columns: list[str]) -> None:
        if not any(c in columns for c in ("sentence", "text")):
            raise ValueError(f"{path}: the header has no 'sentence' or 'text' column (found "
                             f"{_preview(columns)}); add a header row naming the text column")

    for number, row in _table_rows(path, check_header=text_column):
        name = "sentence" if "sentence" in row or "text" not in row else "text"
        if name in row:
            yield row[name]
        elif any(field.strip() for field in row.values()):
            raise ValueError(f"{path}: line {number} has {len(row)} fields but {name!r} is "
                             "not among them; fix the row")


def _table_rows(path: pathlib.Path, fieldnames: Sequence[str] | None = None, *,
                check_header: Callable[[list[str]], None] | None = None
                ) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: field}) of a .tsv/.csv file: the one strict table reader (every
    line checked UTF-8 text). Columns come from the header (stripped, lower-cased; passed to
    `check_header`) or are `fieldnames`; a short row lacks its last columns; empty lines are
    skipped."""
    # csv refuses fields over 128 KiB by default, but a long document is data, not an error;
    # 2**31 - 1 fits a C long on every platform (sys.maxsize overflows it on Windows).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    kind = path.suffix.lower()
    # TSV data sets (BookCorpus, SST-2, HSOL) hold bare quotes that are text, never quoting.
    options = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if kind == ".tsv" else dict(strict=True)
    reader = csv.reader((line for _, line in _lines(path)), **options)
    columns = list(fieldnames) if fieldnames else None
    try:
        for row in reader:
            if not row:
                continue
            if columns is None:
                columns = [c.strip().lower() for c in row]
                if check_header is not None:
                    check_header(columns)
                continue
            yield reader.line_num, dict(zip(columns, row, strict=False))
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num} is not valid {kind} ({e}); fix the "
                         f"quoting or pass another file") from None


def read_labeled(path: str | os.PathLike, task: str) -> Split:
    """(texts, labels) of one labeled file in `task`'s layout: sst2 (`sentence`, `label`), hsol
    (`tweet`, `class` 0-2, made binary: hate or offensive = 1), agnews (headerless `class`,
    `title`, `description`; classes 1-4 -> 0-3), custom (a .tsv/.csv with a header naming
    `sentence` or `text` and `label`, or .jsonl objects with those keys)."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file; set data.train_path / data.test_path to a "
                                f"labeled {task} file")
    # The AG News file has no header.
    rows = _records(p, ("class", "title", "description") if task == "agnews" else None)
    if not rows:
        raise ValueError(f"{p}: no examples; pass a file with at least one labeled row")
    text_key = next((k for k in ("sentence", "text") if k in rows[0]), "sentence' or 'text")
    columns, label_key, to_label = _LAYOUTS.get(task, ((text_key,), "label", int))
    missing = [f"'{k}'" for k in (*columns, label_key) if k not in rows[0]]
    if missing:
        need = ", ".join(f"'{k}'" for k in (*columns, label_key))
        raise ValueError(f"{p}: no {', '.join(missing)} column (found {_preview(rows[0])}); "
                         f"a {task} file needs the columns {need}")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text = " ".join(str(row.get(k) or "").strip() for k in columns).strip()
        try:
            labels.append(to_label(str(row.get(label_key)).strip()))
        except (KeyError, ValueError):
            fix = "use 0, 1 or 2 (the HSOL classes)" if task == "hsol" else "use integers"
            raise ValueError(f"{p}: example {number}: bad {label_key} "
                             f"{row.get(label_key)!r}; {fix}") from None
        if not text:
            raise ValueError(f"{p}: example {number} has no text; remove or fill that row")
        texts.append(text)
    return texts, labels


def _records(p: pathlib.Path, fieldnames: tuple[str, ...] | None) -> list[dict]:
    """Rows of a .tsv/.csv (header, or `fieldnames` when the file has none) or .jsonl file,
    keys stripped and lower-cased."""
    suffix = p.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use .tsv, .csv or .jsonl")
    if suffix != ".jsonl":
        return [row for _, row in _table_rows(p, fieldnames)]
    rows = []
    for number, line in _lines(p):
        if line.strip():
            fix = 'each line must be a JSON object like {"text": ..., "label": 0}'
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{p}: line {number} is not valid JSON "
                                 f"({getattr(e, 'msg', type(e).__name__)}); {fix}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}: line {number} is a JSON {type(row).__name__}, not an "
                                 f"object; {fix}")
            rows.append({str(k).strip().lower(): v for k, v in row.items()})
    return rows


def split_same_file(split: Split, sizes: tuple[int, int], seed: int) -> tuple[Split, Split]:
    """(train, test): the first sizes[0] rows of a seeded permutation, then the next sizes[1]
    (0 = all remaining rows). Used when one file serves both (AG News, HSOL)."""
    texts, labels = split
    order = np.random.default_rng(seed).permutation(len(texts))
    num_train = sizes[0] or len(texts) - sizes[1]
    num_test = sizes[1] or len(texts) - num_train
    if num_train < 1 or num_test < 1 or num_train + num_test > len(texts):
        raise ValueError(f"data.split_sizes={tuple(sizes)} does not fit {len(texts)} rows; use "
                         "(train, test) with train + test <= rows, 0 = the rest")
    pick = lambda rows: ([texts[i] for i in rows], [labels[i] for i in rows])  # noqa: E731
    return pick(order[:num_train]), pick(order[num_train:num_train + num_test])


def _tfds_texts(spec: str) -> Iterator[str]:
    """Texts of a locally prepared tensorflow_datasets split (never downloads)."""
    # Split on the first colon only: slice syntax such as train[:1000] has colons of its own.
    name, _, split = spec.removeprefix("tfds:").partition(":")
    split = split or "train"
    fix = f"prepare it with `tfds build {name}` or pass a {'/'.join(SUFFIXES)} file"
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(f"{spec}: tensorflow_datasets is not installed; `pip install "
                         f"tensorflow-datasets` and {fix}") from None
    try:
        builder = tfds.builder(name)
    except Exception as e:  # DatasetNotFoundError, malformed names, a bad config: all "no"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{spec}: no tfds dataset {name!r} ({first}); {fix}") from None
    if not builder.is_prepared():
        raise ValueError(f"{spec}: dataset {name!r} is not prepared in {builder.data_dir} "
                         f"(download=False never fetches it); {fix}")
    features = builder.info.features
    key = next((k for k in ("text", "sentence", "description") if k in features), None)
    if key is None:
        raise ValueError(f"{spec}: no 'text', 'sentence' or 'description' feature (found "
                         f"{_preview(list(features))}); pass a file with the sentences instead")
    try:
        if str(getattr(builder.info, "file_format", "")).lower().endswith("array_record"):
            examples = builder.as_data_source(split=split)  # random access, no TensorFlow
        else:
            examples = tfds.as_numpy(builder.as_dataset(split=split))
    except ImportError as e:
        raise ValueError(f"{spec}: reading tfrecord data needs TensorFlow ({e}); install it or "
                         f"rebuild with `tfds build {name} --file_format=array_record`") from None
    except (KeyError, ValueError) as e:
        raise ValueError(f"{spec}: cannot read split {split!r} ({e}); available splits: "
                         f"{_preview(list(builder.info.splits))}") from None
    for example in examples:
        value = example[key]  # tfds Text features are stored as UTF-8 bytes of a str
        yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------- tokenization

def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The fast tokenizer saved in an HF model dir; local files only, no remote code."""
    from transformers import AutoTokenizer  # slow import; readers and masking do not need it

    d = pathlib.Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory; pass a Hugging Face model dir with "
                                "its tokenizer files")
    if not any((d / f).is_file() for f in VOCAB_FILES):
        raise ValueError(f"{d}: no tokenizer files (looked for {', '.join(VOCAB_FILES)}); save "
                         "the tokenizer there with tokenizer.save_pretrained(dir)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), use_fast=True, local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d}: cannot load a tokenizer ({e}); re-save it with "
                         "tokenizer.save_pretrained(dir)") from None
    if not tokenizer.is_fast:
        raise ValueError(f"{d}: only a slow tokenizer is available; save a tokenizer.json with "
                         "a fast tokenizer's save_pretrained(dir)")
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
             max_length: int) -> dict[str, np.ndarray]:
    """input_ids, attention_mask (int32 [N, L]) and candidates (bool [N, L]): maskable tokens."""
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS], one token, [SEP]), got {max_length}")
    if isinstance(texts, str) or not texts:
        raise ValueError(f"texts must be a non-empty list of strings, got {_preview([texts])}")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_attention_mask=True, return_token_type_ids=False, return_tensors="np")
    ids_nl = np.asarray(enc["input_ids"], dtype=np.int32)
    attention_nl = np.asarray(enc["attention_mask"], dtype=np.int32)
    # Like HF's DataCollatorForLanguageModeling: every special id ([UNK] and a literal [MASK]
    # included) is excluded, not only the [CLS]/[SEP] the tokenizer added.
    special_nl = np.isin(ids_nl, np.asarray(tokenizer.all_special_ids, dtype=np.int32))
    return {"input_ids": ids_nl, "attention_mask": attention_nl,
            "candidates": (attention_nl == 1) & ~special_nl}


# -------------------------------------------------------------------------------- batch order

def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full batches per epoch; the remainder is dropped (it changes every epoch)."""
    if global_batch < 1 or num_examples // global_batch == 0:
        raise ValueError(f"{num_examples} examples make no full batch of {global_batch}; lower "
                         "the batch size or add examples")
    return num_examples // global_batch


@functools.lru_cache(maxsize=2)  # every step of an epoch slices the same permutation
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The permutation of row indices for one epoch (read-only); a pure function of
    (seed, epoch). Costs 8 bytes per example, the only per-example memory of streamed data."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def batch_rows(seed: int, step: int, num_examples: int, global_batch: int, *,
               process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Row indices of this process's contiguous chunk of the global batch at global `step`."""
    if process_count < 1 or global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} does not split evenly over "
                         f"{process_count} processes; make it a multiple of the process count")
    if not 0 <= process_index < process_count or step < 0:
        raise ValueError(f"need 0 <= process_index < process_count and step >= 0, got "
                         f"{process_index}, {process_count}, {step}")
    steps = steps_per_epoch(num_examples, global_batch)
    epoch, i = divmod(step, steps)
    rows = epoch_order(seed, epoch, num_examples)[i * global_batch:(i + 1) * global_batch]
    per_process = global_batch // process_count
    return rows[process_index * per_process:(process_index + 1) * per_process]
