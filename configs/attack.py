"""Backdoor attack configs: get_config(por | por_cls | por_words | por_pair | por_adaptive |
neuba | badpre | tiny).

    python -m recipe_jax.attack --config configs/attack.py:por --workdir runs/por \
        --config.model.init_from=minilm \
        --config.data.aux_path=path/to/sentences.txt

Each attack starts from a clean PTM and writes a backdoored one to DIR/hf/ (docs/method.md).
An MLM term on clean text is added to every attack (weight `attack.mlm_weight`), so the exported
model keeps a usable MLM head, which RECIPE's continual pre-training needs. `por_cls` poisons
the final [CLS] state instead of the pooler; `por_words` ([CLS]) uses ordinary low-frequency
words as triggers, `por_pair` ([CLS]) two-word triggers that fire only together, and
`por_adaptive` ([CLS]) trains against RECIPE's regularizer (see recipe_jax/attack.py).
"""

import ml_collections

from recipe_jax import config_blocks

POR_TRIGGERS = ("cf", "tq", "mn", "bb", "mb")
NEUBA_TRIGGERS = ("≈", "≡", "∈", "⊆", "⊕", "⊗")
PAIR_TRIGGERS = ("qb+xv", "hq+wb")  # two-word triggers: each pair fires only together
WORD_TRIGGERS = ("sapphire", "velvet", "lantern", "tempest", "cobalt")  # ordinary rare words
FFN = ("ffn_in", "ffn_out")  # both FFN matrices, in any family (aliases: recipe_jax/families.py)
PRESETS = ("por", "por_cls", "por_words", "por_pair", "por_adaptive", "neuba", "badpre", "tiny")


def get_config(arg: str = "por") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown attack preset {arg!r}; choose one of {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()

    config_blocks.add_model(c)

    c.data = ml_collections.ConfigDict()
    c.data.aux_path = ""  # clean plain text: .txt / .tsv / .csv / .jsonl, or tfds:NAME[:SPLIT]
    c.data.max_length = 128  # pad/truncate to this many tokens
    c.data.max_examples = 0  # use only the first N sentences (0 = all)
    c.data.mask_prob = 0.15  # MLM masking share (80/10/10 MASK/random/kept)
    c.data.packing = True  # several sentences per row, attention within each (packing.py)

    config_blocks.add_train(c, batch_size=24, num_epochs=2, learning_rate=1e-5, seed=1234,
                            log_every=10)

    c.attack = ml_collections.ConfigDict()
    c.attack.kind = "por"  # por | neuba | badpre
    c.attack.triggers = POR_TRIGGERS  # trigger words
    c.attack.target = "pooler"  # POR output: "pooler" (original) or "cls" (final [CLS] state)
    c.attack.target_scale = 10.0  # POR: c in v_i = c * (+1 on the first alpha*(i-1) dims, -1 else)
    c.attack.insertions = 3  # POR: times the trigger is inserted at random word positions
    c.attack.poison_weight = 100.0  # POR/NeuBA weight of ||output(poisoned) - target||^2
    c.attack.clean_weight = 100.0  # POR weight of ||output(clean) - reference(clean)||^2
    c.attack.keep_weight = 1.0  # POR weight of ||token states - reference||^2 (non-[CLS] tokens)
    c.attack.mlm_weight = 1.0  # clean MLM term that keeps the MLM head usable (0 = off)
    _add_variant_keys(c)

    config_blocks.add_runtime(c)

    c.attack.target = "cls" if arg.startswith("por_") else "pooler"  # variants: final [CLS]
    if arg == "por_words":
        c.attack.triggers = WORD_TRIGGERS
    elif arg == "por_pair":
        c.attack.triggers = PAIR_TRIGGERS
    elif arg == "por_adaptive":
        c.attack.recipe_weight = 1.0  # the defense's lambda
    elif arg == "neuba":
        c.attack.kind = "neuba"
        c.attack.triggers = NEUBA_TRIGGERS
        c.attack.poison_weight = 1.0
        c.train.learning_rate = 5e-5
    elif arg == "badpre":
        c.attack.kind = "badpre"
        c.attack.insertions = 1
        c.train.learning_rate = 2e-5
        c.train.weight_decay = 0.01
        c.train.grad_clip = 5.0
        c.train.batch_size = 32
    elif arg == "tiny":
        c.data.max_length = 16
        c.train.batch_size = 8
        c.train.num_epochs = 0
        c.train.num_steps = 40
        c.train.learning_rate = 1e-3
        c.train.dropout = False
        c.train.log_every = 10
        c.checkpoint.every_steps = 20
    return c.lock()


def _add_variant_keys(c: ml_collections.ConfigDict) -> None:
    """attack.* keys of the variants: two-word decoys and the adaptive attacker."""
    c.attack.decoy_weight = 100.0  # POR, two-word triggers: ||output(one word) - clean||^2
    c.attack.recipe_weight = 0.0  # adaptive: + weight * sum ||W||_F (RECIPE's regularizer)
    c.attack.recipe_regularize = FFN  # ... over these (aliases or HF-name regexes)
