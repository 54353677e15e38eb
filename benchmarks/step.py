"""RECIPE train-step throughput: recipe_jax against the authors' PyTorch step, same shapes.

    python benchmarks/step.py --size minilm --batch 32 --seq 64
    python benchmarks/step.py --size base --batch 32 --seq 64 --dtype bf16 --steps 20

Both sides do the release's step (docs/method.md) on random weights of the given size:
MLM loss on 15% masked positions + lambda * sum_l ||W_l||_F over the intermediate weights, only
those trainable, AdamW, clip 1.0, dropout on. PyTorch reference = transformers
`BertForMaskedLM` (vocab logits at every position, as the release computes them); recipe_jax =
`trainer.train_step` on `purify.loss_fn`, jitted with buffer donation (vocab logits only at
masked positions).
Prints one JSON line: median steps/s of each, ratio (JAX / PyTorch), tokens/s, model FLOPs per
step (analytic, see `model_flops`), achieved FLOP/s, compile time, device.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import numpy as np

SIZES = {  # (layers, hidden, heads, ffn, vocab)
    "tiny": (2, 128, 2, 512, 30522),
    "minilm": (6, 384, 12, 1536, 30522),
    "base": (12, 768, 12, 3072, 30522),
    "large": (24, 1024, 16, 4096, 30522),
}
INTERMEDIATE = r"encoder\.layer\.\d+\.intermediate\.dense\.weight$"
MASK_PROB = 0.15


def model_flops(size: str, batch: int, seq: int) -> dict[str, float]:
    """Analytic matmul FLOPs of one step (2 per multiply-add).

    forward = encoder (QKV/O + FFN projections, attention scores and values) + the MLM head at
    the masked positions only (the work the loss needs). `train` = 3 x forward, the usual
    convention for a full training step (backward = 2 x forward); MFU uses it. RECIPE's true
    backward is cheaper (only the FFN-in weight gradients), so this is an upper bound on work
    done, hence a fair-to-the-baseline utilization figure.
    """
    layers, h, _, f, v = SIZES[size]
    tokens = batch * seq
    masked = batch * max(1, round(seq * MASK_PROB))
    per_token = layers * (2 * 4 * h * h + 2 * 2 * h * f + 2 * 2 * seq * h)
    head = masked * (2 * h * h + 2 * h * v)
    forward = tokens * per_token + head
    return {"forward": float(forward), "train": 3.0 * forward}


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with [CLS] ... [SEP] and 15% of inner positions masked (fixed count)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    m = max(1, round(seq * MASK_PROB))
    positions = np.stack([np.sort(rng.choice(np.arange(1, seq - 1), m, replace=False))
                          for _ in range(batch)]).astype(np.int32)
    labels = np.take_along_axis(ids, positions, axis=1)
    masked = ids.copy()
    np.put_along_axis(masked, positions, 103, axis=1)
    return {"input_ids": masked, "attention_mask": np.ones_like(ids), "positions": positions,
            "labels": labels, "weights": np.ones(positions.shape, np.float32)}


def _time(step, n_warmup: int, n_steps: int) -> tuple[float, list[float]]:
    """(first-call seconds, per-step seconds of the timed steps); `step()` must block."""
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return first, times


def bench_jax(size: str, batch_np: dict, dtype: str, n_warmup: int, n_steps: int) -> dict:
    import flax.linen as nn
    import jax
    import ml_collections

    from recipe_jax import model as model_lib
    from recipe_jax import optim, purify, trainer

    layers, h, heads, f, v = SIZES[size]
    cfg = model_lib.ModelConfig(vocab_size=v, hidden_size=h, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=f)
    params = nn.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(0)))
    trainable, frozen = trainer.split_params(params, (INTERMEDIATE,), "bert")
    train_cfg = ml_collections.ConfigDict(dict(
        learning_rate=2e-5, warmup_steps=0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        weight_decay=0.0, grad_clip=1.0, lr_scales=(), depth_lr_scales=()))
    optimizer, schedule = optim.make_optimizer(train_cfg, 10_000)
    state = trainer.init_state(jax.device_put(trainable), optimizer)
    frozen = jax.device_put(frozen)
    recipe = ml_collections.ConfigDict(dict(mlm=True, weight=1.0, regularize=(INTERMEDIATE,)))
    compute = model_lib.Transformer(dataclasses.replace(cfg, dtype=dtype))
    loss = functools.partial(purify.loss_fn, model=compute, recipe=recipe, dropout=True,
                             masking=None)
    step_fn = jax.jit(functools.partial(trainer.train_step, loss_fn=loss, optimizer=optimizer,
                                        schedule=schedule, seed=50), donate_argnums=(0,))
    batch = jax.device_put(batch_np)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], frozen, batch, {})
        jax.block_until_ready(metrics["loss"])

    t = time.perf_counter()
    step_fn.lower(state, frozen, batch, {}).compile()
    compile_s = time.perf_counter() - t
    _, times = _time(step, n_warmup, n_steps)
    return {"compile_s": compile_s, "times": times, "device": str(jax.devices()[0].device_kind)}


def bench_torch(size: str, batch_np: dict, dtype: str, n_warmup: int, n_steps: int) -> dict:
    import torch
    import transformers

    layers, h, heads, f, v = SIZES[size]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=v, hidden_size=h, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=f)
    model = transformers.BertForMaskedLM(config).train()
    weights = []
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith("intermediate.dense.weight")
        if p.requires_grad:
            weights.append(p)
    opt = torch.optim.AdamW(weights, lr=2e-5, weight_decay=0.0)
    ids = torch.from_numpy(batch_np["input_ids"]).long()
    labels = torch.full_like(ids, -100)
    pos = torch.from_numpy(batch_np["positions"]).long()
    labels.scatter_(1, pos, torch.from_numpy(batch_np["labels"]).long())
    mask = torch.from_numpy(batch_np["attention_mask"]).long()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss + sum(torch.linalg.norm(w) for w in weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        opt.step()

    first, times = _time(step, n_warmup, n_steps)
    return {"compile_s": first, "times": times, "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="minilm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq < 4 or args.steps < 1:
        p.error("--batch >= 1, --seq >= 4 and --steps >= 1 are required")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    batch = make_batch(args.batch, args.seq, SIZES[args.size][4])
    flops = model_flops(args.size, args.batch, args.seq)
    out = {"size": args.size, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
           "model_flops_per_step": flops["train"]}
    jx = bench_jax(args.size, batch, dtype, args.warmup, args.steps)
    jax_sps = 1.0 / statistics.median(jx["times"])
    out.update(jax_steps_per_s=round(jax_sps, 4), jax_tokens_per_s=round(jax_sps * batch[
        "input_ids"].size, 1), jax_flops_per_s=jax_sps * flops["train"],
        jax_compile_s=round(jx["compile_s"], 2), device=jx["device"])
    if not args.no_torch:
        tr = bench_torch(args.size, batch, dtype, args.warmup, args.steps)
        torch_sps = 1.0 / statistics.median(tr["times"])
        out.update(torch_steps_per_s=round(torch_sps, 4),
                   torch_tokens_per_s=round(torch_sps * batch["input_ids"].size, 1),
                   torch_flops_per_s=torch_sps * flops["train"], torch_threads=tr["threads"],
                   ratio=round(jax_sps / torch_sps, 3))
    out["cpu_count"] = os.cpu_count()
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
