r"""Selective-activation diagnostic (docs/method.md): which neurons a trigger word switches on.

    python -m recipe_jax.diagnose --model clean=minilm --model backdoored=runs/attack/hf \
        --model purified=runs/purify/hf --aux path/to/sentences.txt \
        --triggers cf,tq,mn,bb,mb --workdir runs/diagnose [--max-examples 200]

From Python: `diagnose.run(models={"clean": "minilm", ...}, aux=PATH, triggers=[...],
workdir=DIR)`.

For each trigger t and aux sentence x, x⊕t inserts t once at the release's position (a fresh
`random.Random(42)` per sentence, `randint(0, len(words))`). Per neuron of every layer's
intermediate dense, at [CLS], on the pre-activation: Δ = mean a(x⊕t) − mean a(x) and
z = Δ / sqrt((var_clean + var_poisoned) / n). A backdoored model concentrates Δ in a few neurons;
the "top-1% share" = ‖Δ over the 1% largest |Δ|‖₂ / ‖Δ‖₂ measures that (0.1 if Δ were spread
evenly, → 1 when a handful of neurons carry it). Real models are far from even (the last layers'
[CLS] pre-activations move most), so compare the share across models, not against 0.1.
A gated FFN (ModernBERT's GLU) has two pre-activations per neuron (input u, gate g); there the
diagnostic reads the neuron's value act(u) * g instead (activations.per_neuron).
Sentences whose triggered version would be truncated at --max-length are left out, so every pair
really contains the trigger.
Writes `OUT/report.md`, `OUT/report.json`, `OUT/layer_max_delta.png`, `OUT/sorted_delta.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from recipe_jax import activations, cli, data, hf, metrics, outputs
from recipe_jax.model import Transformer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TRIGGERS = "cf,tq,mn,bb,mb"
TOP_SHARE = 0.01  # the "top 1%" of neurons


# --------------------------------------------------------------------------- statistics

def trigger_stats(clean_nlf: np.ndarray, poisoned_nlf: np.ndarray, *, top_k: int) -> dict:
    """Δ, z [L, F] and their summaries for one trigger, from paired [N, L, F] activations."""
    n = len(clean_nlf)
    if n < 2 or clean_nlf.shape != poisoned_nlf.shape:
        raise ValueError(f"need >= 2 clean/poisoned pairs of equal shape, got {clean_nlf.shape} "
                         f"and {poisoned_nlf.shape}")
    delta_lf = poisoned_nlf.mean(0, dtype=np.float64) - clean_nlf.mean(0, dtype=np.float64)
    var_lf = clean_nlf.var(0, ddof=1, dtype=np.float64) + poisoned_nlf.var(0, ddof=1,
                                                                           dtype=np.float64)
    se_lf = np.sqrt(var_lf / n)
    z_lf = np.divide(delta_lf, se_lf, out=np.zeros_like(delta_lf), where=se_lf > 0)
    abs_lf = np.abs(delta_lf)
    ffn = delta_lf.shape[1]
    order = np.argsort(-abs_lf, axis=None, kind="stable")
    top = max(1, math.ceil(TOP_SHARE * delta_lf.size))
    norm = float(np.linalg.norm(delta_lf))
    share = float(np.linalg.norm(abs_lf.ravel()[order[:top]]) / norm) if norm > 0 else 0.0
    neurons = []
    for flat in order[:top_k]:
        layer, index = divmod(int(flat), ffn)
        neurons.append({"layer": layer, "index": index, "delta": float(delta_lf[layer, index]),
                        "z": float(z_lf[layer, index])})
    return {"delta": delta_lf, "z": z_lf, "top_neurons": neurons, "top1_share": share,
            "top1_count": top, "max_abs_delta": float(abs_lf.max()),
            "max_abs_z": float(np.abs(z_lf).max()),
            "layer_max_abs_delta": [float(v) for v in abs_lf.max(axis=1)]}


def _fits(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> np.ndarray:
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
    return np.asarray(lengths) <= max_length


def selective_activation(model: Transformer, params, tokenizer: PreTrainedTokenizerBase,
                         sentences: Sequence[str], triggers: Sequence[str], *, max_length: int,
                         batch_size: int, top_k: int) -> dict[str, Any]:
    """The §6 diagnostic of one model: {"num_pairs", "num_dropped", "triggers": {t: stats}}.

    stats (see `trigger_stats`): "delta" and "z" (float64 [L, F]), "top_neurons" (top_k dicts
    of layer, index, delta, z by |Δ|), "top1_share", "max_abs_delta", "layer_max_abs_delta"."""
    if not triggers or not sentences:
        raise ValueError("need at least one trigger and one sentence")
    poisoned = {t: [metrics.insert_trigger(s, t) for s in sentences] for t in triggers}
    keep = np.ones(len(sentences), bool)
    for texts in poisoned.values():  # one sentence set for all triggers, comparable across them
        keep &= _fits(tokenizer, texts, max_length)
    if keep.sum() < 2:
        raise ValueError(f"only {int(keep.sum())} sentences stay under max_length={max_length} "
                         "with a trigger inserted; pass more or shorter sentences, or a larger "
                         "max_length")
    rows = np.flatnonzero(keep)

    def cls_acts(texts):  # one trigger at a time: host memory stays at 2 x [N, L, F]
        enc = data.tokenize(tokenizer, [texts[i] for i in rows], max_length)
        return activations.per_neuron(model.cfg, activations.cls_preactivations(
            model, params, enc["input_ids"], enc["attention_mask"], batch_size=batch_size))

    clean_nlf = cls_acts(sentences)
    return {"num_pairs": len(rows), "num_dropped": int(len(sentences) - len(rows)),
            "top_k": top_k,
            "triggers": {t: trigger_stats(clean_nlf, cls_acts(poisoned[t]), top_k=top_k)
                         for t in triggers}}


# ------------------------------------------------------------------------------- report

def _json_ready(results: dict[str, dict]) -> dict:
    """The report without the [L, F] arrays (those are in the plots)."""
    return {name: {**r, "triggers": {t: {k: v for k, v in s.items() if k not in ("delta", "z")}
                                     for t, s in r["triggers"].items()}}
            for name, r in results.items()}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def line(cells):  # a literal "|" (as in |Δ|) would end the cell: escape it
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def render_markdown(results: dict[str, dict], meta: dict[str, Any]) -> str:
    """report.md: a comparison across models, then one section per model."""
    first = next(iter(results.values()))
    triggers = list(first["triggers"])
    top1 = next(iter(first["triggers"].values()))["top1_count"]
    lines = ["# Selective-activation report", "",
             f"Aux: `{meta['aux']}`; triggers: {', '.join(triggers)}; max length "
             f"{meta['max_length']}. [CLS] pre-activations of every intermediate dense; "
             "Δ = mean a(x⊕t) − mean a(x); z = Δ / sqrt((var_clean + var_poisoned) / n); "
             f"top-1% share = ‖Δ over the top {top1} neurons by |Δ|‖₂ / ‖Δ‖₂ "
             f"({math.sqrt(TOP_SHARE):.2f} if Δ were spread evenly, → 1 when a few neurons carry "
             "it; compare it across models rather than against that).",
             "", "## Comparison", "", "Top-1% share of ‖Δ‖₂:", ""]
    lines += _table(["model", *triggers, "mean"], [
        [name, *(f"{r['triggers'][t]['top1_share']:.3f}" for t in triggers),
         f"{np.mean([r['triggers'][t]['top1_share'] for t in triggers]):.3f}"]
        for name, r in results.items()])
    lines += ["", "max |Δ|:", ""]
    lines += _table(["model", *triggers, "max"], [
        [name, *(f"{r['triggers'][t]['max_abs_delta']:.3f}" for t in triggers),
         f"{max(r['triggers'][t]['max_abs_delta'] for t in triggers):.3f}"]
        for name, r in results.items()])
    for name, r in results.items():
        stats = r["triggers"]
        lines += ["", f"## {name}", "", f"`{meta['models'][name]}`: {r['num_pairs']} pairs "
                  f"({r['num_dropped']} sentences left out: the trigger would be truncated).", ""]
        lines += _table(["trigger", "top-1% share", "max |Δ|", "max |z|", "layer of max |Δ|"], [
            [t, f"{s['top1_share']:.3f}", f"{s['max_abs_delta']:.3f}", f"{s['max_abs_z']:.1f}",
             int(np.argmax(s["layer_max_abs_delta"]))] for t, s in stats.items()])
        lines += ["", f"Top {r['top_k']} neurons by |Δ| (L<layer>#<index>: Δ, z):", ""]
        lines += _table(["rank", *triggers], [
            [rank + 1, *(_neuron(stats[t]["top_neurons"][rank]) for t in triggers)]
            for rank in range(min(len(s["top_neurons"]) for s in stats.values()))])
    lines += ["", "Plots: `layer_max_delta.png` (max |Δ| per layer), `sorted_delta.png` "
              "(|Δ| of all neurons, sorted).", ""]
    return "\n".join(lines)


def _neuron(n: dict) -> str:
    return f"L{n['layer']}#{n['index']}: {n['delta']:+.3f}, {n['z']:+.1f}"


def plot(results: dict[str, dict], workdir: pathlib.Path) -> list[pathlib.Path]:
    """layer_max_delta.png and sorted_delta.png, one panel per model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    triggers = list(results[names[0]]["triggers"])
    width = 0.8 / len(triggers)
    paths = []
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for i, t in enumerate(triggers):
            values = results[name]["triggers"][t]["layer_max_abs_delta"]
            ax.bar(np.arange(len(values)) + (i - (len(triggers) - 1) / 2) * width, values, width,
                   label=t)
        ax.set(title=name, xlabel="layer", xticks=np.arange(len(values)))
    axes[0][0].set_ylabel("max |Δ| at [CLS]")
    axes[0][-1].legend(title="trigger", fontsize="small")
    paths.append(_save(fig, workdir / "layer_max_delta.png"))

    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for t in triggers:
            curve = np.sort(np.abs(results[name]["triggers"][t]["delta"]), axis=None)[::-1]
            ax.plot(np.arange(1, curve.size + 1), curve, label=t)
        ax.set(title=name, xscale="log", xlabel="neuron rank by |Δ|")
    axes[0][0].set_ylabel("|Δ| at [CLS]")
    axes[0][-1].legend(title="trigger", fontsize="small")
    paths.append(_save(fig, workdir / "sorted_delta.png"))
    return paths


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, dict], workdir: str | os.PathLike,
                 meta: dict[str, Any]) -> pathlib.Path:
    """report.md, report.json and the PNGs in `workdir`; returns report.md's path."""
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out)
    (out / "report.json").write_text(json.dumps({"meta": meta, "models": _json_ready(results)},
                                                indent=1, ensure_ascii=False) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(results, meta))
    return path


