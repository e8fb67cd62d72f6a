"""Direction files: read a refusal direction in any common format, normalize it, and save it back.

Accepted inputs (the format is chosen by the file extension):
- `.json`: `{"direction": [floats], "layer": int, "position": int, "d_model": int, "model": str}` (all but
  `direction` optional);
- `.safetensors`: a tensor named `direction` (metadata keys `layer`, `position`, ... are read when present);
- `.pt` / `.pth`: a 1-D tensor saved with `torch.save`, loaded with `weights_only=True` (the paper code's
  `direction.pt`);
- `.npy`: a 1-D array, loaded without pickle.

Whatever the input precision, the vector is normalized in float64 and returned as a float32 unit vector.
`save_direction` writes both `direction.json` (readable) and `direction.safetensors` (exact float32 values).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate.errors import UserError
from abliterate.files import write_atomic

DIRECTION_JSON = "direction.json"
DIRECTION_SAFETENSORS = "direction.safetensors"
SUFFIXES = (".json", ".safetensors", ".pt", ".pth", ".npy")
# Metadata keys that carry integers (safetensors metadata only holds strings).
_INT_KEYS = ("layer", "position", "d_model")


@dataclass
class Direction:
    """A unit-norm direction in the residual stream and where it came from."""

    vector: torch.Tensor  # [d_model] float32, unit norm
    layer: int | None = None
    position: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    def sha256(self) -> str:
        """Hash of the exact float32 values, recorded in edit records to say which direction was removed."""
        return hashlib.sha256(self.vector.contiguous().numpy().tobytes()).hexdigest()


def load_direction(path: str | Path, d_model: int | None = None) -> Direction:
    """Read a direction file, check it, and return it normalized to unit length.

    `d_model`, when given, is the model's hidden size; a vector of another length is refused naming both sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Direction file {path} does not exist; pass an existing file to --direction.")
    suffix = path.suffix.lower()
    readers = {".json": _read_json, ".safetensors": _read_safetensors, ".pt": _read_torch, ".pth": _read_torch,
               ".npy": _read_numpy}
    if suffix not in readers:
        raise UserError(f"Direction file {path} has an unknown extension '{path.suffix}'; "
                        f"use one of {', '.join(SUFFIXES)} for --direction.")
    raw, meta = readers[suffix](path)
    vector = _check_vector(raw, path, meta.get("d_model"), d_model)
    norm = float(torch.linalg.vector_norm(vector))
    meta = {**meta, "source_file": str(path), "source_norm": norm}
    unit = (vector / norm).to(torch.float32)  # normalize in float64, then store as float32
    return Direction(vector=unit, layer=meta.get("layer"), position=meta.get("position"), meta=meta)


