"""Orbax run dir (from `convert`, or a purify/attack workdir) -> Hugging Face model dir.

    python -m recipe_jax.export --ckpt runs/purify --out runs/purify_hf [--verify] [--step N]

Writes config.json, model.safetensors (safetensors.numpy; torch not needed) and the source's
tokenizer files, atomically. `--verify` loads the result with transformers PyTorch and compares
logits with the Flax model on a fixed padded batch (exit 1 above 1e-4).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import jax

from recipe_jax import checkpoint, cli, hf, outputs, parity, sharding
from recipe_jax.model import Transformer

log = logging.getLogger(__name__)


def export(run_dir, out_dir, *, step: int | None = None, verify: bool = False,
           overwrite: bool = False) -> int:
    """Exports the newest (or given) step of `run_dir` to `out_dir`; returns the step. `out_dir`
    must be absent, empty or an export this tool wrote (else `overwrite`), and never inside or
    above `run_dir`: checked before anything is read."""
    outputs.check_replace(out_dir, "hf", inputs=[run_dir], overwrite=overwrite)
    _, hf_config, source = checkpoint.read_source(run_dir)  # a run dir, before any restore
    model, params, step = checkpoint.restore_params(run_dir, step)
    hf.save_pretrained(model, params, out_dir, tokenizer_from=source, base_config=hf_config,
                       overwrite=overwrite)
    if verify:
        parity.verify(model, params, out_dir, head="classify" if model.cfg.num_labels else "mlm")
    return step


def write_hf(workdir: pathlib.Path, name: str, model: Transformer, params, *,
              verify: bool, summary: dict) -> dict:
    """What a training stage ends with: `workdir/hf` from the trained `params` (gathered to
    process 0, which writes it atomically) and `workdir/summary.json`; checks logits if asked."""
    host = sharding.fetch_to_host(params)
    if jax.process_index() == 0:
        _, hf_config, source = checkpoint.read_source(workdir)
        out = hf.save_pretrained(model, host, workdir / "hf", tokenizer_from=source,
                                 base_config=hf_config)
        if verify:
            try:
                summary["export_max_logit_diff"] = parity.verify(model, host, out)
            except ImportError:
                log.warning("torch is not installed: skipped the export's logit check")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{name}: exported {out}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run dir written by convert/purify/attack")
    parser.add_argument("--out", required=True, help="output Hugging Face model dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--verify", action="store_true",
                        help="reload with transformers PyTorch and compare logits")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace whatever is at --out (default: only an earlier export)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        step = export(args.ckpt, args.out, step=args.step, verify=args.verify,
                      overwrite=args.overwrite)
    except (*cli.USER_ERRORS, RuntimeError) as e:
        return cli.report("export", e)
    print(f"export: wrote {args.out} from step {step} of {args.ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
