"""How far did a defense move a model's clean behaviour? Token-state drift against a reference.

    python tools/drift.py --reference runs/por2/hf --aux runs/data/defender.tsv \
        runs/por2_bert/hf runs/por2_strong/hf [--examples 256] [--max-length 64]

For each model: every layer's mean squared difference between its token states and the
reference's on the same clean sentences (attended tokens only), and the scale-free distance:
the mean over layers of that MSE over the reference layer's own mean square (0 = unchanged,
about 2 = unrelated states; BERT layers differ in scale by 20x). A purification that keeps
clean accuracy should move clean token states little while the regularizer shrinks weights;
this measures the first half. One JSON line per model, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from recipe_jax import data, hf, losses
from recipe_jax.model import Transformer


def token_states(model, params, enc: dict, batch_size: int) -> list[np.ndarray]:
    """float32 [N, S, H] per layer (embeddings first), computed `batch_size` rows at a time."""
    fn = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                  method=Transformer.encode))
    parts = [fn(params, enc["input_ids"][i:i + batch_size],
                enc["attention_mask"][i:i + batch_size])
             for i in range(0, len(enc["input_ids"]), batch_size)]
    return [np.concatenate([np.asarray(p[layer], np.float32) for p in parts])
            for layer in range(len(parts[0]))]


def drift(reference_dir: str, model_dirs: list[str], texts: list[str], *, max_length: int,
          batch_size: int = 64) -> list[dict]:
    """Per model: {"model", "per_layer_mse", "mean_mse", "relative"} against `reference_dir`."""
    ref_model, ref_params = hf.load_pretrained(reference_dir)
    enc = data.tokenize(data.load_tokenizer(reference_dir), texts, max_length)
    mask = jnp.asarray(enc["attention_mask"])
    ref = token_states(ref_model, ref_params, enc, batch_size)
    out = []
    for d in model_dirs:
        model, params = hf.load_pretrained(d)
        if model.cfg.num_hidden_layers != ref_model.cfg.num_hidden_layers:
            raise ValueError(f"{d}: {model.cfg.num_hidden_layers} layers, the reference has "
                             f"{ref_model.cfg.num_hidden_layers}; compare models of one family")
        states = token_states(model, params, enc, batch_size)
        per_layer = [float(losses.token_state_mse(jnp.asarray(h), jnp.asarray(r), mask))
                     for h, r in zip(states[1:], ref[1:], strict=True)]
        scales = [float(losses.token_state_mse(jnp.asarray(r), jnp.zeros_like(r), mask))
                  for r in ref[1:]]
        relative = float(np.mean([m / max(s, 1e-12) for m, s in zip(per_layer, scales,
                                                                      strict=True)]))
        out.append({"model": str(d), "per_layer_mse": per_layer,
                    "mean_mse": float(np.mean(per_layer)), "relative": relative})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="HF dirs to compare with the reference")
    p.add_argument("--reference", required=True, help="HF dir, e.g. the model before defense")
    p.add_argument("--aux", required=True, help="clean sentences (.txt/.tsv/.csv/.jsonl)")
    p.add_argument("--examples", type=int, default=256, help="first N sentences (default 256)")
    p.add_argument("--max-length", type=int, default=64)
    args = p.parse_args(argv)
    texts = data.read_texts(args.aux, max_examples=args.examples)
    rows = drift(args.reference, args.models, texts, max_length=args.max_length)
    for r in rows:
        print(json.dumps(r))
    print(f"\n{len(texts)} sentences; reference {args.reference}")
    print("| model | mean MSE | relative | per-layer MSE |\n|---|---|---|---|")
    for r in rows:
        layers = " ".join(f"{x:.4f}" for x in r["per_layer_mse"])
        print(f"| {r['model']} | {r['mean_mse']:.4f} | {r['relative']:.3f} | {layers} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
