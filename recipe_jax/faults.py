"""Fault injection for the reliability tests: the process kills itself at a named point.

    RECIPE_JAX_FAULT=checkpoint_write:2 python -m recipe_jax.purify ...   # SIGKILL mid-write

`RECIPE_JAX_FAULT` holds `POINT:N[,POINT:N]`: the N-th time the process reaches POINT it sends
itself SIGKILL (what a preemption without grace, an OOM kill or a power cut look like), or SIGTERM
for `sigterm:N`. Unset (always, outside tests) every call here is a dict lookup and nothing else.

Points: `save` (entering a checkpoint save, before anything is written), `checkpoint_write`
(while Orbax writes the step's temp dir), `sigterm` (entering a checkpoint save: SIGTERM, so the
run checkpoints and exits 143 at its next step boundary), `export` (the new model.safetensors is
written in the export's temp dir, config.json is not), `export_swap` (the previous export has
been moved aside, the new one is not in place yet).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import signal
import threading
import time

ENV = "RECIPE_JAX_FAULT"
_counts: collections.Counter = collections.Counter()


def _armed(point: str) -> bool:
    """Counts this visit to `point`; True when it is the one RECIPE_JAX_FAULT names."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return False
    _counts[point] += 1
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name == point and _counts[point] == int(n or 1):
            return True
    return False


def point(name: str) -> None:
    """Kills the process here if RECIPE_JAX_FAULT names this visit."""
    if _armed(name):
        os.kill(os.getpid(), signal.SIGTERM if name == "sigterm" else signal.SIGKILL)


@contextlib.contextmanager
def during(name: str, directory: str | os.PathLike, marker: str = ".orbax-checkpoint-tmp"):
    """If armed, SIGKILLs the process as soon as a temp entry under `directory` holds a file
    (the write is under way); if the block ends first, kills it there."""
    if not _armed(name):
        yield
        return
    root = pathlib.Path(directory)

    def watch():
        while True:
            for tmp in root.glob(f"*{marker}*"):
                if any(p.is_file() for p in tmp.rglob("*")):
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()
    yield
    os.kill(os.getpid(), signal.SIGKILL)
