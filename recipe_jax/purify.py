r"""RECIPE purification: continual masked-LM pre-training with a Frobenius-norm regularizer.

    python -m recipe_jax.purify --config configs/purify.py:bert --workdir runs/purify \
        --config.model.init_from=path/to/suspicious_hf_dir \
        --config.data.aux_path=path/to/sentences.txt

Loss (docs/method.md): L = MLM(aux batch) + lambda * sum_l ||W_l||_F over the parameters named
by `recipe.regularize`; only `recipe.trainable` parameters are updated. `recipe.drop_pooler =
True` (ours) leaves the pooler and the next-sentence head out of the purified model: neither the
MLM loss nor the regularizer reaches them, so a backdoor planted there (POR and NeuBA train the
pooler) would pass through untouched; a downstream fine-tune then initializes a fresh pooler, as
`transformers` does for any `*ForMaskedLM` checkpoint. Writes `DIR/checkpoints/` (Orbax,
resumable: rerun the same command), `DIR/metrics.jsonl` and the purified model as a Hugging Face
dir, `DIR/hf/`. `--help` lists every flag and config key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recipe_jax import (
    cli,
    config_blocks,
    data,
    export,
    guide,
    hf,
    losses,
    masks,
    outputs,
    packing,
    scan,
    scan_probes,
    scan_report,
    sharding,
    streaming,
    trainer,
)
from recipe_jax.config_blocks import bad_value
from recipe_jax.model import Transformer

log = logging.getLogger(__name__)
HEAD = ("mlm_head",)  # what recipe.head_warmup_steps trains: the MLM head's own tensors


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, the bad value and the fix."""
    config_blocks.validate_training(config)
    if config.data.masking not in ("static", "dynamic"):
        bad_value("data.masking", config.data.masking, "use 'static' or 'dynamic'")
    r = config.recipe
    if not r.weight >= 0:
        bad_value("recipe.weight", r.weight, "lambda must be >= 0")
    if not r.mlm and r.weight == 0:
        bad_value("recipe.mlm", r.mlm, "with recipe.weight=0 there would be no loss at all")
    config_blocks.check_patterns(r.regularize, "recipe.regularize")
    config_blocks.check_patterns(r.trainable, "recipe.trainable")
    if not r.trainable:
        bad_value("recipe.trainable", r.trainable, "name at least one parameter regex")
    if r.head_warmup_steps < 0 or not r.head_warmup_lr >= 0:
        bad_value("recipe.head_warmup_steps/lr", (r.head_warmup_steps, r.head_warmup_lr),
                  "use >= 0 (0 steps: no warm-up; lr 0: train.learning_rate)")
    if r.head_warmup_steps and not r.mlm:
        bad_value("recipe.head_warmup_steps", r.head_warmup_steps,
                  "a head warm-up serves the MLM term; with recipe.mlm=False set it to 0")
    if "guide" in config:
        guide.validate(config)


# ------------------------------------------------------------------------------------- data

def prepare_data(config, texts: list[str], model_dir, vocab_size: int
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """Tokenized aux data on the host; with static masking, masks drawn once from the seed."""
    tokenizer = data.load_tokenizer(model_dir)
    enc = data.tokenize(tokenizer, texts, config.data.max_length)
    masking = dict(mask_token_id=int(tokenizer.mask_token_id), vocab_size=vocab_size,
                   num_positions=masks.num_masked_positions(config.data.max_length,
                                                           config.data.mask_prob),
                   mask_prob=config.data.mask_prob)
    if config.data.masking == "dynamic":
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "candidates": enc["candidates"]}, masking
    mask_fn = jax.jit(functools.partial(masks.mask_tokens, **masking))
    masked = mask_fn(jax.random.PRNGKey(config.train.seed), enc["input_ids"], enc["candidates"])
    arrays = {"attention_mask": enc["attention_mask"],
              **{k: np.asarray(v) for k, v in masked.items()}}
    return arrays, masking


# ------------------------------------------------------------------------------------- loss

