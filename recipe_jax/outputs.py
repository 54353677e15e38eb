"""What the tool may write where: it replaces only what it can prove it wrote itself, and copies
out of a model dir only what is really in it.

Every directory recipe_jax creates holds a marker, `.recipe_jax.json`: the kind of output (`hf`
for an exported model, `run:purify`, `run:convert`, `diagnose`, `demo`, ...) and, for an export,
the files it wrote. Before writing, each command claims its target:

    outputs.claim_dir(workdir, "run:purify")              # a stage's --workdir (resumable)
    outputs.check_replace(out, "hf", inputs=[run_dir])     # a dir that is replaced whole

A target is accepted when it is absent, an empty directory, or a directory whose marker says the
tool wrote it as the same kind (and, for a replaced dir, holds no file the marker does not list).
Anything else, a regular file, a user's directory, a run of another kind, is refused with an
OutputError naming what is there and how to proceed (another path, or `--overwrite` where the
command has it). A target inside or above one of the command's inputs is always refused.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence

from recipe_jax import faults

log = logging.getLogger(__name__)

MARKER = ".recipe_jax.json"


class OutputError(ValueError):
    """An output path the tool refuses to write: it would destroy or mix what it did not write."""


def read_marker(path: pathlib.Path) -> dict | None:
    """The marker of a dir the tool wrote, or None. Runs of older versions (no marker, but a
    `source/model_config.json` the tool writes) count as kind `run`."""
    try:
        marker = json.loads((path / MARKER).read_text())
        return marker if isinstance(marker, dict) and marker.get("written_by") == "recipe_jax" \
            else None
    except (OSError, ValueError):
        return {"written_by": "recipe_jax", "kind": "run"} if (
            path / "source" / "model_config.json").is_file() else None


def write_marker(path: pathlib.Path, kind: str, files: Sequence[str] = ()) -> None:
    tmp = path / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"written_by": "recipe_jax", "kind": kind,
                               "files": sorted(files)}, indent=1) + "\n")
    os.replace(tmp, path / MARKER)


def _check_not_overlapping(target: pathlib.Path, inputs: Iterable) -> None:
    resolved = target.resolve()
    for source in inputs:
        if source is None:
            continue
        src = pathlib.Path(source).resolve()
        if resolved == src or resolved.is_relative_to(src) or src.is_relative_to(resolved):
            where = ("is" if resolved == src else "is inside" if resolved.is_relative_to(src)
                     else "holds")
            raise OutputError(f"{target}: {where} the input {source}; writing there would "
                              "destroy it. Pass an output path outside it")


def _check_path_kind(target: pathlib.Path, flag: str) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: is a file, not a directory; pass a new {flag} path")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{target}: {parent} is a file, not a directory; pass another {flag}")


def claim_dir(target: str | os.PathLike, kind: str, *, inputs: Iterable = (),
              flag: str = "--workdir", create: bool = True) -> pathlib.Path:
    """Makes `target` this command's directory of `kind` (created with its marker), or refuses:
    a file, a directory holding files the tool did not write, a run of another kind, a path
    inside or above an input, or one that cannot be written. `create=False` only checks (what
    the processes other than 0 of a multi-host run do, so that all refuse together)."""
    target = pathlib.Path(target).absolute()
    _check_path_kind(target, flag)
    _check_not_overlapping(target, inputs)
    if target.is_dir() and any(target.iterdir()):
        marker = read_marker(target)
        if marker is None:
            found = sorted(p.name for p in target.iterdir())
            raise OutputError(
                f"{target}: holds files recipe_jax did not write ({', '.join(found[:5])}"
                f"{', ...' if len(found) > 5 else ''}); pass a new {flag} (absent or empty)")
        if marker.get("kind") not in (kind, "run") or (
                marker.get("kind") == "run" and not kind.startswith("run:")):
            raise OutputError(f"{target}: holds a recipe_jax {marker.get('kind')} output, not a "
                              f"{kind} one; pass a new {flag}")
    if not create:
        return target
    try:
        target.mkdir(parents=True, exist_ok=True)
        if read_marker(target) is None or read_marker(target).get("kind") == "run":
            write_marker(target, kind)
    except PermissionError as e:
        raise OutputError(f"{target}: cannot be written ({e.strerror}); pass a {flag} you can "
                          "write to") from None
    return target


def check_replace(target: str | os.PathLike, kind: str, *, inputs: Iterable = (),
                  overwrite: bool = False, flag: str = "--out",
                  legacy_files: Sequence[str] = ()) -> pathlib.Path:
    """Whether `target` may be replaced whole by a new output of `kind`: absent, empty, or the
    tool's own output of that kind with no other file in it (or anything, with `overwrite`,
    except a file, or a path inside or above an input). An output of an older version (no
    marker) counts as the tool's when it sits in a run dir of the tool and holds nothing but
    `legacy_files`."""
    target = pathlib.Path(target).absolute()
    _check_path_kind(target, flag)
    _check_not_overlapping(target, inputs)
    if overwrite or not target.is_dir() or not any(target.iterdir()):
        return target
    marker = read_marker(target)
    if marker is None and legacy_files and read_marker(target.parent) is not None:
        marker = {"kind": kind, "files": list(legacy_files)}
    if marker is None or marker.get("kind") != kind:
        found = sorted(p.name for p in target.iterdir())
        what = (f"files recipe_jax did not write ({', '.join(found[:5])}"
                f"{', ...' if len(found) > 5 else ''})" if marker is None
                else f"a recipe_jax {marker.get('kind')} output")
        raise OutputError(f"{target}: holds {what}; pass a new {flag}, or add --overwrite to "
                          "replace it")
    foreign = sorted(p.name for p in target.iterdir()
                     if p.name not in (*marker.get("files", ()), MARKER))
    if foreign:
        raise OutputError(f"{target}: besides the export recipe_jax wrote, holds "
                          f"{', '.join(foreign[:5])}; move them, pass a new {flag}, or add "
                          "--overwrite to replace it all")
    return target


# --------------------------------------------------------- files copied from a model dir

def file_mode() -> int:
    """rw-r--r-- less the umask: what a plain file the user creates gets."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o644 & ~umask


