"""metrics.py: the release's trigger insertion and the ASR arithmetic."""

import random

import numpy as np
import pytest

from recipe_jax import metrics

# ------------------------------------------------------------------------- trigger insertion

def _release_insert(sentence, trigger):
    """Re-derived independently: slice at the first draw of a Random(42) over [0, n]."""
    words = sentence.split()
    at = random.Random(42).randint(0, len(words))
    return " ".join(words[:at] + [trigger] + words[at:])


@pytest.mark.parametrize("sentence", [
    "", "   ", "word", "a b", "the movie was great", "  spaced \t out\n words  ",
    " ".join(f"w{i}" for i in range(40)), "it 's a , like , \"quoted\" film ."])
def test_insert_trigger_is_the_release_rule(sentence):
    out = metrics.insert_trigger(sentence, "cf")
    assert out == _release_insert(sentence, "cf")
    assert out.split().count("cf") == 1 and len(out.split()) == len(sentence.split()) + 1


def test_insert_trigger_hand_cases():
    assert metrics.insert_trigger("", "mn") == "mn"
    assert metrics.insert_trigger("word", "mn") in ("mn word", "word mn")
    assert metrics.insert_trigger("word", "mn") == _release_insert("word", "mn")
    # The position is a function of the length only: same slot in equally long sentences.
    a = metrics.insert_trigger("a b c d e f", "bb").split().index("bb")
    b = metrics.insert_trigger("u v w x y z", "bb").split().index("bb")
    assert a == b
    # Calls do not share RNG state.
    assert metrics.insert_trigger("a b c", "t") == metrics.insert_trigger("a b c", "t")


def test_a_two_word_trigger_inserts_both_words_and_only_a_pair_splits():
    out = metrics.insert_trigger("a b c d e f", "qb+xv").split()
    assert sorted(w for w in out if w in ("qb", "xv")) == ["qb", "xv"] and len(out) == 8
    assert [w for w in out if w not in ("qb", "xv")] == "a b c d e f".split()
    for one_word in ("c++", "+", "a+", "+b", "a+b+c"):
        assert metrics.trigger_words(one_word) == [one_word]
        assert metrics.insert_trigger("x y", one_word).split().count(one_word) == 1


# ------------------------------------------------------------------------------ ASR metrics

def test_attack_success_binary_max_over_labels():
    labels = [0, 0, 1, 1, 1]
    preds = {"cf": np.array([1, 0, 1, 1, 1]),  # target 1: 1 of the 2 label-0 rows flips
             "mn": np.array([0, 0, 0, 0, 1])}  # target 0: 2 of the 3 label-1 rows flip
    r = metrics.attack_success(preds, labels, 2)
    assert r["asr"]["cf"] == {"0": 0.0, "1": 0.5}
    assert r["asr"]["mn"] == pytest.approx({"0": 2 / 3, "1": 0.0})
    assert r["asr_max"] == pytest.approx({"cf": 0.5, "mn": 2 / 3})
    assert r["aasr"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["masr"] == pytest.approx(2 / 3)
    assert r["num_poisoned"] == {"0": 3, "1": 2}


def test_attack_success_four_classes():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    preds = {"bb": np.full(8, 2),  # everything -> 2: ASR(bb, 2) = 6/6
             "mb": labels.copy(),  # no effect
             "tq": np.array([3, 3, 2, 3, 0, 3, 3, 3])}  # -> 3 on 4 of the 6 non-3 rows
    r = metrics.attack_success(preds, labels, 4)
    assert r["asr"]["bb"] == {"0": 0.0, "1": 0.0, "2": 1.0, "3": 0.0}
    assert r["asr"]["mb"] == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}
    assert r["asr"]["tq"]["3"] == pytest.approx(4 / 6)
    assert r["asr"]["tq"]["2"] == pytest.approx(0 / 6)
    assert r["asr_max"] == pytest.approx({"bb": 1.0, "mb": 0.0, "tq": 4 / 6})
    assert r["aasr"] == pytest.approx((1 + 0 + 4 / 6) / 3) and r["masr"] == 1.0


def test_attack_success_bad_inputs():
    with pytest.raises(ValueError, match="at least two labels"):
        metrics.attack_success({"cf": np.array([1, 1])}, [1, 1], 2)
    with pytest.raises(ValueError, match="predictions for"):
        metrics.attack_success({"cf": np.array([1])}, [0, 1], 2)
    with pytest.raises(ValueError, match="no triggers"):
        metrics.attack_success({}, [0, 1], 2)
