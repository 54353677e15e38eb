"""Which tensors did an attack (or a defense) move? Per-tensor relative change between checkpoints.

    python tools/weight_change.py --reference minilm runs/por2/hf runs/por2_lrs050/hf \
        [--top 12]

For each model and each tensor that both it and the reference hold (heads a file lacks, which the
loader would initialize fresh, are left out): ||W - W_ref||_F / ||W_ref||_F. A backdoor that lives
in tensors the defense never updates shows up as a large change by the attack that the purified
model still carries (POR's pooler: docs/results.md, "What survived was in the pooler"). Prints
each model's largest changes, then the changes per tensor kind (attention, FFN, embeddings,
heads) as min-max over layers; `--json FILE` writes every number.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

from recipe_jax import hf

KINDS = (("attention", r"\.attention\."),
         ("FFN", r"layer\.\d+\.(intermediate|output)\.dense\."),
         ("embeddings", r"\.embeddings\."), ("pooler", r"\.pooler\."),
         ("MLM head", r"^(cls\.predictions|lm_head)\."))


def load(model: str) -> dict[str, np.ndarray]:
    """{HF name: float32 array} of the tensors the file holds (no freshly initialized heads)."""
    net, params, info = hf.load_pretrained(hf.resolve_model_dir(model), with_info=True)
    named, fresh = hf.named_params(params, net.cfg.model_type), set(info["fresh"])
    return {name: np.asarray(a) for name, a in named.items() if name not in fresh}


def relative_change(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]
                    ) -> dict[str, float]:
    """||W - W_ref|| / ||W_ref|| for every tensor name both hold with the same shape (inf where
    the reference tensor is all zeros and the other is not)."""
    out = {}
    for name in sorted(set(reference) & set(other)):
        ref, new = reference[name], other[name]
        if ref.shape != new.shape:
            raise ValueError(f"{name}: shape {new.shape} against the reference's {ref.shape}; "
                             "compare checkpoints of the same architecture")
        delta, size = float(np.linalg.norm(new - ref)), float(np.linalg.norm(ref))
        out[name] = delta / size if size > 0 else (float("inf") if delta > 0 else 0.0)
    return out


def by_kind(changes: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(min, max) change over the matrices (>= 2-D weights) of each tensor kind."""
    out = {}
    for kind, pattern in KINDS:
        values = [v for k, v in changes.items() if re.search(pattern, k) and k.endswith("weight")
                  and "LayerNorm" not in k and "layer_norm" not in k]
        if values:
            out[kind] = (min(values), max(values))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="HF dir (or 'minilm') to measure against")
    p.add_argument("models", nargs="+", help="HF dirs to compare with the reference")
    p.add_argument("--top", type=int, default=12, help="largest changes printed per model")
    p.add_argument("--json", help="write {model: {tensor: change}} here")
    args = p.parse_args(argv)
    reference = load(args.reference)
    results = {}
    for model in args.models:
        changes = relative_change(reference, load(model))
        if not changes:
            raise SystemExit(f"{model}: no tensor in common with {args.reference}")
        results[model] = changes
        print(f"\n{model} against {args.reference}: {len(changes)} tensors in common")
        for name, value in sorted(changes.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {'from 0' if np.isinf(value) else f'{value:.2%}':>8}  {name}")
        for kind, (lo, hi) in by_kind(changes).items():
            print(f"  {kind:>10}: {lo:.2%} - {hi:.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({m: {k: "from 0" if np.isinf(v) else v for k, v in c.items()}
                       for m, c in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