def save_direction(out_dir: str | Path, vector: torch.Tensor, meta: dict[str, Any] | None = None) -> Path:
    """Write `direction.json` and `direction.safetensors` into `out_dir`; return the JSON file's path.

    The vector is normalized first (a zero or non-finite vector is refused); `meta` may hold `layer`,
    `position`, `model` and any other JSON-able provenance.
    """
    vector = _check_vector(vector, Path("<vector to save>"), None, None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit = (vector / torch.linalg.vector_norm(vector)).to(torch.float32).contiguous()  # [d_model]
    meta = {key: value for key, value in (meta or {}).items() if key not in ("direction", "source_file")}
    meta["d_model"] = int(unit.shape[0])
    json_path = out_dir / DIRECTION_JSON
    payload = {"direction": [float(x) for x in unit.tolist()], **dict(sorted(meta.items()))}
    write_atomic(json_path, (json.dumps(payload, indent=1) + "\n").encode())

    metadata = {key: json.dumps(value, sort_keys=True) for key, value in meta.items()}
    save_safetensors(out_dir / DIRECTION_SAFETENSORS, {"direction": unit}, metadata)
    return json_path


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its content: the same tensors and metadata, the same bytes.

    safetensors keeps `__metadata__` in a hash map, so its key order (and the file's bytes) changes from run to
    run; the header is written again here with every key sorted. Tensor data and offsets are left as they are.
    """
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    (header_bytes,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_bytes])
    stored = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(stored.items()))} if stored else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + blob[8 + header_bytes:]


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `safetensors_bytes` to `path` atomically."""
    write_atomic(Path(path), safetensors_bytes(tensors, metadata))


def _check_vector(raw: Any, path: Path, stated_d_model: Any, d_model: int | None) -> torch.Tensor:
    """Turn the raw values into a float64 1-D tensor and refuse anything that cannot be a direction."""
    try:
        vector = torch.as_tensor(raw).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"Direction file {path} does not hold a list of numbers ({error}); "
                        "fix the file passed to --direction.") from None
    if vector.dim() != 1:
        raise UserError(f"Direction in {path} has shape {list(vector.shape)}; it must be a 1-D vector of d_model "
                        "values. Fix the file passed to --direction.")
    if vector.numel() == 0:
        raise UserError(f"Direction in {path} is empty; fix the file passed to --direction.")
    if not bool(torch.isfinite(vector).all()):
        raise UserError(f"Direction in {path} contains NaN or infinite values; re-measure it or fix --direction.")
    norm = float(torch.linalg.vector_norm(vector))
    if norm == 0.0 or not math.isfinite(norm):
        raise UserError(f"Direction in {path} is the zero vector (norm {norm}); re-measure it or fix --direction.")
    if stated_d_model is not None and int(stated_d_model) != vector.numel():
        raise UserError(f"Direction in {path} has {vector.numel()} values but its own d_model field says "
                        f"{stated_d_model}; fix the file passed to --direction.")
    if d_model is not None and vector.numel() != d_model:
        raise UserError(f"Direction in {path} has {vector.numel()} values but the model's hidden size (d_model) is "
                        f"{d_model}; pass a direction measured on this model with --direction.")
    return vector


def _malformed(path: Path, why: str) -> UserError:
    return UserError(f"Direction file {path} is malformed ({why}); fix the file passed to --direction.")


def _int_meta(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check that layer/position/d_model, when present, are integers (JSON null means absent)."""
    clean = {key: value for key, value in meta.items() if value is not None}
    for key in _INT_KEYS:
        if key in clean and (isinstance(clean[key], bool) or not isinstance(clean[key], int)):
            raise _malformed(path, f"'{key}' must be an integer, got {clean[key]!r}")
    return clean


def _read_json(path: Path) -> tuple[Any, dict[str, Any]]:
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _malformed(path, f"not valid JSON: {error}") from None
    if not isinstance(payload, dict) or "direction" not in payload:
        raise _malformed(path, 'expected a JSON object {"direction": [floats], ...}')
    values = payload["direction"]
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise _malformed(path, "'direction' must be a list of numbers")
    meta = {key: value for key, value in payload.items() if key != "direction"}
    return values, _int_meta(meta, path)


def _read_safetensors(path: Path) -> tuple[Any, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if "direction" not in names:
                held = f"{names[:3]}{f' and {len(names) - 3} more' if len(names) > 3 else ''}" if names else "no tensors"
                raise _malformed(path, f"no tensor named 'direction'; it holds {held}")
            vector = handle.get_tensor("direction")
            stored = handle.metadata() or {}
    except SafetensorError as error:
        raise _malformed(path, f"not a safetensors file: {error}") from None
    meta: dict[str, Any] = {}
    for key, text in stored.items():
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError:
            meta[key] = text  # plain strings such as {"format": "pt"}
    meta.pop("format", None)
    return vector, _int_meta(meta, path)


def _read_torch(path: Path) -> tuple[Any, dict[str, Any]]:
    import pickle
    import warnings

    try:
        # weights_only: a direction file must never be able to run code when loaded. torch's own warnings about
        # pickle protocols are about its unpickler, not the user's file, so they stay off the user's terminal.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():  # torch's advice here is to allow code execution: not passed on
            raise _malformed(path, "it holds pickled Python objects besides tensors, which abliterate never "
                             "unpickles because unpickling can run code; save the vector alone with "
                             "torch.save(tensor), or as .safetensors, .npy or .json") from None
        raise _malformed(path, f"not a tensor saved with torch.save: {_first_line(error)}") from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise _malformed(path, f"not a tensor saved with torch.save: {_first_line(error)}") from None
    if not isinstance(value, torch.Tensor):
        raise _malformed(path, f"it holds a {type(value).__name__}, not a 1-D tensor")
    return value, {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_numpy(path: Path) -> tuple[Any, dict[str, Any]]:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise _malformed(path, f"not a .npy array: {error}") from None
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise _malformed(path, f"expected a numeric array, got dtype {getattr(array, 'dtype', type(array))}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)), {}
