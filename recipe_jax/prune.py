r"""Pruning baselines (docs/method.md): FP, FP-GM and FP-GA on the intermediate neurons.

    python -m recipe_jax.prune --config configs/prune.py:fp_gm --workdir runs/prune_gm \
        --config.model.init_from=path/to/suspicious_hf_dir \
        --config.data.aux_path=path/to/sentences.txt

A neuron is one output of a layer's intermediate dense: pruning it zeroes its row of the
PyTorch weight [F, H] (column j of the Flax kernel [H, F]) and its bias entry; nothing else
changes. In a gated FFN (ModernBERT's GLU, intermediate kernel [H, 2F]) neuron j is the input
column j, the gate column F + j (bias entries alike) and row j of the output kernel [F, H]: all
are zeroed, and its weight norm (GM) is that of both columns.
FP zeroes every neuron of the last layer. FP-GM and FP-GA prune a global budget of
`prune.fraction` of all L·F neurons: those with the smallest weight-row L2 norm (GM), or the
smallest mean post-activation value at [CLS] on the aux data (GA, Fine-pruning's criterion).
The paper's exact criteria are unpublished; these rankings and the fraction-based budget are
*ours* (configs/prune.py). Writes the pruned model as a Hugging Face dir, `DIR/hf/`, and
`DIR/pruned.json` (method, budget, pruned count and indices per layer). `--help` lists every
flag and config key.
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from recipe_jax import activations, checkpoint, cli, data, hf, outputs
from recipe_jax.arch import ModelConfig
from recipe_jax.model import Transformer

METHODS = ("fp", "fp_gm", "fp_ga")
# Aux rows per activation pass: bounds host memory at CHUNK x L x F floats whatever the data size.
CHUNK = 4096


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, the bad value and the fix."""
    def bad(key, value, fix):
        raise ValueError(f"{key}={value!r}: {fix}")

    p = config.prune
    if p.method not in METHODS:
        bad("prune.method", p.method, f"use one of {', '.join(METHODS)}")
    if p.method != "fp" and not 0 < p.fraction < 1:
        bad("prune.fraction", p.fraction, "use a share in (0, 1), e.g. 4/12 = 0.333...")
    if p.batch_size < 1:
        bad("prune.batch_size", p.batch_size, "use a positive integer")
    if p.method == "fp_ga" and not config.data.aux_path:
        bad("data.aux_path", "", "fp_ga needs aux text: a .txt/.tsv/.csv/.jsonl file or tfds:NAME")
    if not 3 <= config.data.max_length <= 4096:
        bad("data.max_length", config.data.max_length, "use 3..4096 (purify uses 64)")
    if config.data.max_examples < 0:
        bad("data.max_examples", config.data.max_examples, "use 0 (all) or a positive count")


# ------------------------------------------------------------------------- pure functions

def _dense(params, layer: int) -> dict:
    return params["encoder"][f"layer_{layer}"]["intermediate"]["dense"]


def _gated(params) -> bool:
    """A GLU's intermediate dense is twice as wide as the output dense's input (ModernBERT)."""
    layer = params["encoder"]["layer_0"]
    if "output" not in layer:  # a bare intermediate dense (hand-built trees)
        return False
    return (np.shape(layer["intermediate"]["dense"]["kernel"])[1]
            == 2 * np.shape(layer["output"]["dense"]["kernel"])[0])


def _num_layers(params) -> int:
    return sum(1 for k in params["encoder"] if k.startswith("layer_"))


def neuron_budget(fraction: float, num_layers: int, ffn: int) -> int:
    """Neurons pruned: round(fraction · L · F); 4/12 of BERT-base (12 × 3072) is 4 · 3072."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r}: use a share in [0, 1]")
    return int(round(fraction * num_layers * ffn))


def prune_neurons(params, mask_lf: np.ndarray):
    """A copy of `params` with neuron (l, j) zeroed where mask_lf[l, j]: column j of layer l's
    intermediate kernel [H, F] (row j of the PyTorch weight) and bias entry j; in a gated FFN
    also column F + j (the gate) and row j of the output kernel. Every other value, and
    `params` itself, stays bitwise unchanged."""
    params = nn.unbox(params)
    mask_lf = np.asarray(mask_lf)
    num_layers, gated = _num_layers(params), _gated(params)
    ffn = np.shape(_dense(params, 0)["kernel"])[1] // (2 if gated else 1)
    if mask_lf.dtype != np.bool_ or mask_lf.shape != (num_layers, ffn):
        raise ValueError(f"mask must be bool [L={num_layers}, F={ffn}], got {mask_lf.dtype} "
                         f"{mask_lf.shape}")
    out = jax.tree.map(lambda leaf: leaf, params)  # fresh containers, shared leaves
    for layer in range(num_layers):
        if not mask_lf[layer].any():
            continue
        dense = _dense(out, layer)
        columns = np.tile(mask_lf[layer], 2) if gated else mask_lf[layer]  # [F] or [2F]
        for name in ("kernel", "bias"):
            if name in dense:  # ModernBERT's linears have no bias (mlp_bias=False)
                value = np.asarray(dense[name])
                dense[name] = np.where(columns, value.dtype.type(0), value)
        if gated:  # the neuron's row of the output kernel [F, H]
            output = out["encoder"][f"layer_{layer}"]["output"]["dense"]
            kernel_fh = np.asarray(output["kernel"])
            output["kernel"] = np.where(mask_lf[layer][:, None], kernel_fh.dtype.type(0),
                                        kernel_fh)
    return out


def last_layer_mask(cfg: ModelConfig) -> np.ndarray:
    """FP: every neuron of the last layer's intermediate dense."""
    mask_lf = np.zeros((cfg.num_hidden_layers, cfg.intermediate_size), bool)
    mask_lf[-1] = True
    return mask_lf


