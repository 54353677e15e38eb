"""Config sections every training stage shares (configs/*.py add their own on top), and their
validation.

Each key is defined here once, with its one-line comment; `--help` reads the comments from this
file and from the stage's config file. `validate_training` checks the shared sections; each stage
adds its own `validate(config)`. Every bad value is a ValueError `KEY=VALUE: the fix`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import ml_collections


def bad_value(key: str, value, fix: str):
    """Raises the error every stage gives for a bad config value: `KEY=VALUE: the fix`."""
    raise ValueError(f"{key}={value!r}: {fix}")


def add_train(c: ml_collections.ConfigDict, *, batch_size: int, num_epochs: int,
              learning_rate: float, seed: int, log_every: int, dropout: bool = True) -> None:
    """train.*: the optimizer (clip -> AdamW, linear warm-up/decay) and the loop."""
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = batch_size  # global batch (all processes and devices together)
    c.train.num_epochs = num_epochs  # passes over the training data
    c.train.num_steps = 0  # total steps; overrides num_epochs when > 0
    c.train.learning_rate = learning_rate  # AdamW peak learning rate
    c.train.warmup_steps = 0  # linear warm-up, then linear decay to 0
    c.train.adam_b1 = 0.9  # AdamW beta1
    c.train.adam_b2 = 0.999  # AdamW beta2
    c.train.adam_eps = 1e-8  # AdamW epsilon
    c.train.weight_decay = 0.0  # AdamW decoupled weight decay
    c.train.grad_clip = 1.0  # global gradient-norm clip (0 = off)
    c.train.lr_scales = ()  # ("REGEX=FACTOR", ...): lr x FACTOR for matching params; 1st match
    c.train.depth_lr_scales = ()  # (F_1, .., F_k): k equal bands of layers, bottom up, lr x F_j
    c.train.dropout = dropout  # dropout on during training
    c.train.seed = seed  # data order, masks, fresh heads, dropout
    c.train.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.train.remat = False  # recompute layer activations in backward: less memory, ~1/3 more FLOPs
    c.train.log_every = log_every  # steps between progress lines / metrics.jsonl rows


def add_model(c: ml_collections.ConfigDict) -> None:
    """model.*: the HF dir the stage reads, and the extra-heads opt-in (hf_compat.py)."""
    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # HF model dir ("minilm" = the packaged MiniLM)
    c.model.drop_extra_heads = False  # leave out task heads the model's family does not have


def add_runtime(c: ml_collections.ConfigDict, *, max_to_keep: int = 2,
                export: bool = True) -> None:
    """checkpoint.*, mesh.*, distributed.* and (for stages that write DIR/hf/) export.*."""
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # also saved at the end and on SIGTERM
    c.checkpoint.max_to_keep = max_to_keep  # newest complete checkpoints kept

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0 ("" = single process)
    c.distributed.num_processes = 1  # processes in the job
    c.distributed.process_id = 0  # this process's index
    c.distributed.auto = False  # jax.distributed.initialize() from the environment (TPU, SLURM)

    if export:
        c.export = ml_collections.ConfigDict()
        c.export.verify = True  # compare exported logits with transformers PyTorch (needs torch)


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Checks the keys every training stage has (data.*, train.*, checkpoint.*)."""
    if "aux_path" in config.data and not config.data.aux_path:
        bad_value("data.aux_path", "", "set it to a .txt/.tsv/.csv/.jsonl file or tfds:NAME")
    if not 3 <= config.data.max_length <= 4096:
        bad_value("data.max_length", config.data.max_length, "use 3..4096")
    if config.data.max_examples < 0:
        bad_value("data.max_examples", config.data.max_examples, "use 0 (all) or a count")
    if "mask_prob" in config.data and not 0 < config.data.mask_prob < 1:
        bad_value("data.mask_prob", config.data.mask_prob, "use a share in (0, 1), e.g. 0.15")
    t = config.train
    for key in ("batch_size", "log_every"):
        if t[key] < 1:
            bad_value(f"train.{key}", t[key], "use a positive integer")
    if t.num_epochs < 0:
        bad_value("train.num_epochs", t.num_epochs, "use 0 (then set num_steps) or a count")
    if t.num_steps < 0 or (t.num_steps == 0 and t.num_epochs == 0):
        bad_value("train.num_steps", t.num_steps, "set num_steps > 0 or num_epochs > 0")
    for key in ("learning_rate", "warmup_steps", "grad_clip", "weight_decay", "adam_eps"):
        if not t[key] >= 0:  # `not >=` also catches NaN
            bad_value(f"train.{key}", t[key], "use a number >= 0")
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= t[key] < 1:
            bad_value(f"train.{key}", t[key], "use a decay rate in [0, 1), e.g. 0.9 or 0.999")
    parse_lr_scales(t.lr_scales)
    parse_depth_lr_scales(t.depth_lr_scales)
    if t.seed < 0:
        bad_value("train.seed", t.seed, "use an integer >= 0")
    if t.dtype not in ("float32", "bfloat16"):
        bad_value("train.dtype", t.dtype, "use 'float32' or 'bfloat16'")
    shape = config.mesh.shape
    if (not isinstance(shape, tuple | list) or len(shape) != 3
            or not all(isinstance(n, int) and (n >= 1 or n == -1) for n in shape)):
        bad_value("mesh.shape", shape, "use three integers (data, fsdp, tensor), e.g. (8, 1, 1) "
                  "or (-1, 1, 1) for all devices on data")
    if config.checkpoint.every_steps < 1:
        bad_value("checkpoint.every_steps", config.checkpoint.every_steps, "use a positive int")
    if config.checkpoint.max_to_keep < 1:
        bad_value("checkpoint.max_to_keep", config.checkpoint.max_to_keep,
                  "keep at least 1 checkpoint (2 lets a damaged newest one fall back)")


