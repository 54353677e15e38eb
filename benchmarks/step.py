"""RECIPE train-step throughput: recipe_jax against the authors' PyTorch step, interleaved.

    python benchmarks/step.py --size minilm                      # random full-length rows
    python benchmarks/step.py --size minilm --aux ../shared/data/bookcorpus/train.txt
    python benchmarks/step.py --size minilm --aux synthetic       # the project's generated text
    python benchmarks/step.py --size base --dtype bf16 --aux synthetic   # on an accelerator

Both sides do the release's step (docs/method.md) on the same weights: MLM loss on 15% masked
tokens (masks drawn once, the release's static masking) + lambda * sum_l ||W_l||_F over the
intermediate weights, only those trainable, AdamW, clip 1.0, dropout on. PyTorch = transformers
`BertForMaskedLM` as the release runs it (every sentence padded to --seq, vocab logits at every
position); recipe_jax = `trainer.train_step` on `purify.loss_fn`, jitted with donation.

Two modes. Random rows (default) isolate the step: every row is --seq real tokens. `--aux PATH`
feeds both sides the same real sentences, --batch a step: PyTorch pads them to --seq as the
release does, recipe_jax packs them (data.packing, recipe_jax/packing.py) and, for comparison,
also runs them unpacked. Weights: with --size minilm and --aux, the packaged MiniLM (real
weights, MLM head fresh); otherwise random, the same on both sides.

Robust on a shared machine: both sides are built and compiled first, then timed in alternating
short rounds (--rounds x --steps each); `ratio` is the median of the per-round ratios. Both use
the same threads (--threads CPU cores: process affinity and torch.set_num_threads). The load is
measured: `others_cpu_share` is the share of the machine's CPU time that other processes used
while timing; `loaded` is true when it exceeds 0.1, and such a figure must not be quoted.

Prints one JSON line: sentences/s and useful (non-pad) tokens/s of each side, `ratio`, packed vs
unpacked, both sides' losses on the same batch with dropout off, compile times and the number of
packed shapes compiled, model FLOPs and achieved FLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile
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
LOADED = 0.1


def model_flops(size: str, lengths, seq: int, masked: int) -> float:
    """Analytic matmul FLOPs of one training step (2 per multiply-add, 3 x forward) on sentences
    of `lengths` real tokens each, attention over `seq` positions, `masked` vocab projections."""
    layers, h, _, f, v = SIZES[size]
    tokens = float(np.sum(lengths))
    per_token = layers * (2 * 4 * h * h + 2 * 2 * h * f + 2 * 2 * seq * h)
    return 3.0 * (tokens * per_token + masked * (2 * h * h + 2 * h * v))


# ----------------------------------------------------------------------------------- batches

def random_rows(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token rows of `seq` real tokens ([CLS] ... [SEP]), every position maskable."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    cand = np.ones_like(ids, bool)
    cand[:, 0] = cand[:, -1] = False
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "candidates": cand}


def text_rows(spec: str, tokenizer, n: int, seq: int) -> dict[str, np.ndarray]:
    """The first `n` sentences of `spec` (a text file, or `synthetic`), tokenized to `seq`."""
    from recipe_jax import data, synthetic

    texts = synthetic.aux_corpus(n) if spec == "synthetic" else data.read_texts(
        spec, max_examples=n)
    if len(texts) < n:
        texts = (texts * (n // len(texts) + 1))[:n]
    return data.tokenize(tokenizer, texts, seq)


def static_masks(rows: dict, mask_token_id: int, vocab: int, seq: int) -> dict[str, np.ndarray]:
    """The release's static masks, drawn once: masked ids, [N, M] positions/labels/weights."""
    import jax

    from recipe_jax import masks

    masked = jax.jit(functools.partial(
        masks.mask_tokens, mask_token_id=mask_token_id, vocab_size=vocab,
        num_positions=masks.num_masked_positions(seq)))(jax.random.PRNGKey(0),
                                                       rows["input_ids"], rows["candidates"])
    return {"attention_mask": rows["attention_mask"],
            **{k: np.asarray(v) for k, v in masked.items()}}


