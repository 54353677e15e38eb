"""Sequence packing (recipe_jax/packing.py): the plan, and the packed step's exactness."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import preset, tiny_hf, tiny_purify_config
from safetensors.numpy import load_file

from recipe_jax import attack, hf, masks, packing, purify
from recipe_jax.model import Transformer

L = 32


def _rows(rng, batch, vocab, pad, length=L):
    """Right-padded rows of random lengths 3..length/2: [CLS]-like 2, tokens, [SEP]-like 3."""
    n = rng.integers(3, length // 2 + 1, batch)
    mask = (np.arange(length)[None] < n[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(5, vocab, (batch, length)), pad).astype(np.int32)
    ids[:, 0] = 2
    ids[np.arange(batch), n - 1] = 3
    candidates = (mask > 0) & (ids > 3)
    return ids, mask, candidates


# ------------------------------------------------------------------------------------- plan

@pytest.mark.parametrize("groups", [1, 2, 4])
def test_plan_places_every_token_once_within_its_group_and_rows(groups):
    rng = np.random.default_rng(0)
    _, mask, _ = _rows(rng, 16, 50, 0)
    p = packing.plan(mask, groups)
    src, start = p["pack_src"], p["pack_start"]
    per, rows = 16 // groups, src.shape[1]
    assert src.shape[0] == groups and rows % packing.quantum(per) == 0
    n = mask.sum(1)
    for g in range(groups):
        placed = np.sort(src[g][src[g] >= 0])
        want = np.sort(np.concatenate([i * L + np.arange(n[g * per + i]) for i in range(per)]))
        np.testing.assert_array_equal(placed, want)  # each token exactly once, in its group
        for i in range(per):  # a sentence is contiguous in one row, from its start
            b, r, o = g * per + i, start[g * per + i] // L, start[g * per + i] % L
            assert o + n[b] <= L
            np.testing.assert_array_equal(src[g, r, o:o + n[b]], i * L + np.arange(n[b]))
    assert rows <= per and (groups > 1 or rows < per)  # 16 of mean ~10 tokens: fewer rows


def test_plan_row_count_is_agreed_and_bucketed():
    mask = np.ones((32, 8), np.int32)  # full rows: one sentence a row
    assert packing.plan(mask, 1)["pack_src"].shape == (1, 32, 8)
    short = np.zeros((32, 8), np.int32)
    short[:, :2] = 1  # 4 per row -> 8 rows, a multiple of quantum(32) = 4
    assert packing.plan(short, 1)["pack_src"].shape == (1, 8, 8)
    agreed = packing.plan(short, 1, agree=lambda sizes: [sizes[0] + 4])["pack_src"]
    assert agreed.shape == (1, 12, 8) and (agreed[0, 8:] == -1).all()  # padding rows
    assert [packing.quantum(n) for n in (1, 16, 17, 32, 320)] == [1, 1, 2, 2, 20]


def test_masked_slot_counts_match_the_masking_rule():
    """The host's count of labeled slots per row is the count masks.mask_tokens draws (float32
    rounding included: 0.15 * 10 is 1.5000001 in float32, 1.4999999 in float64)."""
    counts = np.arange(0, 60)
    cand = np.arange(64)[None, :] < counts[:, None]
    ids = np.full(cand.shape, 7, np.int32)
    drawn = masks.mask_tokens(jax.random.PRNGKey(0), ids, cand, mask_token_id=4, vocab_size=99,
                              num_positions=10, mask_prob=0.15)
    host, slots = packing.candidates_count(0.15, 10)({"candidates": cand})
    np.testing.assert_array_equal(host, np.asarray(drawn["weights"]).sum(axis=1))
    assert slots == 10 and host[10] == 2


def test_mlm_slots_list_every_labeled_slot_once():
    mask = np.zeros((8, 16), np.int32)
    mask[:, :6] = 1
    weights = (np.arange(3)[None, :] < np.array([0, 1, 2, 3, 3, 2, 1, 0])[:, None]).astype(
        np.float32)
    p = packing.plan(mask, 2, labeled_b=(weights > 0).sum(1), num_slots=3)
    slots = p["mlm_slots"]
    assert slots.shape == (2, 6) and slots.shape[1] % packing.quantum(12) == 0
    for g in range(2):
        listed = sorted(int(s) for s in slots[g] if s >= 0)
        want = [i * 3 + m for i in range(4) for m in range(3) if weights[g * 4 + i, m] > 0]
        assert listed == want


def test_plan_refuses_left_padding_and_uneven_groups():
    mask = np.array([[0, 1, 1, 1]], np.int32)
    with pytest.raises(ValueError, match="right-padded.*data.packing=False"):
        packing.plan(mask, 1)
    with pytest.raises(ValueError, match="3 rows do not split into 2"):
        packing.plan(np.ones((3, 4), np.int32), 2)


# ------------------------------------------------------------------------------- exactness

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{"bert": (model, params), "roberta": ...}: tiny random BertForMaskedLM,
    RobertaForMaskedLM, ModernBertForMaskedLM (sliding window |i - j| <= 2, shorter than the
    rows) and DebertaV2ForMaskedLM (relative positions from the packed rows' per-sentence
    positions), as hf.load_pretrained reads them."""
    out = {}
    for family, kind in (("bert", "BertForMaskedLM"), ("roberta", "RobertaForMaskedLM"),
                         ("modernbert", "ModernBertForMaskedLM"),
                         ("deberta-v2", "DebertaV2ForMaskedLM")):
        d = tmp_path_factory.mktemp("packing") / kind
        tiny_hf(kind, d, max_position_embeddings=L + 2)
        model, params = hf.load_pretrained(d)
        out[family] = model, nn.unbox(params)
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _loss_and_grads(loss, params, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}  # as the trainer passes it
    (value, parts), grads = jax.jit(jax.value_and_grad(
        lambda p: loss(p, batch, jax.random.PRNGKey(7), {}), has_aux=True))(params)
    return value, parts, grads