def rank_by_magnitude(params, cfg: ModelConfig) -> np.ndarray:
    """float64 [L, F]: L2 norm of each neuron's weight row (PyTorch layout; bias excluded);
    gated FFN: of its input and gate rows together."""
    params = nn.unbox(params)
    ffn = cfg.intermediate_size
    return np.stack([np.linalg.norm(np.asarray(_dense(params, layer)["kernel"], np.float64)
                                    .reshape(cfg.hidden_size, -1, ffn), axis=(0, 1))
                     for layer in range(cfg.num_hidden_layers)])


def rank_by_activation(acts_nlf: np.ndarray) -> np.ndarray:
    """float64 [L, F]: mean activation over the N examples."""
    acts_nlf = np.asarray(acts_nlf)
    if acts_nlf.ndim != 3 or not len(acts_nlf):
        raise ValueError(f"activations must be a non-empty [N, L, F] array, got {acts_nlf.shape}")
    return acts_nlf.mean(axis=0, dtype=np.float64)


def select_lowest(scores_lf: np.ndarray, count: int) -> np.ndarray:
    """bool [L, F] marking the `count` lowest scores over all layers (ties: lower layer, then
    lower index, first)."""
    scores_lf = np.asarray(scores_lf)
    if not 0 <= count <= scores_lf.size:
        raise ValueError(f"count={count}: use 0..{scores_lf.size} (the number of neurons)")
    order = np.argsort(scores_lf, axis=None, kind="stable")
    mask = np.zeros(scores_lf.size, bool)
    mask[order[:count]] = True
    return mask.reshape(scores_lf.shape)


# ---------------------------------------------------------------------------------- stage

def mean_cls_activation(config, model: Transformer, params, model_dir) -> tuple[np.ndarray, int]:
    """FP-GA scores [L, F]: mean post-activation at [CLS] over the aux data, and its row count."""
    texts = data.read_texts(config.data.aux_path, max_examples=config.data.max_examples)
    if config.data.max_length > model.cfg.max_position_embeddings:
        raise ValueError(f"data.max_length={config.data.max_length} exceeds the model's "
                         f"max_position_embeddings={model.cfg.max_position_embeddings}")
    enc = data.tokenize(data.load_tokenizer(model_dir), texts, config.data.max_length)
    n = len(texts)
    scores_lf = np.zeros((model.cfg.num_hidden_layers, model.cfg.intermediate_size))
    for start in range(0, n, CHUNK):  # weighted mean of chunk means == mean over all rows
        rows = slice(start, start + CHUNK)
        pre_nlf = activations.cls_preactivations(model, params, enc["input_ids"][rows],
                                                 enc["attention_mask"][rows],
                                                 batch_size=config.prune.batch_size)
        post_nlf = activations.post_activation(model.cfg, pre_nlf)
        scores_lf += rank_by_activation(post_nlf) * (len(post_nlf) / n)
    return scores_lf, n


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole prune stage; returns the summary written to DIR/pruned.json."""
    validate(config)
    started = time.perf_counter()
    model_dir = hf.resolve_model_dir(config.model.init_from)
    # A rerun replaces its own hf/ and pruned.json only with the same settings.
    workdir = outputs.claim_dir(workdir, "run:prune", inputs=[model_dir])
    checkpoint.check_run_record(workdir, config)
    model, params = hf.load_pretrained(model_dir, drop_extra_heads=config.model.drop_extra_heads)
    cfg = model.cfg
    method = config.prune.method
    total = cfg.num_hidden_layers * cfg.intermediate_size
    summary = {"method": method, "source": str(model_dir), "total_neurons": total}

    # --- Which neurons.
    if method == "fp":
        mask_lf = last_layer_mask(cfg)
    else:
        count = neuron_budget(config.prune.fraction, cfg.num_hidden_layers, cfg.intermediate_size)
        if method == "fp_gm":
            scores_lf = rank_by_magnitude(params, cfg)
        else:
            scores_lf, summary["num_examples"] = mean_cls_activation(config, model, params,
                                                                     model_dir)
        mask_lf = select_lowest(scores_lf, count)
        summary.update(fraction=config.prune.fraction, budget=count)

    # --- Prune and export.
    pruned = prune_neurons(params, mask_lf)
    out = hf.save_pretrained(model, pruned, workdir / "hf", tokenizer_from=model_dir)
    summary.update(
        count=int(mask_lf.sum()),
        count_per_layer=[int(c) for c in mask_lf.sum(axis=1)],
        neurons={str(layer): np.flatnonzero(row).tolist() for layer, row in enumerate(mask_lf)},
        seconds=round(time.perf_counter() - started, 3),
    )
    tmp = workdir / "pruned.json.tmp"
    tmp.write_text(json.dumps(summary) + "\n")  # one line: "neurons" holds up to L*F indices
    os.replace(tmp, workdir / "pruned.json")
    print(f"prune: {method} zeroed {summary['count']} of {total} intermediate neurons "
          f"(per layer {summary['count_per_layer']}) in {summary['seconds']:.1f} s; "
          f"exported {out}", flush=True)
    return summary


if __name__ == "__main__":
    cli.run(run, name="prune", doc=__doc__, default_config="configs/prune.py")