# ------------------------------------------------------------------------------------- sides

def load_weights(size: str, aux: bool, workdir: pathlib.Path):
    """(model, params, HF dir with the same weights) for both sides."""
    import flax.linen as nn
    import jax

    from recipe_jax import hf
    from recipe_jax import model as model_lib

    if size == "minilm" and aux:
        model, params = hf.load_pretrained(hf.resolve_model_dir("minilm"), seed=0)
    else:
        layers, h, heads, f, v = SIZES[size]
        cfg = model_lib.ModelConfig(vocab_size=v, hidden_size=h, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=f)
        model = model_lib.Transformer(cfg)
        params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    params = nn.unbox(params)
    return model, params, hf.save_pretrained(model, params, workdir / "weights")



def torch_ids_and_labels(m: dict):
    """(masked ids, labels) as torch tensors from static masks (input_ids, [N, M] positions,
    labels, weights): the release's labels, -100 everywhere but the labeled masked slots."""
    import torch

    ids = torch.from_numpy(np.array(m["input_ids"])).long()
    labels = torch.full_like(ids, -100)
    rows, slots = np.nonzero(np.asarray(m["weights"]) > 0)
    labels[rows, np.asarray(m["positions"])[rows, slots]] = torch.from_numpy(
        np.asarray(m["labels"])[rows, slots]).long()
    return ids, labels

class JaxSide:
    """The recipe_jax step on a list of host batches; one compiled program per batch shape."""

    def __init__(self, model, params, dtype: str, dropout: bool):
        import jax
        import ml_collections

        from recipe_jax import optim, purify, trainer

        self.jax = jax
        params = jax.tree.map(np.array, params)  # own copies: the step donates its state
        trainable, frozen = trainer.split_params(params, (INTERMEDIATE,), "bert")
        train_cfg = ml_collections.ConfigDict(dict(
            learning_rate=2e-5, warmup_steps=0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
            weight_decay=0.0, grad_clip=1.0, lr_scales=(), depth_lr_scales=()))
        optimizer, schedule = optim.make_optimizer(train_cfg, 10_000)
        self.state = trainer.init_state(jax.device_put(trainable), optimizer)
        self.frozen = jax.device_put(frozen)
        recipe = ml_collections.ConfigDict(dict(mlm=True, weight=1.0,
                                                regularize=(INTERMEDIATE,)))
        compute = type(model)(dataclasses.replace(model.cfg, dtype=dtype))
        self.loss = functools.partial(purify.loss_fn, model=compute, recipe=recipe,
                                      masking=None)
        self.step_fn = jax.jit(functools.partial(
            trainer.train_step, loss_fn=functools.partial(self.loss, dropout=dropout),
            optimizer=optimizer, schedule=schedule, seed=50), donate_argnums=(0,))
        self.params = params

    def compile(self, batches: list[dict]) -> tuple[float, int]:
        """(seconds, programs): compiles the step for every distinct batch shape."""
        shapes, t = {}, time.perf_counter()
        for b in batches:
            key = tuple(sorted((k, v.shape) for k, v in b.items()))
            if key not in shapes:
                shapes[key] = self.step_fn.lower(self.state, self.frozen, b, {}).compile()
        return time.perf_counter() - t, len(shapes)

    def run(self, batches: list[dict]) -> None:
        for b in batches:
            self.state, metrics = self.step_fn(self.state, self.frozen, b, {})
        self.jax.block_until_ready(metrics["loss"])

    def eval_loss(self, batch: dict) -> float:
        """MLM + lambda * reg of the initial weights on `batch`, dropout off."""
        value, _ = self.jax.jit(functools.partial(self.loss, dropout=False))(
            self.params, batch, self.jax.random.PRNGKey(0), {})
        return float(value)


