"""Logit parity between the Flax model and `transformers` PyTorch on one fixed random batch.

Used by `convert --verify`, `export --verify`, purify's final check and the tests. The batch has
padding (rows of different lengths) and, for BERT, both token types, so masks, position ids and
token-type embeddings are all exercised (families without token types get none). Heads: "mlm",
"classify", "encode" (every layer's hidden states), "discriminate" (ELECTRA). Tolerance policy:
1e-4 on fp32 logits, never relaxed.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

TOLERANCE = 1e-4
log = logging.getLogger(__name__)


def fixed_batch(vocab_size: int, pad_token_id: int, *, batch: int = 3, length: int = 16,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids avoiding the pad id; row i padded after `length - 3 * i` tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab_size, size=(batch, length))
    ids = np.where(ids == pad_token_id, (pad_token_id + 1) % vocab_size, ids)
    mask = np.ones_like(ids)
    for i in range(batch):
        mask[i, max(2, length - 3 * i):] = 0
    ids = np.where(mask > 0, ids, pad_token_id)
    types = np.zeros_like(ids)
    types[:, length // 2:] = 1
    return {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
            "token_type_ids": types.astype(np.int32)}


def typed_batch(cfg, **kwargs) -> dict[str, np.ndarray]:
    """`fixed_batch` with the token types the model `cfg` has (one type: all 0; none: absent)."""
    batch = fixed_batch(cfg.vocab_size, cfg.pad_token_id, **kwargs)
    if cfg.type_vocab_size < 2:
        batch["token_type_ids"][:] = 0
    if not cfg.type_vocab_size:
        del batch["token_type_ids"]
    return batch


def torch_logits(hf_dir: str | os.PathLike, batch: dict[str, np.ndarray], head: str = "mlm"):
    """Logits of the HF dir loaded by transformers (safetensors, no remote code)."""
    import torch
    import transformers

    cls = {"mlm": transformers.AutoModelForMaskedLM,
           "classify": transformers.AutoModelForSequenceClassification,
           "encode": transformers.AutoModel,
           "discriminate": transformers.AutoModelForPreTraining}[head]
    model = cls.from_pretrained(str(pathlib.Path(hf_dir)), trust_remote_code=False).eval()
    inputs = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=(head == "encode"))
    if head == "encode":
        return np.stack([h.numpy() for h in out.hidden_states])
    return out.logits.numpy()


def flax_logits(model, params, batch: dict[str, np.ndarray], head: str = "mlm"):
    import jax.numpy as jnp

    args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    if head in ("classify", "discriminate"):
        method = getattr(type(model), head)
        return np.asarray(model.apply({"params": params}, *args, method=method))
    if head == "encode":
        hidden = model.apply({"params": params}, *args, method=type(model).encode)
        return np.asarray(jnp.stack(hidden))
    return np.asarray(model.apply({"params": params}, *args))


def max_logit_diff(model, params, hf_dir, head: str = "mlm") -> float:
    """max |Flax - PyTorch| over the non-padded positions of the fixed batch."""
    cfg = model.cfg
    batch = typed_batch(cfg)
    ours = flax_logits(model, params, batch, head)
    ref = torch_logits(hf_dir, batch, head)
    if head == "classify":
        return float(np.abs(ours - ref).max())
    mask = batch["attention_mask"] > 0
    if head == "encode":
        return float(np.abs(ours - ref)[:, mask].max())
    return float(np.abs(ours - ref)[mask].max())


def verify(model, params, hf_dir, head: str = "mlm", tolerance: float = TOLERANCE) -> float:
    """Raises if the logits differ by more than `tolerance`; returns the difference."""
    diff = max_logit_diff(model, params, hf_dir, head)
    print(f"parity: max |delta logits| = {diff:.3e} (tolerance {tolerance:.0e}) vs transformers "
          f"PyTorch on {hf_dir}")
    if not diff <= tolerance:
        raise RuntimeError(f"parity check failed: max |delta logits| {diff:.3e} > {tolerance:.0e}")
    return diff
