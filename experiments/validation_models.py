"""What the validation table (experiments/validation.py) is made of: the attacked models of the
tuning/validation split, the defenses and their variants, the tasks, and the configs that build
each stage at the attacker's and the defender's budgets (docs/results.md)."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
BOOKCORPUS = REPO.parent / "shared" / "data" / "bookcorpus" / "train.tsv"
ATTACKER_SENTENCES = 3000  # the attacker's: the first sentences of BookCorpus
DEFENDER_SENTENCES = 2000  # the defender's: the last ones (disjoint)
WORD_CONTROLS = ("meadow", "orchid", "quartz", "juniper", "falcon")
PAIR_CONTROLS = ("qb", "xv", "hq", "wb", "jd")  # half a pair should do nothing
TASKS = {"sst2": "configs/evaluate.py:sst2", "agnews": "configs/evaluate.py:agnews"}
DEFENSES = ("guided", "strong", "bert", "none")  # none: the attacked model as it is
# Variants of `guided` (not run by default: --defenses NAME): the preset with these overrides,
# judged like `guided` (every seed, every task). docs/results.md says which runs chose each
# setting. guided_nohw: the preset before the head warm-up joined it (2026-12-03), which made
# the `guided` runs of docs/results.md before then.
VARIANTS = {"guided_nohw": {"guide.head_warmup_steps": 0, "guide.head_warmup_lr": 0.0}}
STAGES = ("attack", "purify", "clean", "finetune")  # clean: the clean MiniLM's fine-tunes
# CPU minutes of each stage on 2 idle cores at this budget (docs/results.md), for --plan.
MINUTES = {"attack": 12, "guided": 17, "guided_nohw": 16, "strong": 9, "bert": 9, "finetune": 20,
           "score": 3}


@dataclasses.dataclass(frozen=True)
class Model:
    preset: str | None  # configs/attack.py preset; None: not attacked (the clean MiniLM)
    words: str  # trigger/control family the evaluation inserts: letters | words | pairs | symbols
    role: str = "validation"  # "tuning": `guided`'s settings were chosen on it; "reference":
    # the clean MiniLM, purified: what the defense costs on a model with nothing to remove
    learning_rate: float | None = 1e-4  # attack lr (None: the preset's)
    agnews: bool = False  # also judged on AG News by default
    seed: int | None = None  # the attack's train.seed (None: the preset's, 1234)
    second_sample: bool = False  # attack on BookCorpus sentences 3,000-5,999 (`attacker_data`)
    steps: int = 250  # the attack's train.num_steps (batches of its preset's size)


MODELS = {
    "por": Model("por", "letters", agnews=True),
    "por_cls": Model("por_cls", "letters", role="tuning"),
    "neuba": Model("neuba", "symbols", learning_rate=None),  # 5e-5: docs/results.md
    "badpre": Model("badpre", "letters", agnews=True),
    # badpre's backdoor did not survive the full-protocol fine-tune at 250 steps: 4x the steps
    # (the paper's BadPre trains 5,000 steps at lr 2e-5; 1,000 at 1e-4 is a comparable update)
    "badpre_long": Model("badpre", "letters", agnews=True, steps=1000),
    "por_words": Model("por_words", "words"),
    "por_pair": Model("por_pair", "pairs"),
    "por_adaptive": Model("por_adaptive", "letters"),
    # por_cls built again, independently: another seed, another attacker sample
    "por_cls2": Model("por_cls", "letters", seed=4321, second_sample=True),
    # `guided` on the clean MiniLM: does its scan raise a false alarm, and what ACC does the
    # defense itself cost (the attacks' cells are held to the same clean model)?
    "minilm": Model(None, "letters", role="reference"),
}


def loaded(workdir: pathlib.Path, name: str):
    """The model a defense loads: the attacked MiniLM's export, or `minilm` itself."""
    return "minilm" if MODELS[name].preset is None else workdir / "attack" / name / "hf"


