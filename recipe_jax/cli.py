"""Entry-point plumbing shared by the config-driven commands (purify, attack, evaluate, prune).

`--help` exits 0 and lists, besides the flags, every config key with its default and its one-line
comment, read from the config file, so `--config.KEY=VALUE` overrides are discoverable.
"""

from __future__ import annotations

import pathlib
import re
import sys
from collections.abc import Callable

from absl import app, flags

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
_KEY_LINE = re.compile(r"^\s*c\.(\w+\.\w+)\s*=\s*(.+?)(?:\s+#\s*(.*))?$")


def config_keys(config_file: str | pathlib.Path) -> list[str]:
    """`key = default  # comment` lines of a configs/*.py file, in file order."""
    lines = pathlib.Path(config_file).read_text().splitlines()
    seen, out = set(), []
    for line in lines:
        m = _KEY_LINE.match(line)
        if m and m.group(1) not in seen and line.startswith("    c."):
            seen.add(m.group(1))
            comment = f"  # {m.group(3)}" if m.group(3) else ""
            out.append(f"  --config.{m.group(1)}={m.group(2)}{comment}")
    return out


def run(main: Callable, *, doc: str, default_config: str, required: list[str]) -> None:
    """absl `app.run` with a `--help` that exits 0 and documents the config keys."""
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        flags.FLAGS(sys.argv[:1], known_only=True)
        print(doc.strip() + "\n")
        print(flags.FLAGS.main_module_help())
        config_file = pathlib.Path(__file__).resolve().parents[1] / default_config
        if config_file.is_file():
            print(f"\nConfig keys ({default_config}; presets change some defaults):")
            print("\n".join(config_keys(config_file)))
        sys.exit(0)
    flags.mark_flags_as_required(required)
    app.run(main, flags_parser=_parse_quietly)


def _parse_quietly(argv):
    """Parses flags, then keeps absl/Orbax INFO chatter out of the progress output."""
    from absl import logging as absl_logging

    rest = app.parse_flags_with_usage(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)
    return rest
