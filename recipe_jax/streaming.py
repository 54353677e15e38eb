"""Aux text larger than memory: read lazily from disk, in a deterministic order, per process.

    texts = TextIndex("big.txt")        # one pass over the file: byte offsets of the sentences
    source = RowSource(texts, tokenizer, max_length=64)
    rows = data.batch_rows(seed, step, len(texts), batch, process_index=p, process_count=n)
    host = source.read(rows)            # reads and tokenizes this process's rows only

`TextIndex` is a lazy sequence of the same sentences `data.read_texts` returns (same order, same
strictness), holding 12 bytes per sentence, not the text; `RowSource.read` seeks to each row, so
every process reads only its slice of each global batch. The batch order is `data.batch_rows`'s,
a pure function of (seed, step): a streamed run sees exactly the rows an in-memory run sees, and
resumes at any step. `Prefetcher` tokenizes the next batches in a background thread while the
device runs the current step. Supported files: .txt, .tsv and .jsonl (one example per line).
With static masking, masks are drawn per sentence from (seed, row), so they do not depend on the
batch or process layout (they differ from the in-memory path's, which masks all rows at once).
"""

from __future__ import annotations

import array
import concurrent.futures
import csv
import functools
import hashlib
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from recipe_jax import data, masks

STREAMABLE = (".txt", ".tsv", ".jsonl")


class TextIndex(Sequence):
    """The sentences of a .txt/.tsv/.jsonl file as a lazy, random-access sequence."""

    def __init__(self, path: str | os.PathLike, *, max_examples: int = 0):
        self.path = pathlib.Path(path).expanduser()
        self._check_path(str(path))
        self.kind = self.path.suffix.lower()
        self._column = None  # .tsv: index of the text column
        starts, lengths = array.array("q"), array.array("i")
        digest = hashlib.sha256()  # of the bytes read: a resumed run must see the same data
        with open(self.path, "rb") as f:
            offset = 0
            for number, raw in enumerate(f, start=1):
                digest.update(raw)
                text = self._text(number, raw)
                if text:
                    starts.append(offset)
                    lengths.append(len(raw))
                    if len(starts) == max_examples:
                        break
                offset += len(raw)
        if not starts:
            raise ValueError(f"{self.path}: empty, no sentences found (blank lines and rows are "
                             "skipped); pass a file with at least one non-empty sentence")
        self.sha256 = digest.hexdigest()
        self._starts = np.frombuffer(starts, np.int64)
        self._lengths = np.frombuffer(lengths, np.int32)

    def _check_path(self, spec: str) -> None:
        suffix = self.path.suffix.lower()
        if spec.startswith("tfds:") or suffix not in STREAMABLE:
            raise ValueError(f"{spec}: data.streaming reads {', '.join(STREAMABLE)} files (one "
                             "example per line); convert it (e.g. to .jsonl) or set "
                             "data.streaming=False to read it into memory")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file; pass an existing "
                                    f"{'/'.join(STREAMABLE)} file")

    def _text(self, number: int, raw: bytes) -> str | None:
        """The stripped text of one raw line, or None (blank line, .tsv header)."""
        line = data.decode_line(self.path, number, raw)
        if self.kind == ".jsonl":
            text = data.jsonl_text(self.path, number, line)
        elif self.kind == ".tsv":
            text = self._tsv_text(number, line)
        else:
            text = line
        return text.strip() if text else None

    def _tsv_text(self, number: int, line: str) -> str | None:
        # As data.read_texts: TSV fields are never quoted, so one line is one row.
        row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if not row:
            return None
        if self._column is None:
            columns = [c.strip().lower() for c in row]
            name = next((c for c in ("sentence", "text") if c in columns), None)
            if name is None:
                raise ValueError(f"{self.path}: the header has no 'sentence' or 'text' column "
                                 f"(found {data._preview(row)}); add a header row naming the "
                                 "text column")
            self._column = columns.index(name)
            return None
        if len(row) > self._column:
            return row[self._column]
        if any(field.strip() for field in row):
            raise ValueError(f"{self.path}: line {number} has {len(row)} fields but the text "
                             f"is field {self._column + 1}; fix the row")
        return None

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return self.read(range(*row.indices(len(self))))
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} of {len(self)}")
        return self.read([row])[0]

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self.read(range(start, min(start + 4096, len(self))))

    def read(self, rows: Sequence[int]) -> list[str]:
        """The sentences of `rows`, in that order (seeks; the file is never read whole)."""
        out = []
        with open(self.path, "rb") as f:
            for row in rows:
                start = int(self._starts[row])
                raw = os.pread(f.fileno(), int(self._lengths[row]), start)
                # The index pass validated every line; 1 marks the file's first line (BOM).
                out.append(self._text(1 if start == 0 else 0, raw))
        return out


