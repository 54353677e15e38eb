"""The demo's two training stages (POR attack, `strong` purify), packed and unpacked, wall clock.

    python benchmarks/demo_stages.py            # the full demo's sizes
    python benchmarks/demo_stages.py --fast     # the --fast sizes (a smoke run)

Runs `python -m recipe_jax.demo`'s attack and purify stages with their configs
(`demo.stage_configs`), once with data.packing=False and once with True, and prints one JSON line
with each stage's seconds and the ratio. The purify stage's closing scan is left out (it does not
depend on packing and would hide the difference); each run's `others_cpu_share` says whether
other processes shared the CPU (`loaded` above 0.1).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step import LOADED, CpuMeter  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="the demo's --fast sizes")
    args = p.parse_args(argv)
    from recipe_jax import attack, demo, purify, synthetic

    size = demo.FAST if args.fast else demo.FULL
    out: dict = {"sizes": "fast" if args.fast else "full", "loaded": False}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        aux = tmp / "aux.txt"
        aux.write_text("\n".join(synthetic.aux_corpus(size["aux"], seed=0)) + "\n")
        for packing in (False, True):
            tag = "packed" if packing else "unpacked"
            cfg = demo.stage_configs(size, aux)
            cfg["attack"].data.packing = cfg["purify"].data.packing = packing
            cfg["purify"].scan.enabled = False
            cfg["purify"].model.init_from = str(tmp / f"attack_{tag}" / "hf")
            for stage, fn in (("attack", attack.run), ("purify", purify.run)):
                with CpuMeter() as meter:
                    t = time.perf_counter()
                    fn(cfg[stage], str(tmp / f"{stage}_{tag}"))
                    out[f"{stage}_{tag}_s"] = round(time.perf_counter() - t, 1)
                out[f"{stage}_{tag}_cpu_share"] = round(meter.share, 3)
                out["loaded"] |= meter.share > LOADED
    for stage in ("attack", "purify"):
        out[f"{stage}_unpacked_over_packed"] = round(
            out[f"{stage}_unpacked_s"] / out[f"{stage}_packed_s"], 3)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