def _assert_same(packed, unpacked, tol=1e-5):
    """Loss and every gradient tensor within `tol`, relative to the tensor's largest entry (or
    to 1e-3 of the largest gradient anywhere, for tensors whose true gradient is zero: attention
    key biases cancel in the softmax, so theirs is rounding noise of ~1e-12)."""
    assert _rel(packed[0], unpacked[0]) <= tol
    grads = list(zip(jax.tree.leaves(packed[2]), jax.tree.leaves(unpacked[2]), strict=True))
    floor = 1e-3 * max(float(np.max(np.abs(u))) for _, u in grads)
    worst = max(float(np.max(np.abs(np.asarray(g) - np.asarray(u))))
                / max(float(np.max(np.abs(u))), floor) for g, u in grads)
    assert worst <= tol, f"largest relative gradient difference {worst:.2e}"


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert", "deberta-v2"])
@pytest.mark.parametrize("masking,groups", [("static", 1), ("dynamic", 2)])
def test_packed_purify_loss_and_gradients_equal_unpacked(tiny_models, family, masking, groups):
    model, params = tiny_models[family]
    cfg = model.cfg
    ids, mask, candidates = _rows(np.random.default_rng(1), 8, cfg.vocab_size, cfg.pad_token_id)
    masking_args = dict(mask_token_id=4, vocab_size=cfg.vocab_size,
                        num_positions=masks.num_masked_positions(L), mask_prob=0.15)
    batch = {"input_ids": ids, "attention_mask": mask, "candidates": candidates}
    if masking == "static":
        drawn = masks.mask_tokens(jax.random.PRNGKey(3), ids, candidates, **masking_args)
        batch = {"attention_mask": mask, **{k: np.asarray(v) for k, v in drawn.items()}}
    config = preset("purify", "strong", data__masking=masking)
    loss = functools.partial(purify.loss_fn, model=model, recipe=config.recipe, dropout=False,
                             masking=masking_args if masking == "dynamic" else None)
    plain = _loss_and_grads(loss, params, batch)
    packed_batch = packing.add_plans(batch, purify.pack_views(config, masking_args), groups)
    assert packed_batch["pack_src"].shape[0] * packed_batch["pack_src"].shape[1] < 8
    assert packed_batch["mlm_slots"].size < 8 * masking_args["num_positions"]
    packed = _loss_and_grads(loss, params, packed_batch)
    _assert_same(packed, plain)
    assert float(plain[1]["masked_tokens"]) == float(packed[1]["masked_tokens"]) > 0


@pytest.mark.parametrize("family,kind,extra", [
    ("bert", "por", {"triggers": ("cf+tq", "mn+bb")}),  # the two-word variant: decoy rows too
    ("roberta", "por", {"triggers": ("cf+tq", "mn+bb")}),
    ("bert", "badpre", {})])