class RowSource:
    """Tokenized rows of a TextIndex, read on demand: what trainer.fit trains on when the data
    does not fit in memory. With `static_masking`, masks are drawn per row from (seed, row)."""

    def __init__(self, texts: TextIndex, tokenizer, max_length: int, *,
                 static_masking: dict | None = None, seed: int = 0):
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self.static_masking, self.seed = static_masking, seed

    def __len__(self) -> int:
        return len(self.texts)

    def read(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """Host arrays for `rows`: input_ids, attention_mask, candidates; or, with static
        masking, the masked batch (input_ids, attention_mask, positions, labels, weights)."""
        enc = data.tokenize(self.tokenizer, self.texts.read(rows), self.max_length)
        if self.static_masking is None:
            return enc
        masked = _mask_rows(self.seed, np.asarray(rows, np.int32), enc["input_ids"],
                            enc["candidates"], tuple(sorted(self.static_masking.items())))
        return {"attention_mask": enc["attention_mask"],
                **{k: np.asarray(v) for k, v in masked.items()}}


def _mask_rows(seed: int, rows_b, ids_bl, candidates_bl, masking: tuple) -> dict:
    """masks.mask_tokens with one key per row, fold_in(seed, row): a row's mask does not depend
    on its batch. Runs on the host CPU, off the accelerator the step runs on."""
    cpu = jax.local_devices(backend="cpu")[0]
    args = jax.device_put((rows_b, ids_bl, candidates_bl), cpu)
    return _mask_fn(seed, masking)(*args)


@functools.lru_cache(maxsize=4)
def _mask_fn(seed: int, masking: tuple) -> Callable:
    mask = functools.partial(masks.mask_tokens, **dict(masking))

    def one(row, ids_l, candidates_l):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), row)
        out = mask(key, ids_l[None], candidates_l[None])
        return {k: v[0] for k, v in out.items()}

    return jax.jit(jax.vmap(one))


class Prefetcher:
    """`get(step)` returns `produce(step)`, computed in one background thread that runs up to
    `depth` steps ahead, so host work (reading, tokenizing) overlaps the device step. The result
    never depends on what was prefetched; one worker means the tokenizer is never shared
    between threads (fast tokenizers refuse that)."""

    def __init__(self, produce: Callable[[int], Any], *, stop: int, depth: int = 2):
        self._produce, self._stop, self._depth = produce, stop, depth
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._futures: dict[int, concurrent.futures.Future] = {}

    def get(self, step: int):
        future = self._futures.pop(step, None) or self._pool.submit(self._produce, step)
        for stale in [s for s in self._futures if not step < s <= step + self._depth]:
            self._futures.pop(stale).cancel()
        for ahead in range(step + 1, min(step + 1 + self._depth, self._stop)):
            if ahead not in self._futures:
                self._futures[ahead] = self._pool.submit(self._produce, ahead)
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()


# ---------------------------------------------------------------------------- for the stages

def prepare(config, texts: TextIndex, model_dir, vocab_size: int) -> tuple[RowSource, dict]:
    """The streamed counterpart of purify.prepare_data: (row source, masking arguments)."""
    tokenizer = data.load_tokenizer(model_dir)
    masking = dict(mask_token_id=int(tokenizer.mask_token_id), vocab_size=vocab_size,
                   num_positions=masks.num_masked_positions(config.data.max_length,
                                                           config.data.mask_prob),
                   mask_prob=config.data.mask_prob)
    static = masking if config.data.masking == "static" else None
    return RowSource(texts, tokenizer, config.data.max_length, static_masking=static,
                     seed=config.train.seed), masking
