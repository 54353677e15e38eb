"""Checkpoints that are not today's layout: a config.json without `model_type`, and task heads
next to the ones recipe_jax knows (hf.load_pretrained calls these).

- `infer_model_type`: the family of a config written before transformers added the field, from
  `architectures`, else the weight names (DeBERTa-v2's query_proj, the prefixes), else a bare
  encoder's RoBERTa-only settings.
- `drop_unknown`: tensors that are neither the encoder nor a known head are an error that names
  them; with the `drop_extra_heads` opt-in those outside the encoder are left out (a warning
  lists them). Unknown tensors inside the encoder are always an error.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from recipe_jax import families, weights

log = logging.getLogger("recipe_jax.hf")

_ARCHITECTURE_TYPES = (("ModernBert", "modernbert"),
                       ("XLMRoberta", "xlm-roberta"), ("Camembert", "camembert"),
                       ("Roberta", "roberta"), ("DistilBert", "distilbert"),
                       ("Electra", "electra"), ("DebertaV2", "deberta-v2"), ("Bert", "bert"))
# First weight-name component -> family (heads included: a bare head checkpoint is rare).
# A bare DistilBERT has `transformer.*`, a bare small ELECTRA `embeddings_project.*`; a bare
# ELECTRA without the projection is BERT's layout and math, and loads as BERT.
_ROOT_TYPES = (({"roberta", "lm_head"}, "roberta"),
               ({"distilbert", "vocab_projector", "transformer"}, "distilbert"),
               ({"electra", "generator_lm_head", "discriminator_predictions",
                 "embeddings_project"}, "electra"),
               ({"bert", "cls"}, "bert"))


def infer_model_type(hf: dict[str, Any], model_dir: pathlib.Path) -> tuple[str, str]:
    """(model_type, how it was recognized) of a config.json without the field, the way a
    `transformers` user expects: from `architectures` (e.g. BertForPreTraining), else from
    the weight-name prefixes (`bert.`, `roberta.`, BERT's `cls.` heads), else, for a bare
    encoder, from its RoBERTa-only settings (padding id 1, one token type)."""
    for arch in hf.get("architectures") or ():
        for prefix, model_type in _ARCHITECTURE_TYPES:
            if isinstance(arch, str) and arch.startswith(prefix):
                return model_type, f"architectures={arch!r}"
    try:
        names = weights.weight_names(model_dir)
    except weights.WeightFileError:
        names = []
    if any(".attention.self.query_proj." in n for n in names):  # DeBERTa-v1 has in_proj
        return "deberta-v2", "its weight names (attention.self.query_proj)"
    roots = {n.split(".", 1)[0] for n in names}
    for known, model_type in _ROOT_TYPES:
        if roots & known:
            return model_type, f"its weight names ({', '.join(sorted(roots & known))}.*)"
    if roots & {"embeddings", "encoder"}:
        roberta = hf.get("pad_token_id") == 1 and hf.get("type_vocab_size") == 1
        return ("roberta" if roberta else "bert"), (
            "a bare encoder's settings (pad_token_id, type_vocab_size)")
    raise ValueError(f"{model_dir / 'config.json'}: no model_type, and neither `architectures` "
                     "nor the weight names say which family this is; add \"model_type\": "
                     "\"bert\" (or \"roberta\") to config.json")



def drop_unknown(state: dict, expected: set[str], model_type: str, model_dir,
                  drop_extra_heads: bool) -> tuple[dict, list[str]]:
    """(state without the extra heads, their names) or an error naming the unknown tensors."""
    unknown = sorted(set(state) - expected)
    if not unknown:
        return state, []
    inside = [k for k in unknown if k.startswith(f"{families.family(model_type).encoder_prefix}.")]
    heads = sorted({k.rsplit(".", 1)[0] for k in unknown if k not in inside})
    if drop_extra_heads and not inside:
        log.warning("%s: drop_extra_heads: leaving out %d tensor(s) of extra heads: %s",
                    model_dir, len(unknown), ", ".join(heads))
        return {k: v for k, v in state.items() if k not in set(unknown)}, unknown
    more = " ..." if len(unknown) > 10 else ""
    message = (f"{model_dir}: unknown weights (not part of a {model_type} encoder or its "
               f"heads): {unknown[:10]}{more}")
    if inside:
        message += (f"; {len(inside)} of them sit inside the encoder ({inside[:3]}), so this "
                    f"is not a {model_type} layout recipe_jax can load")
    else:
        message += ("; they are extra heads outside the encoder. To load the encoder and its "
                    "known heads without them, pass --drop-extra-heads (convert) or "
                    "--config.model.drop_extra_heads=True (every stage)")
    raise ValueError(message)