def loss_fn(params, batch, rng, extras, *, model: Transformer, recipe, dropout: bool,
            masking: dict | None, guide_cfg=None):
    """The RECIPE loss, MLM + lambda * sum ||W||_F, and its parts (pure). With `masking`
    (dynamic masks) the masks are drawn here from the step's rng; else `batch` holds masked ids
    and [B, M] slots. RECIPE needs nothing but the model and the text; with `guide_cfg` and
    scan candidates in `extras` ("triggers" [K, 2], "word_start" [V], and "reference", the
    loaded params, unless guide.target is "current") the scan-guided term is added
    (recipe_jax/guide.py)."""
    if guide_cfg is not None and "triggers" in extras:
        g = guide.guide_term(params, extras.get("reference"), batch, jax.random.fold_in(rng, 3),
                             extras["triggers"], extras["word_start"], model=model,
                             rows=min(guide_cfg.rows, batch["input_ids"].shape[0]),
                             dropout=dropout)
    else:
        g = None
    if masking is not None:
        batch = {**batch, **masks.mask_tokens(jax.random.fold_in(rng, 1), batch["input_ids"],
                                             batch["candidates"], **masking)}
    parts = {"tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32)}
    loss = jnp.zeros((), jnp.float32)
    if recipe.mlm:
        hidden_blh = packing.encode(model, params, batch["input_ids"], batch["attention_mask"],
                                    batch, deterministic=not dropout,
                                    rng=jax.random.fold_in(rng, 2))
        states, labels, weights = packing.masked_states(
            hidden_blh, batch["positions"], batch["labels"], batch["weights"], batch)
        logits = model.apply({"params": params}, states, method=Transformer.mlm_logits)
        m = losses.mlm_loss(logits, labels, weights)
        mlm = m["loss_sum"] / jnp.maximum(m["count"], 1.0)
        loss += mlm
        parts.update(mlm_loss=mlm, mlm_acc=m["correct"] / jnp.maximum(m["count"], 1.0),
                     masked_tokens=m["count"])
    reg = losses.frobenius_penalty(params, recipe.regularize, model.cfg.model_type)
    parts["reg_loss"] = reg
    loss += recipe.weight * reg
    if g is not None:
        parts["guide_loss"] = g
        loss += guide_cfg.weight * g
    return loss, parts


def pack_views(config, masking: dict) -> dict:
    """data.packing: the aux rows are packed by their attention mask, and the vocabulary
    projection runs at the labeled masked slots only (packing.py)."""
    count = (packing.candidates_count(masking["mask_prob"], masking["num_positions"])
             if config.data.masking == "dynamic" else packing.weights_count("weights"))
    return {"": ("attention_mask", count)}


def make_loss(config, cfg, masking: dict):
    """`loss_fn` with the config bound: what `trainer.fit` (and the AOT report) runs."""
    return functools.partial(
        loss_fn, model=trainer.compute_model(config, cfg), recipe=config.recipe,
        dropout=config.train.dropout,
        masking=masking if config.data.masking == "dynamic" else None,
        guide_cfg=config.guide if "guide" in config and config.guide.enabled else None)


# -------------------------------------------------------------------------------------- run

def drop_pooler(model: Transformer, params: dict) -> tuple[Transformer, dict]:
    """The model and params without the pooler and the NSP head on it (a no-op without them)."""
    if not (model.cfg.pooler or model.cfg.nsp_head):
        return model, params
    log.info("recipe.drop_pooler: the export leaves out the pooler and NSP head; a downstream "
             "fine-tune initializes them fresh")
    cfg = dataclasses.replace(model.cfg, pooler=False, nsp_head=False)
    return Transformer(cfg), {k: v for k, v in params.items() if k not in ("pooler", "nsp")}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole purify stage; returns a summary dict (also written to DIR/summary.json)."""
    validate(config)
    mesh, workdir = trainer.start(config, workdir, "run:purify")
    model_dir, texts, model, host_params = trainer.load(config)
    guided = "guide" in config and config.guide.enabled
    found = first_scan(config, model, host_params, model_dir, workdir, mesh) if guided else None
    prior = earlier_scan(config, found)  # read before training: a bad path fails here
    config = guide.effective_config(config, found is not None and len(found["triggers"]) > 0)
    if config.recipe.drop_pooler:
        model, host_params = drop_pooler(model, host_params)
    cfg = model.cfg
    if config.recipe.weight > 0 and not losses.select_names(
            host_params, config.recipe.regularize, cfg.model_type):
        raise ValueError(f"recipe.regularize={tuple(config.recipe.regularize)} matches no "
                         f"parameter; {hf.selection_hint(cfg.model_type)}")
    if config.data.streaming:  # `texts` is a lazy streaming.TextIndex
        arrays, masking = streaming.prepare(config, texts, model_dir, cfg.vocab_size)
    else:
        arrays, masking = prepare_data(config, texts, model_dir, cfg.vocab_size)
    train = functools.partial(trainer.fit, mesh=mesh, model_dir=model_dir, model=model,
                              arrays=arrays, data_sha256=data.texts_sha256(texts),
                              trainable=config.recipe.trainable,
                              pack=pack_views(config, masking) if config.data.packing else None)
    extras = guide_extras(found, host_params, cfg, mesh,
                          reference=guided and config.guide.target == "loaded")
    if config.recipe.head_warmup_steps:
        host_params = head_warmup(config, workdir, train, host_params, masking, cfg)
    params, step = train(config, workdir, name="purify", host_params=host_params,
                         loss_fn=make_loss(config, cfg, masking), extras=extras)
    reg = losses.frobenius_penalty(params, config.recipe.regularize, cfg.model_type)
    summary = {"step": step, "reg_loss": float(reg)}
    if guided:
        params, summary["guide"], summary["scan"] = guided_rounds(
            config, workdir, mesh, train, masking, model, (params, step), model_dir, found,
            extras, prior)
    elif "scan" in config and config.scan.enabled:
        summary["scan"] = scan_result(model, params, model_dir, workdir, mesh, config.scan,
                                      prior)
    return export.write_hf(workdir, "purify", model, params, verify=config.export.verify,
                             summary=summary)


def head_warmup(config, workdir, train, host_params, masking, cfg) -> dict:
    """recipe.head_warmup_steps: the MLM head alone learns the MLM loss on the aux data first
    (in DIR/head_warmup/, resumable), so that the purify run's MLM gradient reaches the encoder
    through a head that reads it, not through a random one (a checkpoint without an MLM head,
    such as a sentence encoder, gets a fresh head). Returns the host params with the warmed
    head; the encoder is unchanged."""
    c = config.copy_and_resolve_references()
    c.train.num_epochs, c.train.num_steps = 0, config.recipe.head_warmup_steps
    c.train.learning_rate = config.recipe.head_warmup_lr or config.train.learning_rate
    c.train.depth_lr_scales, c.train.lr_scales = (), ()
    c.recipe.weight = 0.0  # the MLM term alone (validate: a warm-up needs recipe.mlm)
    if "guide" in c:
        c.guide.enabled = False
    if jax.process_index() == 0:
        (workdir / "head_warmup").mkdir(exist_ok=True)
    params, _ = train(c, workdir / "head_warmup", name="purify head warm-up",
                      host_params=host_params, trainable=HEAD, loss_fn=make_loss(c, cfg, masking))
    return sharding.fetch_to_host(params)


# ------------------------------------------------------------------------------ guided rounds

def first_scan(config, model: Transformer, host_params, model_dir, workdir, mesh) -> dict:
    """The scan of the loaded model (pooler included) that `guided` unlearns the findings of:
    `guide.scan_report` if given, else DIR/scan_loaded/report.json of an earlier attempt of this
    run, else a new scan written there. Returns {"report", "triggers" [K, 2], "names"}."""
    tokenizer = data.load_tokenizer(model_dir)
    saved = (pathlib.Path(config.guide.scan_report) if config.guide.scan_report
             else workdir / "scan_loaded" / "report.json")
    if saved.exists() or config.guide.scan_report:  # a given report must exist: read_report says
        report = scan_report.read_report(saved)
        trainer.say(f"purify: guide: the scan of the loaded model from {saved}")
    else:
        report = scan.scan_model(model, host_params, tokenizer, mesh=mesh,
                                 settings=scan.Settings.of(config.scan))
        if jax.process_index() == 0:
            report["model"] = f"{model_dir} (as loaded)"
            scan_report.write_report(report, outputs.claim_dir(saved.parent, "scan"))
    triggers = guide.candidates(report, tokenizer, config.guide.max_candidates)
    names = list(guide.describe(triggers, tokenizer))
    trainer.say(f"purify: guide: scan of the loaded model: {scan_report.summary_line(report)}; "
                + (f"unlearning {len(names)} candidate(s)" if names else "nothing to unlearn: "
                   "this run is the `strong` preset"))
    return {"report": report, "triggers": triggers, "names": names, "tokenizer": tokenizer}


def earlier_scan(config, found: dict | None) -> dict | None:
    """The scan of the loaded model whose findings the scan of the result rates again:
    `scan.prior_report` if given, else `guided`'s first scan, else none."""
    path = config.scan.get("prior_report", "") if "scan" in config else ""
    if path:
        return scan_report.read_report(path)
    return None if found is None else found["report"]


def guide_extras(found: dict | None, host_params, cfg, mesh, reference: bool) -> dict:
    """What the guided term reads (none without candidates: the loss is then RECIPE's); with
    `reference`, a frozen copy of the loaded params (guide.target "loaded")."""
    if found is None or not len(found["triggers"]):
        return {}
    extras = {"triggers": found["triggers"],
              "word_start": scan_probes.word_start_table(found["tokenizer"], cfg.vocab_size)}
    if reference:
        extras["reference"] = trainer.shard_params(host_params, cfg, mesh)
    return extras


def guided_rounds(config, workdir, mesh, train, masking, model, trained, model_dir, found,
                  extras, prior=None):
    """Scans the result of round 1; while a candidate is flagged, unlearns the union of what
    was and is flagged for `guide.round_steps` more steps, up to `guide.rounds` rounds.
    Returns (params, the summary's "guide" entry, its "scan" entry)."""
    g, tokenizer = config.guide, found["tokenizer"]
    info = {"loaded_scan": scan_report.summary_line(found["report"]),
            "candidates": found["names"], "rounds": []}
    triggers, (params, steps) = found["triggers"], trained
    for r in range(1, g.rounds + 1):
        if r > 1:
            c = config.copy_and_resolve_references()
            c.train.num_epochs, c.train.seed = 0, config.train.seed + r
            c.train.num_steps = steps = g.round_steps or max(1, info["rounds"][0]["steps"] // 2)
            extras = {**extras, "triggers": triggers}
            if jax.process_index() == 0:
                (workdir / f"round{r}").mkdir(exist_ok=True)
            params, _ = train(c, workdir / f"round{r}", name=f"purify round {r}",
                              host_params=sharding.fetch_to_host(params),
                              loss_fn=make_loss(c, model.cfg, masking), extras=extras)
        result = scan_result(model, params, model_dir, workdir, mesh, config.scan, prior)
        info["rounds"].append({"round": r, "steps": steps, "unlearned": len(triggers),
                               "verdict": result["verdict"], "flagged": result.get("flagged")})
        if result["verdict"] != "backdoor" or not len(found["triggers"]) or r == g.rounds:
            break
        # what the result's scan still flags first: with guide.max_candidates already filled by
        # the first scan's list, appended it would be cut off and the round would not aim at it
        triggers = guide.union(guide.candidates(result, tokenizer, g.max_candidates), triggers,
                               g.max_candidates)
    if result["verdict"] == "backdoor":
        info["residual"] = (f"still flagged after {len(info['rounds'])} round(s): "
                            f"{result['summary']}; more rounds: --config.guide.rounds")
        log.warning("purify: guide: %s", info["residual"])
    return params, info, result


def scan_result(model: Transformer, params, model_dir, workdir, mesh, scan_cfg,
                prior: dict | None = None) -> dict:
    """The trigger scan of the purified `params` (recipe_jax.scan): its report in DIR/scan/, its
    verdict and top candidates for the summary. `prior` (`earlier_scan`): a scan of the loaded
    model, whose findings are rated again on the result."""
    settings = scan.Settings.of(scan_cfg)
    try:
        report = scan.scan_model(model, sharding.fetch_to_host(params),
                                 data.load_tokenizer(model_dir), mesh=mesh, settings=settings,
                                 prior=prior)
    except ValueError as e:  # the purified model is saved either way: say why, do not fail
        log.warning("scan.enabled: the scan of the result was skipped: %s", e)
        return {"verdict": None, "skipped": str(e)}
    if jax.process_index() == 0:
        out = outputs.claim_dir(workdir / "scan", "scan")
        report["model"] = f"{workdir} (purified, before export)"
        scan_report.write_report(report, out)
    line = scan_report.summary_line(report)
    print(f"purify: scan of the result: {line} (report: {workdir / 'scan' / 'report.md'})",
          flush=True)
    return {"verdict": report["verdict"], "flagged": report["flagged"], "summary": line,
            "top": [{k: c[k] for k in ("token", "z")} for c in report["candidates"][:5]],
            "seconds": report["cost"]["seconds"]}


if __name__ == "__main__":
    cli.run(run, name="purify", doc=__doc__, default_config="configs/purify.py")