class TorchSide:
    """The release's PyTorch step: BertForMaskedLM, padded rows, full-vocab logits."""

    def __init__(self, hf_dir, dtype: str, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.BertForMaskedLM.from_pretrained(str(hf_dir)).train()
        self.weights = []
        for name, p in self.model.named_parameters():
            p.requires_grad = name.endswith("intermediate.dense.weight")
            if p.requires_grad:
                self.weights.append(p)
        self.opt = torch.optim.AdamW(self.weights, lr=2e-5, weight_decay=0.0)
        self.autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16,
                                          enabled=dtype == "bfloat16")

    def tensors(self, b: dict) -> dict:
        ids, labels = torch_ids_and_labels(b)
        mask = self.torch.from_numpy(np.array(b["attention_mask"])).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _loss(self, b: dict):
        with self.autocast():
            out = self.model(**b)
        return out.loss + sum(self.torch.linalg.norm(w) for w in self.weights)

    def run(self, batches: list[dict]) -> None:
        for b in batches:
            self.opt.zero_grad(set_to_none=True)
            loss = self._loss(b)
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.weights, 1.0)
            self.opt.step()

    def eval_loss(self, b: dict) -> float:
        self.model.eval()
        with self.torch.no_grad():
            value = float(self._loss(b))
        self.model.train()
        return value


# ----------------------------------------------------------------------------------- timing

class CpuMeter:
    """CPU time other processes used while this one measured, as a share of all cores."""

    def __enter__(self):
        self.t, self.busy, self.own = time.time(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc):
        wall = max(time.time() - self.t, 1e-9)
        others = (_busy_seconds() - self.busy) - (_own_seconds() - self.own)
        self.share = max(0.0, others) / (wall * os.cpu_count())