def _allowed_root(d: pathlib.Path) -> pathlib.Path:
    """Where a model dir's files may live: the dir itself, or, for a snapshot of the Hugging Face
    hub cache (models--ORG--NAME/snapshots/REV, whose files link to ../../blobs), the repo."""
    d = d.resolve()
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent
    return d


def copy_model_files(src: pathlib.Path, dst: pathlib.Path, names: Sequence[str],
                     remote_code_keys: Sequence[str]) -> list[str]:
    """Copies the files `names` of model dir `src` that exist to `dst`; returns those copied.
    Each must be a regular file inside `src` (a link out of it, e.g. to a private key, is
    refused); `remote_code_keys` are stripped from JSON files; the copy's mode is never wider
    than the source's (and at most rw-r--r--)."""
    root, copied = _allowed_root(src), []
    for name in names:
        path = src / name
        if not path.exists() and not path.is_symlink():
            continue
        real = path.resolve()
        if not real.is_relative_to(root) or not real.is_file():
            what = (f"links to {real}, outside the model dir" if not real.is_relative_to(root)
                    else "is not a regular file")
            raise ValueError(f"{path}: {what}; refusing to copy it into an output (it could "
                             "publish a private file). Put a real copy of the file there")
        data = real.read_bytes()
        if name.endswith(".json"):
            data = _strip_remote_code(path, data, remote_code_keys)
        write_file(dst / name, data, real.stat().st_mode & file_mode())
        copied.append(name)
    return copied


def write_file(path: pathlib.Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def write_atomic(path: pathlib.Path, text: str) -> None:
    """`text` to `path` through a temporary file and a rename: a reader (or a crash) sees the
    old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _strip_remote_code(path: pathlib.Path, data: bytes, keys: Sequence[str]) -> bytes:
    """A tokenizer JSON file without the fields that make `transformers` load code: auto_map,
    and a tokenizer_class that transformers does not ship."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data  # not ours to judge; the tokenizer loader names a broken file
    if not isinstance(obj, dict):
        return data
    import transformers

    drop = [k for k in keys if k in obj]
    cls = obj.get("tokenizer_class")
    if isinstance(cls, str) and not hasattr(transformers, cls):
        drop.append("tokenizer_class")
    if not drop:
        return data
    log.warning("%s: dropped %s from the copy (recipe_jax never writes fields that make "
                "transformers run code from a checkpoint)", path, ", ".join(drop))
    return (json.dumps({k: v for k, v in obj.items() if k not in drop}, indent=2,
                       ensure_ascii=False) + "\n").encode()


# -------------------------------------------------------------- atomic replacement of a dir

def fsync_dir(d: pathlib.Path) -> None:
    for path in [*d.iterdir(), d]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale(target: pathlib.Path) -> None:
    """Removes temp/old dirs a killed export of `target` left beside it (never `target`)."""
    for stale in target.parent.glob(f".{target.name}.*-*"):
        if stale.is_dir() and re.fullmatch(rf"\.{re.escape(target.name)}\.(tmp|old)-[0-9a-f]{{8}}",
                                           stale.name):
            log.warning("removing %s, left by an export that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)


def replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
    """Renames `new` onto `target`; an existing target is moved aside first, then removed. An
    error puts it back; a kill between the two renames leaves no `target` (never a partial
    one), and the next export removes the leftovers."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        faults.point("export_swap")
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:  # put the previous export back
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