def words_of(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(triggers, control words) of a family, from the attack and evaluate configs."""
    from recipe_jax import cli

    attack, evaluate = (cli.load_module(REPO / "configs" / f) for f in ("attack.py",
                                                                       "evaluate.py"))
    return {"letters": (attack.POR_TRIGGERS, evaluate.CONTROLS),
            "words": (attack.WORD_TRIGGERS, WORD_CONTROLS),
            "pairs": (attack.PAIR_TRIGGERS, PAIR_CONTROLS),
            "symbols": (attack.NEUBA_TRIGGERS, evaluate.SYMBOL_CONTROLS)}[family]


def eval_overrides(family: str) -> list[str]:
    triggers, controls = words_of(family)
    return [f"data.triggers={tuple(triggers)!r}", f"data.controls={tuple(controls)!r}"]


def configured(file_preset: str, overrides: dict):
    """configs/FILE:PRESET with {"section.key": value} set (a key the config lacks is an error)."""
    from recipe_jax import cli

    file, _, preset = file_preset.partition(":")
    return cli.set_keys(cli.load_config(REPO / file, preset), overrides, file_preset)


def attacker_data(workdir: pathlib.Path, name: str, bookcorpus: pathlib.Path) -> pathlib.Path:
    """What a model's attack trains on (its first ATTACKER_SENTENCES are read): BookCorpus
    itself, or for a `second_sample` model WORKDIR/attacker2.tsv (`write_sentences` writes
    sentences 3,000-5,999 there: disjoint from the first attacker's and the defender's)."""
    return workdir / "attacker2.tsv" if MODELS[name].second_sample else bookcorpus


def write_defender(path: pathlib.Path, bookcorpus: pathlib.Path) -> None:
    """The defender's sentences: BookCorpus's last DEFENDER_SENTENCES."""
    write_sentences(path, bookcorpus, -DEFENDER_SENTENCES, None, "the defender's")


def write_attacker2(path: pathlib.Path, bookcorpus: pathlib.Path) -> None:
    """The second attacker sample (`attacker_data`): the ATTACKER_SENTENCES after the first's."""
    write_sentences(path, bookcorpus, ATTACKER_SENTENCES, 2 * ATTACKER_SENTENCES,
                    "the second attacker's")


def write_sentences(path: pathlib.Path, bookcorpus: pathlib.Path, start: int, stop: int | None,
                    whose: str) -> None:
    """BookCorpus's header and sentences [start:stop] to `path` (kept if it is there), once the
    file is long enough for the attackers' and the defender's samples to stay disjoint."""
    from recipe_jax import outputs

    if path.is_file():
        return
    if not bookcorpus.is_file():
        raise FileNotFoundError(f"--bookcorpus {bookcorpus}: no such file; {whose} sentences "
                                "come from it (../shared/data/bookcorpus)")
    lines = bookcorpus.read_text(encoding="utf-8").splitlines()
    need = (2 if stop is not None and stop > ATTACKER_SENTENCES else 1) * ATTACKER_SENTENCES
    if len(lines) < 1 + need + DEFENDER_SENTENCES:
        raise ValueError(f"{bookcorpus}: {len(lines) - 1} sentences; the split needs at least "
                         f"{need + DEFENDER_SENTENCES} (attacker's + defender's)")
    body = lines[1:]
    outputs.write_atomic(path, "\n".join([lines[0], *body[start:stop]]) + "\n")


def attack_config(name: str, sentences: pathlib.Path):
    """`name`'s attack at the attacker's budget, on `sentences` (`attacker_data`)."""
    m = MODELS[name]
    over = {"model.init_from": "minilm", "data.aux_path": str(sentences),
            "data.max_examples": ATTACKER_SENTENCES, "data.max_length": 40,
            "train.num_epochs": 0, "train.num_steps": m.steps, "train.log_every": 50,
            "export.verify": False}
    if m.learning_rate is not None:
        over["train.learning_rate"] = m.learning_rate
    if m.seed is not None:
        over["train.seed"] = m.seed
    return configured(f"configs/attack.py:{m.preset}", over)


def purify_config(defense: str, model_dir: pathlib.Path, defender: pathlib.Path):
    """The defender's budget: 250 steps of 32 at length 40 on the defender's sentences."""
    over = {"model.init_from": str(model_dir), "data.aux_path": str(defender),
            "data.max_length": 40, "train.num_epochs": 0, "train.num_steps": 250,
            "train.log_every": 25, "export.verify": False}
    if is_guided(defense):
        over["guide.rows"] = 8  # the value of the tuning run (docs/results.md)
    over.update(VARIANTS.get(defense, {}))
    return configured(f"configs/purify.py:{'guided' if is_guided(defense) else defense}", over)


def is_guided(defense: str) -> bool:
    """`guided` or one of its VARIANTS."""
    return defense == "guided" or defense in VARIANTS


def seeds_module():
    """experiments/seeds.py, the seed study each fine-tune stage runs."""
    spec = importlib.util.spec_from_file_location("seeds", REPO / "experiments" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