def check_patterns(patterns: Sequence[str], key: str) -> None:
    """Every entry of a regex-list key (e.g. recipe.trainable) compiles."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{key}={tuple(patterns)!r}: {p!r} is not a valid regex ({e}); "
                             "escape special characters with a backslash, e.g. r'\\('") from None


def parse_lr_scales(entries: Sequence[str]) -> list[tuple[str, float]]:
    """`train.lr_scales` ("REGEX=FACTOR", ...) -> [(regex, factor)]; names the bad entry."""
    rules = []
    for entry in entries:
        pattern, _, factor = str(entry).rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not pattern or not value >= 0:
            bad_value("train.lr_scales", tuple(entries),
                      f"{entry!r} is not REGEX=FACTOR with FACTOR >= 0; e.g. "
                      "'encoder\\.layer\\.[012]\\.=0.3' trains layers 0-2 at 0.3 x the lr")
        try:
            re.compile(pattern)
        except re.error as e:
            bad_value("train.lr_scales", tuple(entries), f"{pattern!r} is not a valid regex "
                      f"({e}); escape special characters with a backslash")
        rules.append((pattern, value))
    return rules


def parse_depth_lr_scales(factors: Sequence[float], num_layers: int | None = None
                          ) -> tuple[float, ...]:
    """`train.depth_lr_scales` (F_1, ..., F_k) -> floats; names the bad value. With
    `num_layers`, also checks that every band holds at least one layer."""
    try:
        values = tuple(float(f) for f in factors)
    except (TypeError, ValueError):
        values = (float("nan"),)
    if not all(v >= 0 for v in values):  # `not >=` also catches NaN
        bad_value("train.depth_lr_scales", factors, "use factors >= 0, one per band of "
                  "layers, bottom to top; e.g. (0.5, 1.0) trains the lower half at half the lr")
    if num_layers is not None and len(values) > num_layers:
        bad_value("train.depth_lr_scales", factors, f"{len(values)} bands for a model of "
                  f"{num_layers} layers; use at most {num_layers} factors")
    return values
