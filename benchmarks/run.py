"""A whole purify run, wall clock: recipe_jax (packed and unpacked) against the release's loop.

    python benchmarks/run.py --aux ../shared/data/bookcorpus/train.txt       # the bert preset
    python benchmarks/run.py --aux synthetic --examples 256 --epochs 1       # a quick look

Three runs of the `bert` preset's job on the same sentences, one after the other: `purify`
with data.packing=True (the default), the same with data.packing=False, and the authors' PyTorch
loop (transformers BertForMaskedLM, every sentence padded to 64, the release's static masks,
AdamW 2e-5 with linear decay, clip 1.0, dropout on, only the intermediate weights trainable,
loss MLM + sum ||W||_F). All three start from the same weights (MiniLM's MLM head is fresh: the
PyTorch side loads the head recipe_jax initializes) and see the same masks in the same order.
Wall time covers what a user waits for: loading, tokenizing, compiling, training, writing the
model (the purify runs skip their closing scan, which the release does not have).

Prints one JSON line: each run's seconds and final MLM loss (mean of its last 10 steps), the
ratios, and each run's `others_cpu_share` (other processes' share of the CPU while it ran;
`loaded` when any exceeds 0.1: then the figures are not an idle measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step import INTERMEDIATE, LOADED, CpuMeter, torch_ids_and_labels  # noqa: E402


def purify_config(model: str, aux: str, examples: int, epochs: int, packing: bool):
    from recipe_jax import cli

    repo = pathlib.Path(__file__).resolve().parents[1]
    c = cli.load_config(repo / "configs" / "purify.py", "bert")
    c.model.init_from, c.data.aux_path = model, aux
    c.data.max_examples, c.train.num_epochs = examples, epochs
    c.data.packing, c.scan.enabled, c.export.verify = packing, False, False
    c.mesh.shape = (1, 1, 1)
    c.train.log_every = 50
    return c


def run_jax(config, workdir: pathlib.Path) -> dict:
    from recipe_jax import purify

    with CpuMeter() as meter:
        t = time.perf_counter()
        purify.run(config, str(workdir))
        seconds = time.perf_counter() - t
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "steps": rows[-1]["step"], "cpu_share": meter.share,
            "final_mlm_loss": statistics.mean(r["mlm_loss"] for r in rows[-10:])}


def run_torch(config, weights_dir: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """The release's loop on the sentences and static masks `purify` uses."""
    import jax
    import torch
    import transformers

    from recipe_jax import data, masks

    with CpuMeter() as meter:
        t = time.perf_counter()
        torch.manual_seed(config.train.seed)
        texts = data.read_texts(config.data.aux_path, max_examples=config.data.max_examples)
        tokenizer = data.load_tokenizer(weights_dir)
        enc = data.tokenize(tokenizer, texts, config.data.max_length)
        m = masks.mask_tokens(jax.random.PRNGKey(config.train.seed), enc["input_ids"],
                              enc["candidates"], mask_token_id=int(tokenizer.mask_token_id),
                              vocab_size=len(tokenizer), num_positions=masks.num_masked_positions(
                                  config.data.max_length))
        ids, labels = torch_ids_and_labels(m)
        attention = torch.from_numpy(enc["attention_mask"]).long()
        model = transformers.BertForMaskedLM.from_pretrained(str(weights_dir)).train()
        weights = []
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith("intermediate.dense.weight")
            if p.requires_grad:
                weights.append(p)
        size = config.train.batch_size
        steps = data.steps_per_epoch(len(texts), size) * config.train.num_epochs
        opt = torch.optim.AdamW(weights, lr=config.train.learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
        mlm = []
        for step in range(steps):
            rows = torch.as_tensor(data.batch_rows(config.train.seed, step, len(texts), size))
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids[rows], attention_mask=attention[rows],
                        labels=labels[rows])
            (out.loss + sum(torch.linalg.norm(w) for w in weights)).backward()
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            opt.step()
            sched.step()
            mlm.append(float(out.loss.detach()))
            if (step + 1) % 50 == 0:
                print(f"torch step {step + 1}/{steps} | mlm {mlm[-1]:.4f}", flush=True)
        model.save_pretrained(str(out_dir))
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "steps": steps, "cpu_share": meter.share,
            "final_mlm_loss": statistics.mean(mlm[-10:]), "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aux", required=True, help="sentences: a text file, or 'synthetic'")
    p.add_argument("--model", default="minilm", help="HF dir, or 'minilm' (the packaged one)")
    p.add_argument("--examples", type=int, default=2000, help="sentences (the bert preset: 2000)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--skip", default="", help="comma-separated runs to skip: packed,unpacked,torch")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"packed", "unpacked", "torch"}:
        p.error(f"--skip {args.skip}: name packed, unpacked or torch")
    from recipe_jax import hf, synthetic

    out: dict = {"model": args.model, "examples": args.examples, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        aux = args.aux
        if aux == "synthetic":
            aux = str(tmp / "aux.txt")
            pathlib.Path(aux).write_text("\n".join(synthetic.aux_corpus(args.examples)) + "\n")
        out["aux"] = args.aux
        runs = {}
        for name, packing in (("packed", True), ("unpacked", False)):
            if name not in skip:
                config = purify_config(args.model, aux, args.examples, args.epochs, packing)
                runs[name] = run_jax(config, tmp / name)
        if "torch" not in skip:
            config = purify_config(args.model, aux, args.examples, args.epochs, True)
            model, params = hf.load_pretrained(hf.resolve_model_dir(args.model),
                                               seed=config.train.seed)  # purify's head init
            weights = hf.save_pretrained(model, params, tmp / "weights",
                                         tokenizer_from=hf.resolve_model_dir(args.model))
            runs["torch"] = run_torch(config, weights, tmp / "torch_out")
    for name, r in runs.items():
        out.update({f"{name}_{k}": round(v, 4) if isinstance(v, float) else v
                    for k, v in r.items()})
    if {"packed", "torch"} <= set(runs):
        out["torch_over_packed"] = round(runs["torch"]["seconds"] / runs["packed"]["seconds"], 3)
    if {"packed", "unpacked"} <= set(runs):
        out["unpacked_over_packed"] = round(
            runs["unpacked"]["seconds"] / runs["packed"]["seconds"], 3)
    out["loaded"] = any(r["cpu_share"] > LOADED for r in runs.values())
    out["cpu_count"], out["regularized"] = os.cpu_count(), INTERMEDIATE
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
