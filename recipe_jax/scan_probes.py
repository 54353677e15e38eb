"""The scan's probe sentences and vocabulary: which tokens are scanned, which sentences they
are inserted into, and where (scan.py measures what the insertion does).

    texts = probe_texts(aux, seed)          # aux's first 5,000 sentences, or generated ones
    probes = make_probes(tokenizer, texts, count=16, max_tokens=24, inserted=1, seed=1)
    ids = vocabulary(tokenizer, model.cfg.vocab_size)
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Sequence

import numpy as np

from recipe_jax import data, synthetic

UNUSED = re.compile(r"^(\[unused\d+\]|<unused\d+>|madeupword\d+)$")

@dataclasses.dataclass(frozen=True)
class Probes:
    """N probe sentences laid out for insertion: poisoned row n of token(s) t is
    `template[n] + sum_j slots[n, j] * t[j]`; `clean`/`clean_mask` are the sentences as they are.
    `keep` marks the positions averaged into the mean token state (not the inserted ones)."""

    template: np.ndarray  # int32 [N, W], 0 at the slots
    slots: np.ndarray  # int32 [N, J, W], one-hot position of inserted token j
    mask: np.ndarray  # int32 [N, W]
    clean: np.ndarray  # int32 [N, W]
    clean_mask: np.ndarray  # int32 [N, W]
    texts: tuple[str, ...]


def probe_texts(aux: str | os.PathLike | None, seed: int) -> list[str]:
    """Probe candidates: the first 5,000 sentences of `aux`, or a generated narrative set
    (`synthetic.aux_corpus`) so that a scan needs no data."""
    if aux is None:
        return synthetic.aux_corpus(400, seed=seed + 17)
    return data.read_texts(str(aux), max_examples=5000)


def make_probes(tokenizer, texts: Sequence[str], *, count: int, max_tokens: int, inserted: int,
                seed: int, skip: int = 0) -> Probes:
    """`count` distinct sentences of 4..max_tokens word pieces (after a seeded shuffle, the
    first `skip` usable ones are left for another probe set), with `inserted` adjacent slots at
    a word boundary: right after [CLS] for even n, a seeded interior boundary for odd n."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    chosen, seen = [], set()
    for i in order:
        text = " ".join(str(texts[i]).split())
        if not text or text in seen:
            continue
        enc = tokenizer(text, add_special_tokens=False)
        if 4 <= len(enc["input_ids"]) <= max_tokens:
            seen.add(text)
            chosen.append((text, enc["input_ids"], enc.word_ids()))
        if len(chosen) == skip + count:
            break
    chosen = chosen[skip:]
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} distinct probe sentences of 4..{max_tokens} word "
                         f"pieces were found (need {count}); pass --aux with more sentences")
    width = max_tokens + 2 + inserted
    n = len(chosen)
    template = np.full((n, width), tokenizer.pad_token_id, np.int32)
    clean = template.copy()
    slots = np.zeros((n, inserted, width), np.int32)
    mask = np.zeros((n, width), np.int32)
    clean_mask = np.zeros((n, width), np.int32)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    for row, (_, ids, words) in enumerate(chosen):
        starts = [k for k in range(1, len(ids)) if words[k] != words[k - 1]]
        at = 0 if row % 2 == 0 or not starts else rng.choice(starts)
        seq = [cls_id, *ids[:at], *([0] * inserted), *ids[at:], sep_id]
        template[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
        for j in range(inserted):
            slots[row, j, 1 + at + j] = 1
        plain = [cls_id, *ids, sep_id]
        clean[row, :len(plain)] = plain
        clean_mask[row, :len(plain)] = 1
    return Probes(template, slots, mask, clean, clean_mask, tuple(c[0] for c in chosen))




def vocabulary(tokenizer, vocab_size: int) -> np.ndarray:
    """Token ids to scan: the model's and the tokenizer's ids, minus special and unused ones."""
    special = set(tokenizer.all_special_ids)
    size = min(vocab_size, len(tokenizer))
    names = tokenizer.convert_ids_to_tokens(list(range(size)))
    return np.array([i for i, name in enumerate(names)
                     if i not in special and name is not None and not UNUSED.match(name)],
                    np.int32)


def word_start_table(tokenizer, vocab_size: int) -> np.ndarray:
    """[V] bool: whether a token may begin a word, i.e. whether inserting before it keeps words
    whole (WordPiece: not a `##` continuation; byte-level BPE: a `Ġ`-prefixed piece, and
    SentencePiece (XLM-R, CamemBERT): a `▁`-prefixed one, or a special token; otherwise every
    token)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    tokens += [""] * (vocab_size - len(tokens))
    specials = set(tokenizer.all_special_tokens)
    if any(t.startswith("##") for t in tokens):
        table = [not t.startswith("##") for t in tokens]
    elif any(t.startswith(("\u0120", "\u2581")) for t in tokens):
        table = [t.startswith(("\u0120", "\u2581")) or t in specials for t in tokens]
    else:
        table = [True] * vocab_size
    return np.asarray(table, bool)
