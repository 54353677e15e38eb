"""Entry-point plumbing shared by the commands.

`--help` exits 0 and lists, besides the flags, every config key with its default and its one-line
comment (from the config file and config_blocks.py), so `--config.KEY=VALUE` overrides are
discoverable. A user error (bad path, bad config value or key, bad input file) is one line on
stderr, `NAME: error: ...`, and a non-zero exit; the traceback is shown only with `--verbose` or
RECIPE_JAX_TRACEBACK=1 in the environment.
"""

from __future__ import annotations

import ast
import importlib.util
import os
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


def set_keys(config, overrides: dict, where: str):
    """`config` with {"section.key": value} set; a key the config lacks is a KeyError naming
    `where` (the config file or flag it came from)."""
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in config or name not in config[section]:
            raise KeyError(f"{key}: not a key of {where}; --help lists them")
        config[section][name] = value
    return config


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


# What a user can cause: bad paths and files, bad values, a diverged run.
USER_ERRORS = (ValueError, OSError, FloatingPointError, KeyError, AttributeError, TypeError)


def verbose() -> bool:
    return "--verbose" in sys.argv or os.environ.get("RECIPE_JAX_TRACEBACK") == "1"


def report(name: str, error: BaseException, status: int = 1) -> int:
    """Prints a user error as one line (re-raises it with `--verbose`); returns `status`."""
    if verbose():
        raise error
    message = " ".join(str(error.args[0] if isinstance(error, (KeyError, AttributeError))
                           and error.args else error).split())
    print(f"{name}: error: {message or type(error).__name__} (--verbose shows the traceback)",
          file=sys.stderr)
    return status


def fail(name: str, error: BaseException, status: int = 1):
    """Ends the command on a user error: one line (the traceback with `--verbose`)."""
    sys.exit(report(name, error, status))


def main_body(name: str, stage: Callable[[], object], argv: list[str]) -> None:
    """Runs a stage; user errors become one line on stderr and exit status 1."""
    import logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        stage()
    except USER_ERRORS as e:
        fail(name, e)


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
    flags.DEFINE_bool("verbose", False, "show the traceback of an error")
    _check_config_file(name, sys.argv[1:])
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        main_body(name, lambda: stage(flags.FLAGS.config, flags.FLAGS.workdir), argv)

    app.run(main, flags_parser=lambda argv: _parse_quietly(name, argv))


def _check_config_file(name: str, args: list[str]) -> None:
    """`--config FILE[:PRESET]` names a file that exists (else one line, before JAX starts)."""
    for i, arg in enumerate(args):
        value = arg.removeprefix("--config=") if arg.startswith("--config=") else (
            args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
        if value is not None and not pathlib.Path(value.partition(":")[0]).is_file():
            fail(name, FileNotFoundError(f"--config {value}: no such config file; pass e.g. "
                                         f"configs/{name}.py:PRESET"), status=2)


def _parse_quietly(name: str, argv):
    """Parses flags (a bad config file, key or value is one line), then keeps absl/Orbax INFO
    chatter out of the progress output."""
    from absl import logging as absl_logging

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(name, ValueError(f"{e}; see --help"), status=2)
    except USER_ERRORS as e:  # ml_collections: a key typo, a value of the wrong type
        text = str(e.args[0] if e.args else e)
        if text.startswith("'"):  # KeyError's repr inside an AttributeError: unwrap it
            try:
                text = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pass
        fail(name, ValueError(f"bad --config override: {text}"), status=2)
    absl_logging.set_verbosity(absl_logging.WARNING)
    return rest
