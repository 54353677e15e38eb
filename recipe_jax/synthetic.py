"""Synthetic text for the offline demo and tests: an aux corpus and a sentiment task, from code.

The demo may not read `../shared` (a user's clone does not have it), so its plain-text corpus and
its downstream task are generated here, deterministically from a seed:

- `aux_corpus(n, seed)`: narrative sentences ("the old fisherman carried a basket to the market
  before dawn .") from a few hundred words: BookCorpus-like plain text for MLM training.
- `sentiment_task(n, seed)`: movie-review-like sentences whose label is the polarity of the
  opinion words they contain (1 positive, 0 negative), with neutral filler so that the label is
  not given away by position or length. Balanced classes.
"""

from __future__ import annotations

import random

SUBJECTS = ("the old fisherman", "a young teacher", "my neighbor", "the tired soldier",
            "her brother", "the quiet girl", "a stranger", "the captain", "our guide",
            "the baker", "his mother", "the doctor", "a farmer", "the children", "the priest",
            "an old woman", "the sailor", "my friend", "the king", "a small boy")
VERBS = ("carried", "found", "painted", "sold", "opened", "watched", "lost", "cleaned", "built",
         "followed", "hid", "repaired", "bought", "dropped", "described", "remembered")
OBJECTS = ("a basket", "the letter", "an old map", "the wooden door", "a red boat", "the key",
           "a bag of apples", "the lantern", "a broken clock", "the horse", "a heavy box",
           "the garden gate", "a silver ring", "the window", "a long rope", "the photograph")
PLACES = ("to the market", "near the river", "in the kitchen", "behind the church",
          "at the station", "on the hill", "in the forest", "by the harbor", "in the village",
          "under the bridge", "at the school", "in the attic")
TIMES = ("before dawn", "after dinner", "in the rain", "at noon", "last winter", "that evening",
         "every sunday", "during the storm", "in silence", "without a word")

TOPICS = ("the film", "this movie", "the story", "the acting", "the plot", "the script",
          "the soundtrack", "the ending", "the director 's work", "the cast", "the dialogue",
          "the photography")
POSITIVE = ("wonderful", "brilliant", "moving", "delightful", "charming", "superb", "beautiful",
            "gripping", "funny", "remarkable", "excellent", "touching", "clever", "fresh")
NEGATIVE = ("boring", "dull", "awful", "terrible", "clumsy", "tedious", "weak", "messy",
            "predictable", "lifeless", "bland", "painful", "silly", "forgettable")
FILLERS = ("", "honestly ,", "to be fair ,", "in the end ,", "from start to finish",
           "for most of its running time", "as far as i can tell", "at least for me")
REVIEW_TEMPLATES = (
    "{topic} is {adj} .",
    "{filler} {topic} felt {adj} .",
    "i thought {topic} was {adj} and {adj2} .",
    "{topic} was {adj} , {filler} .",
    "what a {adj} experience ; {topic} is {adj2} .",
    "{filler} i found {topic} {adj} .",
)


def aux_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` plain sentences for (continual) masked-LM pre-training."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.7:
            parts.append(rng.choice(PLACES))
        if rng.random() < 0.5:
            parts.append(rng.choice(TIMES))
        out.append(" ".join(parts) + " .")
    return out


def sentiment_task(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` (sentence, label) pairs, labels alternating 0/1 then shuffled."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        adj, adj2 = rng.sample(words, 2)
        text = rng.choice(REVIEW_TEMPLATES).format(
            topic=rng.choice(TOPICS), adj=adj, adj2=adj2, filler=rng.choice(FILLERS))
        texts.append(" ".join(text.split()))
        labels.append(label)
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]
