"""HF checkpoint -> Orbax checkpoint of Flax params (plus the model description and tokenizer).

    python -m recipe_jax.convert --hf path/to/hf_dir --out runs/converted [--verify] [--overwrite]

`--verify` runs transformers PyTorch and the Flax model on the same fixed padded batch and exits
non-zero when the logits differ by more than 1e-4.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import sys

from recipe_jax import checkpoint, cli, data, hf, outputs, parity

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model dir (config.json + "
                        "model.safetensors or pytorch_model.bin, tokenizer files)")
    parser.add_argument("--out", required=True, help="output run dir (source/ + checkpoints/)")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with transformers PyTorch (needs torch)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier conversion (or whatever) at --out")
    parser.add_argument("--drop-extra-heads", action="store_true",
                        help="leave out task heads the model's family does not have (named in a "
                        "warning); unknown tensors inside the encoder stay an error")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    try:
        out = _claim_out(args.out, args.hf, args.overwrite, create=False)  # before any loading
        model, params, info = hf.load_pretrained(args.hf, with_info=True,
                                                 drop_extra_heads=args.drop_extra_heads)
        if args.verify:
            # A source without an MLM head (e.g. a BertModel): compare encoder states instead.
            fresh_mlm = any(k.startswith(("cls.predictions.", "lm_head.")) for k in info["fresh"])
            head = "encode" if fresh_mlm else "mlm"
            parity.verify(model, params, args.hf, head=head)
        if not any((pathlib.Path(args.hf) / f).is_file() for f in data.VOCAB_FILES):
            log.warning("%s has no tokenizer files (%s): the run converts, but purify, attack and "
                        "evaluate of it need them; copy them into %s/source/", args.hf,
                        ", ".join(data.VOCAB_FILES), out)
        _claim_out(args.out, args.hf, args.overwrite, create=True)  # nothing written before
        checkpoint.write_source(out, model.cfg, hf.read_config(args.hf), args.hf)
        checkpoint.save_params(out, params)
    except (*cli.USER_ERRORS, RuntimeError) as e:
        return cli.report("convert", e)
    print(f"convert: wrote {args.out} ({hf.summary(model, params)})")
    return 0


def _claim_out(out: str, source: str, overwrite: bool, create: bool = True) -> pathlib.Path:
    """--out: absent or empty; an earlier conversion is named, not silently reused; with
    --overwrite anything but a file or a path inside or above the source, removed first (only
    with `create`: else it is just checked)."""
    path = pathlib.Path(out).absolute()
    marker = outputs.read_marker(path) if path.is_dir() else None
    if marker is not None and not overwrite:
        raise outputs.OutputError(
            f"{path}: already holds a recipe_jax {marker.get('kind')} (source/ and "
            "checkpoints/); pass a new --out, or add --overwrite to replace it")
    outputs.check_replace(path, "run:convert", inputs=[source], overwrite=overwrite,
                          flag="--out")
    if not create:
        return path
    if overwrite and path.is_dir():
        shutil.rmtree(path)
    return outputs.claim_dir(path, "run:convert", inputs=[source], flag="--out")


if __name__ == "__main__":
    sys.exit(main())