def _busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (/proc/stat; 0 where absent)."""
    try:
        fields = [float(x) for x in pathlib.Path("/proc/stat").read_text().split("\n")[0]
                  .split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(sides: dict, batches: dict, rounds: int, sentences: int) -> dict:
    """Per side, sentences/s of each round; sides alternate their order every round."""
    names, per_round = list(sides), {n: [] for n in sides}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            sides[name].run(batches[name])
            per_round[name].append(sentences / (time.perf_counter() - t))
    return per_round


# -------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="minilm")
    p.add_argument("--batch", type=int, default=32, help="sentences per step")
    p.add_argument("--seq", type=int, default=64, help="row length (the release pads to 64)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--aux", default="", help="real sentences: a text file, or 'synthetic'")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=3, help="steps per side per round")
    p.add_argument("--threads", type=int, default=0, help="CPU cores for both (0 = all)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq < 4 or args.steps < 1 or args.rounds < 1:
        p.error("--batch >= 1, --seq >= 4, --steps >= 1 and --rounds >= 1 are required")
    if args.aux and args.aux != "synthetic" and not pathlib.Path(args.aux).is_file():
        p.error(f"--aux {args.aux}: no such file (give a text file or 'synthetic')")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cores)
    os.sched_setaffinity(0, cores[:threads])  # before JAX starts its thread pool
    import jax

    from recipe_jax import data, hf, packing

    VIEWS = {"": ("attention_mask", packing.weights_count("weights"))}  # noqa: N806

    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    steps = args.steps
    n = args.batch * steps
    with tempfile.TemporaryDirectory() as tmp:
        model, params, hf_dir = load_weights(args.size, bool(args.aux), pathlib.Path(tmp))
        tokenizer = data.load_tokenizer(hf.resolve_model_dir("minilm"))  # bert-base vocab
        rows = (text_rows(args.aux, tokenizer, n, args.seq) if args.aux
                else random_rows(n, args.seq, model.cfg.vocab_size))
        host = static_masks(rows, int(tokenizer.mask_token_id), model.cfg.vocab_size, args.seq)
        chunks = [{k: v[i * args.batch:(i + 1) * args.batch] for k, v in host.items()}
                  for i in range(steps)]
        # "jax": packed on real text, full rows on random ones; "jax_unpacked": the same
        # sentences, one a row.
        plain = [{k: jax.device_put(v) for k, v in c.items()} for c in chunks]
        batches = {"jax": plain}
        if args.aux:
            batches = {"jax": [{k: jax.device_put(v) for k, v in packing.add_plans(
                c, VIEWS, 1).items()} for c in chunks], "jax_unpacked": plain}
        sides = {name: JaxSide(model, params, dtype, dropout=True) for name in batches}
        out = {"mode": "aux" if args.aux else "random", "aux": args.aux or None,
               "size": args.size, "batch": args.batch, "seq": args.seq, "dtype": args.dtype}
        losses = {}
        for name, side in sides.items():
            seconds, programs = side.compile(batches[name])
            out[f"{name}_compile_s"], out[f"{name}_programs"] = round(seconds, 2), programs
            losses[name] = side.eval_loss(batches[name][0])
        if not args.no_torch:
            sides["torch"] = TorchSide(hf_dir, dtype, threads)
            batches["torch"] = [sides["torch"].tensors(c) for c in chunks]
            losses["torch"] = sides["torch"].eval_loss(batches["torch"][0])
        for name, side in sides.items():  # warm-up: one untimed pass each
            side.run(batches[name])
        load_before = os.getloadavg()[0]
        with CpuMeter() as meter:
            per_round = interleaved(sides, batches, args.rounds, n)
    lengths = host["attention_mask"].sum(axis=1)
    masked = int(host["weights"].sum())
    report(out, per_round, lengths, masked, steps, args, losses)
    out.update(threads=threads, torch_threads=threads if not args.no_torch else None,
               load1_before=round(load_before, 2), others_cpu_share=round(meter.share, 3),
               loaded=meter.share > LOADED, cpu_count=os.cpu_count(),
               device=str(jax.devices()[0].device_kind))
    print(json.dumps(out), flush=True)
    if out["loaded"]:
        print(f"WARNING: other processes used {meter.share:.0%} of the CPU while measuring; "
              "these figures are not an idle measurement", file=sys.stderr)
    return out


def report(out: dict, per_round: dict, lengths, masked: int, steps: int, args, losses) -> None:
    """Adds the figures: sentences/s (median over rounds), useful tokens/s, ratios, FLOP/s."""
    tokens_per_sentence = float(np.mean(lengths))
    flops = model_flops(args.size, lengths, args.seq, masked) / steps  # per step, useful work
    med = {n: statistics.median(v) for n, v in per_round.items()}
    out.update(sentences_per_step=args.batch, useful_tokens_per_sentence=round(
        tokens_per_sentence, 1), useful_model_flops_per_step=flops, rounds=args.rounds,
        steps_per_round=steps)
    for name, value in med.items():
        out[f"{name}_sentences_per_s"] = round(value, 3)
        out[f"{name}_useful_tokens_per_s"] = round(value * tokens_per_sentence, 1)
        out[f"{name}_useful_flops_per_s"] = value / args.batch * flops
        out[f"{name}_loss"] = round(losses[name], 5)
    if "torch" in med:
        ratios = [j / t for j, t in zip(per_round["jax"], per_round["torch"], strict=True)]
        out.update(ratio=round(statistics.median(ratios), 3),
                   ratio_min=round(min(ratios), 3), ratio_max=round(max(ratios), 3),
                   torch_loss_minus_jax=round(losses["torch"] - losses["jax"], 6))
    if "jax_unpacked" in med:
        pr = [p / u for p, u in zip(per_round["jax"], per_round["jax_unpacked"], strict=True)]
        out["packed_vs_unpacked"] = round(statistics.median(pr), 3)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