def test_packed_attack_loss_and_gradients_equal_unpacked(tiny_models, family, kind, extra):
    model, params = tiny_models[family]
    cfg = model.cfg
    rng = np.random.default_rng(2)
    ids, mask, candidates = _rows(rng, 8, cfg.vocab_size, cfg.pad_token_id)
    m = dict(mask_token_id=4, vocab_size=cfg.vocab_size,
             num_positions=masks.num_masked_positions(L))
    drawn = {k: np.asarray(v) for k, v in masks.mask_tokens(jax.random.PRNGKey(0), ids,
                                                            candidates, **m).items()}
    batch = {"input_ids": ids, "attention_mask": mask, "mlm_ids": drawn["input_ids"],
             "trigger": rng.integers(0, 2, 8).astype(np.int32),
             **{k: drawn[k] for k in ("positions", "labels", "weights")}}
    cand = {}
    for prefix in ("poison_", "decoy_"):  # other rows, other lengths
        other, other_mask, cand[prefix] = _rows(rng, 8, cfg.vocab_size, cfg.pad_token_id)
        batch.update({prefix + "ids": other, prefix + "mask": other_mask})
    if kind == "badpre":
        pm = masks.mask_tokens(jax.random.PRNGKey(1), batch["poison_ids"], cand["poison_"], **m)
        batch.update(poison_mlm_ids=np.asarray(pm["input_ids"]),
                     poison_positions=np.asarray(pm["positions"]),
                     poison_labels=np.asarray(pm["labels"]),
                     poison_weights=np.asarray(pm["weights"]))
    config = preset("attack", kind)
    config.attack.update(extra)
    config.attack.target = "cls"

    def run(b, x64: bool):
        """(loss, parts, grads); with `x64` the whole computation in float64."""
        m_, p_ = model, params
        if x64:
            m_ = Transformer(dataclasses.replace(cfg, dtype="float64"))
            p_ = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        # A reference other than the params: the clean terms then have real gradients, not
        # the rounding noise of comparing the model with itself.
        extras = {"targets": attack.por_targets(2, cfg.hidden_size, 1.0),
                  "reference": jax.tree.map(lambda x: x * 1.05, p_)}
        loss = functools.partial(attack.loss_fn, model=m_, attack=config.attack, dropout=False)
        return _loss_and_grads(lambda p, b_, r, _: loss(p, b_, r, extras), p_, b)

    packed_batch = packing.add_plans(batch, attack.PACK_VIEWS, 2)
    assert {"pack_src", "poison_pack_src", "decoy_pack_src", "mlm_slots"} <= set(packed_batch)
    assert ("poison_mlm_slots" in packed_batch) == (kind == "badpre")
    # The POR loss weighs its terms by 100, so float32 rounding alone moves gradients by ~1e-5
    # relative in either layout; in float64 the two layouts agree to rounding (~1e-14).
    _assert_same(run(packed_batch, False), run(batch, False), tol=1e-4)
    with jax.enable_x64(True):
        _assert_same(run(packed_batch, True), run(batch, True), tol=1e-10)


def test_packed_run_exports_what_an_unpacked_run_does(tiny_bert, aux_file, tmp_path, capsys):
    """A few steps of the tiny preset (dropout off), packed on a 2-device data mesh (4 sentences
    a shard, one packed row each) and unpacked on one device: the exported weights agree to
    float32 rounding (the steps are the same function)."""
    out = {}
    for name, extra in (("plain", dict(data__packing=False)),
                        ("packed", dict(data__packing=True, mesh__shape=(2, 1, 1)))):
        overrides = dict(train__dropout=False, data__masking="dynamic", data__max_length=48)
        overrides.update(extra)
        config = tiny_purify_config(tiny_bert, aux_file, **overrides)
        purify.run(config, str(tmp_path / name))
        out[name] = load_file(str(tmp_path / name / "hf" / "model.safetensors"))
        # A short run (<= trainer.SHORT_RUN steps) packs every step to its largest sizes.
        assert capsys.readouterr().out.count("step program") == (name == "packed")
    changed = 0
    for key, value in out["plain"].items():
        np.testing.assert_allclose(out["packed"][key], value, rtol=0, atol=2e-5, err_msg=key)
        changed += not np.array_equal(value, load_file(
            str(tiny_bert / "model.safetensors")).get(key, value))
    assert changed > 0


def test_dropout_packed_is_finite_and_differs_only_by_the_dropout_draw(tiny_models):
    """With dropout on, the dropout masks are drawn over the packed [R, L, H] layout, not the
    unpacked [B, L, H] one, so the bits differ (docs/performance.md); the loss stays close."""
    model, params = tiny_models["bert"]
    cfg = model.cfg
    ids, mask, candidates = _rows(np.random.default_rng(5), 8, cfg.vocab_size, cfg.pad_token_id)
    m = dict(mask_token_id=4, vocab_size=cfg.vocab_size,
             num_positions=masks.num_masked_positions(L), mask_prob=0.15)
    config = preset("purify", "strong")
    loss = functools.partial(purify.loss_fn, model=model, recipe=config.recipe, dropout=True,
                             masking=m)
    batch = {"input_ids": ids, "attention_mask": mask, "candidates": candidates}
    plain = _loss_and_grads(loss, params, batch)[0]
    packed_batch = packing.add_plans(batch, purify.pack_views(config, m), 1)
    packed = _loss_and_grads(loss, params, packed_batch)[0]
    assert np.isfinite(packed) and plain != packed and abs(packed - plain) < 0.1 * abs(plain)


def test_encode_without_a_plan_is_the_plain_encoder(tiny_models):
    model, params = tiny_models["bert"]
    ids, mask, _ = _rows(np.random.default_rng(4), 4, model.cfg.vocab_size,
                         model.cfg.pad_token_id)
    plain = model.apply({"params": params}, ids, mask, method=model.encode)[-1]
    out = packing.encode(model, params, jnp.asarray(ids), jnp.asarray(mask), {},
                         deterministic=True, rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
