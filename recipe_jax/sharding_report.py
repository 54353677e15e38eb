r"""Ahead-of-time check of the sharded RECIPE train step, without allocating any weight.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m recipe_jax.sharding_report --mesh 2,4,1          # bert-large, 8 fake CPUs
    python -m recipe_jax.sharding_report --preset roberta --mesh 1,8,1 --layers 12 --hidden 768 \
        --heads 12 --intermediate 3072
    python -m recipe_jax.sharding_report --preset strong --family electra   # electra-base
    python -m recipe_jax.sharding_report --preset strong --family deberta-v2  # deberta-v3-base

Builds the parameters and the optimizer state as abstract arrays (`jax.eval_shape`) carrying the
NamedShardings training gives them (the same rules table), lowers and compiles the jitted purify
step exactly as `trainer.fit` does (`trainer.jit_train_step`), and prints the bytes each device
would hold for parameters and optimizer state next to the unsharded totals, and the compile
time. State that is not sharded (e.g. a rules-table regression) shows up as per-device ≈ total.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from recipe_jax import cli, masks, optim, purify, sharding, trainer
from recipe_jax.arch import ModelConfig
from recipe_jax.model import abstract_params

BERT_LARGE = dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                  intermediate_size=4096, vocab_size=30522)
# The base-size checkpoint of each family, as its config.json says (--family).
_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512, hidden_act="gelu")
BASE_CONFIGS = {
    "bert": dict(_BASE, model_type="bert", type_vocab_size=2, layer_norm_eps=1e-12,
                 pad_token_id=0),  # bert-base-uncased
    "roberta": dict(_BASE, model_type="roberta", vocab_size=50265, max_position_embeddings=514,
                    type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1),  # roberta-base
    "distilbert": dict(model_type="distilbert", vocab_size=30522, dim=768, n_layers=6,
                       n_heads=12, hidden_dim=3072, max_position_embeddings=512,
                       activation="gelu", dropout=0.1, attention_dropout=0.1,
                       seq_classif_dropout=0.2, pad_token_id=0),  # distilbert-base-uncased
    "electra": dict(_BASE, model_type="electra", embedding_size=768, type_vocab_size=2,
                    layer_norm_eps=1e-12, pad_token_id=0),  # google/electra-base-discriminator
    "modernbert": dict(model_type="modernbert", vocab_size=50368, hidden_size=768,
                       num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                       max_position_embeddings=8192, global_attn_every_n_layers=3,
                       local_attention=128, hidden_activation="gelu", norm_eps=1e-5,
                       pad_token_id=50283),  # answerdotai/ModernBERT-base
    "deberta-v2": dict(_BASE, model_type="deberta-v2", vocab_size=128100, type_vocab_size=0,
                       layer_norm_eps=1e-7, pad_token_id=0, relative_attention=True,
                       max_relative_positions=-1, position_buckets=256,
                       pos_att_type=["p2c", "c2p"], position_biased_input=False,
                       norm_rel_ebd="layer_norm", share_att_key=True),  # deberta-v3-base
}


def _abstract(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        tree, shardings)


def abstract_state(cfg: ModelConfig, mesh, trainable_patterns, optimizer
                   ) -> tuple[trainer.TrainState, dict]:
    """(state, frozen) as ShapeDtypeStructs with the shardings training gives them: params by
    the rules table, optimizer moments like their params (train.init_state's rule)."""
    boxed = abstract_params(cfg)
    params = _abstract(nn.unbox(boxed), sharding.param_shardings(boxed, mesh))
    trainable, frozen = trainer.split_params(params, trainable_patterns, cfg.model_type)
    opt_shapes = jax.eval_shape(optimizer.init, trainable)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sh: sh, opt_shapes, jax.tree.map(lambda x: x.sharding, trainable),
        transform_non_params=lambda _: sharding.replicated(mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
    state = trainer.TrainState(step=step, trainable=trainable,
                             opt_state=_abstract(opt_shapes, opt_shardings))
    return state, frozen


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The purify batch (static masks: masked ids and [B, M] slots), sharded over data x fsdp."""
    b, length = config.train.batch_size, config.data.max_length
    m = masks.num_masked_positions(length, config.data.mask_prob)
    shapes = {"input_ids": ((b, length), jnp.int32), "attention_mask": ((b, length), jnp.int32),
              "positions": ((b, m), jnp.int32), "labels": ((b, m), jnp.int32),
              "weights": ((b, m), jnp.float32)}
    if config.data.masking == "dynamic":
        shapes = {"input_ids": shapes["input_ids"], "attention_mask": shapes["attention_mask"],
                  "candidates": ((b, length), jnp.bool_)}
    batch_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh) for k, (s, d) in shapes.items()}


def compile_purify_step(config, cfg: ModelConfig, mesh, num_steps: int = 1000):
    """(compiled step, state, frozen, seconds to lower + compile) for the purify step of
    `config` on `cfg`; nothing is allocated."""
    like, _ = trainer.split_params(nn.unbox(abstract_params(cfg)), config.recipe.trainable,
                                 cfg.model_type)
    optimizer, schedule = optim.make_optimizer(config.train, num_steps, trainable=like,
                                               model_cfg=cfg)
    state, frozen = abstract_state(cfg, mesh, config.recipe.trainable, optimizer)
    masking = None
    if config.data.masking == "dynamic":
        masking = dict(mask_token_id=103, vocab_size=cfg.vocab_size,  # bert-base's [MASK]
                       mask_prob=config.data.mask_prob,
                       num_positions=masks.num_masked_positions(config.data.max_length,
                                                               config.data.mask_prob))
    start = time.perf_counter()
    jitted = trainer.jit_train_step(purify.make_loss(config, cfg, masking), optimizer, schedule,
                                    config.train.seed, state, frozen, {}, mesh)
    compiled = jitted.lower(state, frozen, abstract_batch(config, mesh), {}).compile()
    return compiled, state, frozen, time.perf_counter() - start


def report(state: trainer.TrainState, frozen, mesh) -> dict[str, float]:
    """MiB per device (the most loaded one) and in total, for params and optimizer state."""
    mib = 2.0 ** 20
    params = trainer.merge_params(state.trainable, frozen)
    out = {}
    for name, tree in (("params", params), ("opt_state", state.opt_state)):
        per_device = sharding.abstract_bytes_per_device(tree, mesh)
        out[f"{name}_total_mib"] = sharding.total_bytes(tree) / mib
        out[f"{name}_per_device_mib"] = max(per_device.values()) / mib
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bert", help="configs/purify.py preset (default bert)")
    p.add_argument("--mesh", default="2,4,1", help="data,fsdp,tensor (default 2,4,1)")
    p.add_argument("--batch-size", type=int, default=0, help="global batch (0 = the preset's)")
    p.add_argument("--family", choices=sorted(BASE_CONFIGS), default="",
                   help="that family's base-size config (replaces the size flags)")
    for key, default in (("layers", 24), ("hidden", 1024), ("heads", 16),
                         ("intermediate", 4096), ("vocab", 30522)):
        p.add_argument(f"--{key}", type=int, default=default, help=f"(default {default})")
    args = p.parse_args(argv)
    config = cli.load_config(cli.REPO / "configs" / "purify.py", args.preset).unlock()
    if args.batch_size:
        config.train.batch_size = args.batch_size
    if args.family:
        cfg = ModelConfig.from_hf_config(BASE_CONFIGS[args.family])
    else:
        cfg = ModelConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                          num_attention_heads=args.heads, intermediate_size=args.intermediate,
                          vocab_size=args.vocab)
    try:
        mesh = sharding.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    except ValueError as e:
        p.exit(1, f"sharding_report: error: {e}; on CPU, simulate devices with XLA_FLAGS="
                  "--xla_force_host_platform_device_count=8\n")
    compiled, state, frozen, seconds = compile_purify_step(config, cfg, mesh)
    numbers = {**report(state, frozen, mesh), "compile_s": seconds}
    memory = compiled.memory_analysis()  # XLA's own per-device view; None on some backends
    if memory is not None:
        numbers["xla_arguments_mib"] = memory.argument_size_in_bytes / 2 ** 20
        numbers["xla_temp_mib"] = memory.temp_size_in_bytes / 2 ** 20
    print(f"purify step ({args.preset}), {cfg.model_type} {cfg.num_hidden_layers} layers x "
          f"{cfg.hidden_size}, mesh "
          f"{dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} devices")
    for name in ("params", "opt_state"):
        total, per = numbers[f"{name}_total_mib"], numbers[f"{name}_per_device_mib"]
        print(f"  {name:9s} {total:10.1f} MiB total  {per:9.1f} MiB per device  "
              f"(1/{total / max(per, 1e-9):.2f})")
    if "xla_arguments_mib" in numbers:
        print(f"  XLA per device: arguments {numbers['xla_arguments_mib']:.1f} MiB (state + "
              f"batch), temporaries {numbers['xla_temp_mib']:.1f} MiB")
    print(f"  lower + compile {seconds:.1f} s")
    return numbers


if __name__ == "__main__":
    main()
