"""Config sections every training stage shares (configs/*.py add their own on top).

Each key is defined here once, with its one-line comment; `--help` reads the comments from this
file and from the stage's config file.
"""

from __future__ import annotations

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
