"""Entry-point plumbing shared by the config-driven commands (purify, attack, evaluate, prune).

`--help` exits 0 and lists, besides the flags, every config key with its default and its one-line
comment (from the config file and config_blocks.py), so `--config.KEY=VALUE` overrides are
discoverable.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
_KEY_LINE = re.compile(r"^\s*c\.(\w+\.\w+)\s*=\s*.+?\s+#\s*(.*)$")
REPO = pathlib.Path(__file__).resolve().parents[1]


def load_module(config_file: str | pathlib.Path):
    """A configs/*.py file as a module (configs are files, not a package)."""
    path = pathlib.Path(config_file)
    spec = importlib.util.spec_from_file_location(f"recipe_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(config_file: str | pathlib.Path, preset: str | None = None):
    """get_config(preset) of a configs/*.py file."""
    module = load_module(config_file)
    return module.get_config() if preset is None else module.get_config(preset)


def config_keys(config_file: str | pathlib.Path) -> list[str]:
    """`--config.KEY=DEFAULT  # comment` for every key of the file's default preset; comments
    come from the config file and from config_blocks.py, where shared sections are defined."""
    comments = {}
    for source in (pathlib.Path(__file__).with_name("config_blocks.py"), pathlib.Path(config_file)):
        for line in source.read_text().splitlines():
            m = _KEY_LINE.match(line)
            if m:
                comments.setdefault(m.group(1), m.group(2))
    out = []
    for section, values in load_config(config_file).items():
        for key, value in values.items():
            comment = comments.get(f"{section}.{key}")
            out.append(f"  --config.{section}.{key}={value!r}" + (f"  # {comment}" if comment
                                                                   else ""))
    return out


def main_body(name: str, stage: Callable[[], object], argv: list[str]) -> None:
    """Runs a stage; user errors become one line on stderr and exit status 1."""
    import logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        stage()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(1)


def run(stage: Callable, *, name: str, doc: str, default_config: str) -> None:
    """`python -m recipe_jax.<name> --config FILE:PRESET --workdir DIR [--config.KEY=VALUE]`.

    Defines the flags (only when run as a command, so stage modules import side-effect free),
    then calls `stage(config, workdir)`. `--help` exits 0 and documents the config keys.
    """
    config_flags.DEFINE_config_file("config", None, f"{default_config}:PRESET",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run dir (checkpoints/, metrics.jsonl, outputs)")
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        flags.FLAGS(sys.argv[:1], known_only=True)
        print(doc.strip() + "\n")
        print("flags:\n  --config FILE:PRESET  the config file and preset (see below)\n"
              "  --workdir DIR         run dir: checkpoints/, metrics.jsonl, outputs; rerun the "
              "same command to resume")
        config_file = REPO / default_config
        if config_file.is_file():
            print(f"\nConfig keys ({default_config}; presets change some defaults):")
            print("\n".join(config_keys(config_file)))
        sys.exit(0)
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        main_body(name, lambda: stage(flags.FLAGS.config, flags.FLAGS.workdir), argv)

    app.run(main, flags_parser=_parse_quietly)


def _parse_quietly(argv):
    """Parses flags, then keeps absl/Orbax INFO chatter out of the progress output."""
    from absl import logging as absl_logging

    rest = app.parse_flags_with_usage(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)
    return rest
