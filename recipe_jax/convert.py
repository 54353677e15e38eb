"""HF checkpoint -> Orbax checkpoint of Flax params (plus the model description and tokenizer).

    python -m recipe_jax.convert --hf path/to/hf_dir --out runs/converted [--verify]

`--verify` runs transformers PyTorch and the Flax model on the same fixed padded batch and exits
non-zero when the logits differ by more than 1e-4.
"""

from __future__ import annotations

import argparse
import logging
import sys

from recipe_jax import checkpoint, hf, parity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model dir (config.json + "
                        "model.safetensors or pytorch_model.bin, tokenizer files)")
    parser.add_argument("--out", required=True, help="output run dir (source/ + checkpoints/)")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with transformers PyTorch (needs torch)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    try:
        model, params, info = hf.load_pretrained(args.hf, with_info=True)
        if args.verify:
            # A source without an MLM head (e.g. a BertModel): compare encoder states instead.
            fresh_mlm = any(k.startswith(("cls.predictions.", "lm_head.")) for k in info["fresh"])
            head = "encode" if fresh_mlm else "mlm"
            parity.verify(model, params, args.hf, head=head)
        checkpoint.write_source(args.out, model.cfg, hf.read_config(args.hf), args.hf)
        checkpoint.save_params(args.out, params)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"convert: wrote {args.out} ({hf.summary(model, params)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