# --------------------------------------------------------------------------------- main

def _parse_models(specs: Sequence[str]) -> dict[str, str]:
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model {spec!r}: use NAME=DIR (DIR may be 'minilm')")
        if name in models:
            raise ValueError(f"--model {spec!r}: the name {name!r} is given twice")
        models[name] = path
    return models


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m recipe_jax.diagnose", description=__doc__.split("\n\n")[0],
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a model to diagnose (repeat; DIR = HF dir or 'minilm')")
    parser.add_argument("--aux", required=True, help="plain text (.txt/.tsv/.csv/.jsonl)")
    parser.add_argument("--triggers", default=DEFAULT_TRIGGERS,
                        help=f"comma-separated trigger words (default {DEFAULT_TRIGGERS})")
    parser.add_argument("--workdir", required=True, help="output dir for report.md, PNGs")
    parser.add_argument("--max-examples", type=int, default=200,
                        help="aux sentences to use, the first N (default 200; 0 = all)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="forward batch (default 32)")
    parser.add_argument("--top-k", type=int, default=10, help="neurons listed (default 10)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def run(*, models: dict[str, str | os.PathLike], aux: str | os.PathLike,
        triggers: Sequence[str], workdir: str | os.PathLike, max_examples: int = 200,
        max_length: int = 128, batch_size: int = 32, top_k: int = 10) -> pathlib.Path:
    """The diagnostic of every model in `models` (name -> HF dir or "minilm") for `triggers`
    on the first `max_examples` sentences of `aux`; returns the path of the written report."""
    triggers = [t.strip() for t in triggers if t.strip()]
    if not triggers:
        raise ValueError(f"--triggers={','.join(triggers)!r}: give comma-separated words, e.g. "
                         f"{DEFAULT_TRIGGERS}")
    for flag, value, low in (("--max-length", max_length, 3), ("--batch-size", batch_size, 1),
                             ("--top-k", top_k, 1)):
        if value < low:
            raise ValueError(f"{flag}={value}: use an integer >= {low}")
    workdir = outputs.claim_dir(workdir, "diagnose", inputs=[
        hf.resolve_model_dir(str(spec)) for spec in models.values()])
    sentences = data.read_texts(aux, max_examples=max_examples)
    results, dirs = {}, {}
    for name, spec in models.items():
        model_dir = hf.resolve_model_dir(str(spec))
        dirs[name] = str(model_dir)
        model, params = hf.load_pretrained(model_dir)
        if max_length > model.cfg.max_position_embeddings:
            raise ValueError(f"--max-length={max_length} exceeds {name}'s "
                             f"max_position_embeddings={model.cfg.max_position_embeddings}")
        results[name] = selective_activation(
            model, params, data.load_tokenizer(model_dir), sentences, triggers,
            max_length=max_length, batch_size=batch_size, top_k=top_k)
        shares = [s["top1_share"] for s in results[name]["triggers"].values()]
        print(f"diagnose: {name}: {results[name]['num_pairs']} pairs, top-1% share "
              f"{', '.join(f'{t} {v:.3f}' for t, v in zip(triggers, shares, strict=True))}",
              flush=True)
    meta = {"aux": str(aux), "max_length": max_length, "models": dirs, "triggers": triggers}
    path = write_report(results, workdir, meta)
    print(f"diagnose: wrote {path}", flush=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(models=_parse_models(args.model), aux=args.aux, triggers=args.triggers.split(","),
            workdir=args.workdir, max_examples=args.max_examples, max_length=args.max_length,
            batch_size=args.batch_size, top_k=args.top_k)
    except cli.USER_ERRORS as e:
        cli.fail("diagnose", e)


if __name__ == "__main__":
    main()
