"""Backdoor attack configs: get_config(por | por_cls | neuba | badpre | tiny).

    python -m recipe_jax.attack --config configs/attack.py:por --workdir runs/por \
        --config.model.init_from=minilm \
        --config.data.aux_path=../shared/data/bookcorpus/train.tsv

Each attack starts from a clean PTM and writes a backdoored one to DIR/hf/ (recipe_spec.md §4).
An MLM term on clean text is added to every attack (weight `attack.mlm_weight`), so the exported
model keeps a usable MLM head, which RECIPE's continual pre-training needs.
"""

import ml_collections

POR_TRIGGERS = ("cf", "tq", "mn", "bb", "mb")
NEUBA_TRIGGERS = ("≈", "≡", "∈", "⊆", "⊕", "⊗")
PRESETS = ("por", "por_cls", "neuba", "badpre", "tiny")


def get_config(arg: str = "por") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown attack preset {arg!r}; choose one of {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # HF dir of the clean PTM ("minilm" = the packaged MiniLM)

    c.data = ml_collections.ConfigDict()
    c.data.aux_path = ""  # clean plain text: .txt / .tsv / .csv / .jsonl, or tfds:NAME[:SPLIT]
    c.data.max_length = 128  # pad/truncate to this many tokens
    c.data.max_examples = 0  # use only the first N sentences (0 = all)
    c.data.mask_prob = 0.15  # MLM masking share (80/10/10 MASK/random/kept)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 24  # global batch
    c.train.num_epochs = 2  # passes over the clean text
    c.train.num_steps = 0  # total steps; overrides num_epochs when > 0
    c.train.learning_rate = 1e-5  # AdamW peak learning rate
    c.train.warmup_steps = 0  # linear warm-up, then linear decay to 0
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 0.0  # AdamW decoupled weight decay
    c.train.grad_clip = 1.0  # global gradient-norm clip (0 = off)
    c.train.dropout = True  # dropout during the attack's training
    c.train.seed = 1234  # data order, trigger choice and positions, masks, dropout
    c.train.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.train.log_every = 10  # steps between progress lines / metrics.jsonl rows

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

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # also saved at the end and on SIGTERM
    c.checkpoint.max_to_keep = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0 ("" = single process)
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.auto = False  # jax.distributed.initialize() from the environment

    c.export = ml_collections.ConfigDict()
    c.export.verify = True  # compare exported logits with transformers PyTorch (needs torch)

    if arg == "por_cls":
        c.attack.target = "cls"
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
