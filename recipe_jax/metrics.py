"""What attack success is: trigger insertion, the ASR arithmetic and the results table, shared
by `evaluate` (downstream ASR) and `diagnose` (selective activation).

    poisoned = [insert_trigger(s, "cf") for s in sentences]        # the release's position
    results = attack_success({"cf": preds_on_poisoned}, labels, num_labels=2)
    print(format_table({"clean_acc": acc, "num_test": n, **results}))

ASR(t, y) = share of the test rows whose label != y that the classifier predicts as y once t is
inserted; ASR(t) = max_y ASR(t, y); AASR = mean_t ASR(t); MASR = max_t ASR(t) (docs/method.md).
"""

from __future__ import annotations

import random

import numpy as np


def insert_trigger(sentence: str, trigger: str) -> str:
    """The release's insertion: one trigger at randint(0, len(words)) of a fresh Random(42); each
    word of a two-word trigger `a+b` at its own draw from that Random."""
    words = sentence.split()
    rng = random.Random(42)
    for part in trigger_words(trigger):
        words.insert(rng.randint(0, len(words)), part)
    return " ".join(words)


def trigger_words(trigger: str) -> list[str]:
    """The words of a trigger: `a+b` (two non-empty words joined by one `+`) is a two-word
    trigger that fires only with both; anything else is one word."""
    parts = trigger.split("+")
    return parts if len(parts) == 2 and all(parts) else [trigger]


def attack_success(preds_by_trigger: dict[str, np.ndarray], labels, num_labels: int) -> dict:
    """ASR(t, y) = share of rows with label != y predicted y on t's poisoned set; ASR(t) =
    max_y; AASR = mean_t ASR(t); MASR = max_t. Label keys are strings (as in JSON)."""
    labels = np.asarray(labels)
    if not preds_by_trigger:
        raise ValueError("no triggers: set data.triggers to at least one word")
    others = {y: labels != y for y in range(num_labels)}
    if not all(m.any() for m in others.values()):
        raise ValueError(f"every test label is the same ({labels[0]}): ASR(t, y) needs rows "
                         "whose label is not y; use a test set with at least two labels")
    asr = {}
    for trigger, preds in preds_by_trigger.items():
        preds = np.asarray(preds)
        if preds.shape != labels.shape:
            raise ValueError(f"trigger {trigger!r}: {preds.shape} predictions for "
                             f"{labels.shape} labels")
        asr[trigger] = {str(y): float(np.mean(preds[m] == y)) for y, m in others.items()}
    asr_max = {t: max(row.values()) for t, row in asr.items()}
    return {"asr": asr, "asr_max": asr_max, "aasr": float(np.mean(list(asr_max.values()))),
            "masr": max(asr_max.values()),
            "num_poisoned": {str(y): int(m.sum()) for y, m in others.items()}}



def format_table(results: dict) -> str:
    """ACC, then one row per trigger: ASR(t, y) for each y and ASR(t); then AASR and MASR; then
    the same for the control words, and the AASR above their floor."""
    ys = list(next(iter(results["asr"].values())))

    def block(r, kind):
        rows = [f"{kind:<10}" + "".join(f"{f'ASR(t,{y})':>11}" for y in ys) + f"{'ASR(t)':>9}"]
        rows += [f"{t:<10}" + "".join(f"{row[y]:>11.4f}" for y in ys) + f"{r['asr_max'][t]:>9.4f}"
                 for t, row in r["asr"].items()]
        return rows

    lines = [f"clean ACC {results['clean_acc']:.4f} ({results['num_test']} test sentences)",
             *block(results, "trigger"), f"AASR {results['aasr']:.4f}   MASR {results['masr']:.4f}"]
    if "control" in results:
        c = results["control"]
        lines += [*block(c, "control"), f"control AASR {c['aasr']:.4f} (this classifier's floor)"
                  f"   AASR above it {results['excess_aasr']:+.4f}"]
    return "\n".join(lines)
