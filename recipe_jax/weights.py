"""Reads weight files from untrusted checkpoints without executing anything.

safetensors files are parsed here (header validated against the file before any tensor is read),
so a lying header (offsets past the end, overlapping data, a shape that does not fit its bytes, an
unknown dtype) is an error naming the file, not a crash or a silent garbage tensor. Legacy
`pytorch_model.bin` files go through `torch.load(weights_only=True)` only: its restricted
unpickler refuses any global that is not a tensor type, so a file crafted to run code is refused.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pathlib
import re
import struct

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class WeightFileError(ValueError):
    """A weight file is missing, truncated, corrupt or unsafe; the message names the file."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as numpy arrays (copies; the file is closed)."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise WeightFileError(f"{path}: corrupt safetensors header (claims {header_len} bytes "
                                  f"in a {size}-byte file); re-download or re-export the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightFileError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise WeightFileError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        data_len = size - data_start
        spans = [_check_entry(path, name, entry, data_len) for name, entry in header.items()]
        spans.sort()
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:], strict=False):
            if b1 < e0:
                raise WeightFileError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
        if not header:
            return {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            out = {}
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                buf = mm[data_start + begin:data_start + end]
                out[name] = np.frombuffer(buf, dtype=dtype).reshape(entry["shape"]).copy()
            return out


def _check_entry(path, name, entry, data_len) -> tuple[int, int, str]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise WeightFileError(f"{path}: tensor {name!r} has a malformed header entry")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise WeightFileError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)):
        raise WeightFileError(f"{path}: tensor {name!r} has a malformed shape or offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise WeightFileError(
            f"{path}: tensor {name!r} claims bytes [{begin}, {end}) but the file holds "
            f"{data_len} data bytes (truncated or corrupt file)")
    itemsize = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).itemsize
    # Python ints: np.prod wraps around in int64, so a lying shape could multiply out to 0.
    if math.prod(shape) * itemsize != end - begin:
        raise WeightFileError(f"{path}: tensor {name!r} of shape {shape} and dtype "
                              f"{entry['dtype']} does not fit its {end - begin} bytes")
    return begin, end, name


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A legacy PyTorch state dict, loaded with `weights_only=True` (no code runs)."""
    try:
        import torch
    except ImportError as e:
        raise WeightFileError(f"{path}: reading legacy .bin checkpoints needs torch "
                              "(pip install torch==2.13.0); or convert it to safetensors") from e
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Name what it asked for, not torch's advice (which includes rerunning unsafely).
        asked = re.search(r"(?:Unsupported global|GLOBAL):? *([\w.]+)", str(e))
        raise WeightFileError(
            f"{path}: refused to load: the file asks the unpickler for something other than "
            f"tensors{f' ({asked.group(1)})' if asked else ''}, which could execute code. Do "
            "not trust this checkpoint; ask its publisher for a safetensors file") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightFileError(f"{path}: corrupt or truncated PyTorch file ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise WeightFileError(f"{path}: expected a state dict of tensors, got {kind}")
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise WeightFileError(f"{path}: entry {name!r} is not a tensor")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[name] = tensor.detach().cpu().numpy().copy()
    return out


def weight_names(model_dir: str | os.PathLike) -> list[str]:
    """The tensor names of an HF model dir: from the safetensors header or shard index alone
    where there is one, else by reading the legacy file (weights_only)."""
    d = pathlib.Path(model_dir)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            try:
                return sorted(json.loads((d / index).read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightFileError(f"{d / index}: corrupt shard index ({e!r})") from None
    if (d / "model.safetensors").is_file():
        with open(d / "model.safetensors", "rb") as f:
            raw = f.read(8)
            (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
            if not 0 < length <= _MAX_HEADER_BYTES:
                raise WeightFileError(f"{d / 'model.safetensors'}: corrupt safetensors header")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightFileError(f"{d / 'model.safetensors'}: corrupt header ({e})") from None
        return sorted(k for k in header if k != "__metadata__")
    return sorted(read_weights(d)[0])


def read_weights(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """State dict of an HF model dir: safetensors first (single or sharded), legacy .bin last.

    Returns the tensors and the names of the files read.
    """
    d = pathlib.Path(model_dir)
    for single, index, reader in (
        ("model.safetensors", "model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", read_torch_bin),
    ):
        if (d / single).is_file():
            return reader(d / single), [single]
        if (d / index).is_file():
            return _read_sharded(d, index, reader)
    raise WeightFileError(
        f"{d}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json); point --hf at a Hugging Face model dir")


def _read_sharded(d: pathlib.Path, index: str, reader) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        weight_map = json.loads((d / index).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightFileError(f"{d / index}: corrupt shard index ({e!r})") from None
    files = sorted(set(weight_map.values()))
    out: dict[str, np.ndarray] = {}
    for name in files:
        shard = (d / name).resolve()
        if shard.parent != d.resolve():
            raise WeightFileError(f"{d / index}: shard {name!r} points outside the model dir")
        if not shard.is_file():
            raise WeightFileError(f"{d / index}: shard {name!r} is missing")
        out.update(reader(shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightFileError(f"{d / index}: tensors listed but absent from shards: {missing[:5]}")
    return out, [index, *files]
