"""Local checkpoint folders: config, tensor headers, and lazy per-tensor reads.

Only headers are read to plan and check a merge; tensors are read one at a time with
safetensors' ``safe_open`` (memory-mapped, never a whole file).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open
from .errors import CheckpointError
from .trust import check_folder, checked_file, open_regular

__all__ = [
    "TensorInfo",
    "Checkpoint",
    "CheckpointError",
    "read_safetensors_header",
    "validate_header",
    "register_checkpoint_kind",
    "SAFETENSORS_DTYPES",
    "WEIGHT_FILE_NAMES",
]

SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Looked for in this order, the order transformers' from_pretrained uses for a folder (after the
# config's own "transformers_weights"): a stale file beside newer shards is what transformers loads.
WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Bytes read from a safetensors header before we give up (a header is JSON, rarely > a few MB).
_MAX_HEADER = 100 * 1024 * 1024


_COUNTING = threading.Lock()  # bytes_read is updated by concurrent block readers


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: its file (relative to the folder), dtype and shape;
    ``offset``: where its bytes start in a safetensors file (-1 when unknown, e.g. ``.bin``)."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    file: str
    offset: int = field(default=-1, compare=False)
    stored_name: Optional[str] = field(default=None, compare=False)  # its name in the file, when keyed otherwise

    @property
    def file_name(self) -> str:
        """The tensor's name in its file (``name`` may be the merge's name for it: see ``Checkpoint.rekey``)."""
        return self.stored_name or self.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


def read_safetensors_header(path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read only the JSON header of a safetensors file: ({name: {dtype, shape, data_offsets}}, metadata)."""
    header, metadata, _ = _read_header(path)
    return header, metadata


def _read_header(path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, str], int]:
    """(header, metadata, byte where the data starts: 8 + the header's length)."""
    path = Path(path)
    try:
        with open_regular(path, str(path.parent)) as f:  # a FIFO would block the read forever
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible)")
            header_bytes = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(exc).__name__}: {exc})") from None
    metadata = validate_header(header, size - 8 - n, str(path))
    return header, metadata, 8 + n


def validate_header(header: Any, data_len: int, where: str) -> Dict[str, str]:
    """Check a parsed safetensors header as the safetensors library does, and pop its metadata:
    a JSON object of entries {dtype, shape, data_offsets} with known dtypes, non-negative integer
    shapes, offsets matching each tensor's byte size, laid end to end from 0 with no gap or
    overlap, ending exactly at the end of the file. ``data_len``: bytes after the header."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"{where}: corrupt safetensors header (__metadata__ must map strings to strings)")
    spans = []
    for name, entry in header.items():
        bad = f"{where}: corrupt safetensors header: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{bad} needs dtype, shape and data_offsets")
        dt = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dt is None:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
        shape, offs = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{bad} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_count(o) for o in offs) and offs[0] <= offs[1]):
            raise CheckpointError(f"{bad} has data_offsets {offs!r}, not [begin, end] with 0 <= begin <= end")
        numel = 1
        for d in shape:
            numel *= d
        if offs[1] - offs[0] != numel * torch.empty((), dtype=dt).element_size():
            raise CheckpointError(f"{bad} has {offs[1] - offs[0]} bytes for shape {shape} of {entry['dtype']}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise CheckpointError(f"{where}: corrupt safetensors header: tensor {name!r} {what}")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{where}: the header describes {end} bytes of tensor data but the file holds "
                              f"{data_len} (truncated or padded file)")
    return metadata


def _checked_weight_map(weight_map: Any, where: Path) -> Dict[str, str]:
    """An index's weight_map: an object of tensor name -> weight file name (checked before any use,
    so a number or a list as a file name is refused naming the tensor)."""
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{where}: weight_map is a JSON {type(weight_map).__name__}, not an object")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{where}: weight_map[{tensor!r}] is {file!r}, not the name of a weight file")
    return weight_map


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def infos_from_header(header: Mapping[str, Any], file: str, where: str,
                      data_start: Optional[int] = None) -> Dict[str, TensorInfo]:
    out = {}
    base = data_start
    for name, entry in header.items():
        dt = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dt is None:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        offset = base + int(entry["data_offsets"][0]) if base is not None and "data_offsets" in entry else -1
        out[name] = TensorInfo(name, dt, tuple(int(d) for d in entry["shape"]), file, offset)
    return out


# Other folder formats that read as a checkpoint (detect(folder) -> bool, subclass); see hf_ame.adapters
_KINDS: List[Tuple[Callable[[Path], bool], type]] = []


def register_checkpoint_kind(detect: Callable[[Path], bool], cls: type) -> None:
    """Make ``Checkpoint(folder)`` build ``cls`` (a :class:`Checkpoint` subclass) for folders that
    ``detect`` recognises, e.g. LoRA adapters."""
    _KINDS.append((detect, cls))


class Checkpoint:
    """One model folder (as ``save_pretrained`` writes it, or a Hub snapshot).

    Attributes:
        name: how errors and cards name it (Hub id or the path as given).
        path: the folder.
        config: the parsed ``config.json`` ({} when absent).
        tensors: name -> :class:`TensorInfo`, in file order.
        format: ``"safetensors"`` or ``"bin"``.
    """

    def __new__(cls, path: Union[str, Path], *args: Any, **kwargs: Any) -> "Checkpoint":
        if cls is Checkpoint:
            for detect, kind in _KINDS:
                if detect(Path(path)):
                    return super().__new__(kind)
        return super().__new__(cls)

    # the caller's consent to the folder's custom code: its .py files are copied into outputs only then
    trust_remote_code = False

    def __init__(self, path: Union[str, Path], name: Optional[str] = None):
        self.path = Path(path)
        self.files_path = self.path  # where config, tokenizer and processor files are (an adapter: its base)
        self.name = name or str(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.name}: no such checkpoint folder: {self.path}")
        check_folder(self.path, self.name)  # links out of the folder, FIFOs: refused before any read
        self._bin_state: Dict[str, Dict[str, torch.Tensor]] = {}
        self._fds: Dict[str, Any] = {}  # weight file -> open unbuffered file, for read_flat
        self.bytes_read = 0
        self.config = self._read_config()
        self.weight_file, self.format = self._find_weights()
        self.tensors: Dict[str, TensorInfo] = self._read_headers()

    # ---------------------------------------------------------------- discovery
    def _read_config(self) -> Dict[str, Any]:
        if not os.path.lexists(self.path / "config.json"):
            return {}
        try:
            with open_regular(checked_file(self.path, "config.json", self.name), self.name) as fh:
                data = json.loads(fh.read())
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{self.name}: config.json is not valid JSON ({exc})") from None
        if not isinstance(data, dict):  # every reader calls .get on it
            raise CheckpointError(f"{self.name}: config.json is a JSON {type(data).__name__}, not an object of "
                                  "config fields")
        return data

    def _find_weights(self) -> Tuple[str, str]:
        explicit = self.config.get("transformers_weights")
        if isinstance(explicit, str):  # transformers loads this file when the config names it
            checked_file(self.path, explicit, self.name, f"config.json's transformers_weights {explicit!r}")
            if os.path.isabs(explicit) or not (self.path / explicit).is_file():
                raise CheckpointError(f"{self.name}: config.json's transformers_weights {explicit!r} is not a file "
                                      "inside the folder")
            return explicit, ("safetensors" if ".safetensors" in explicit else "bin")
        for fname in WEIGHT_FILE_NAMES:
            if os.path.lexists(self.path / fname):
                checked_file(self.path, fname, self.name)
                return fname, ("safetensors" if "safetensors" in fname else "bin")
        present = sorted(p.name for p in self.path.iterdir())[:10]
        raise CheckpointError(
            f"{self.name}: no weights found in {self.path} (looked for {', '.join(WEIGHT_FILE_NAMES)}; "
            f"the folder holds: {', '.join(present) or 'nothing'})"
        )

    def weight_files(self) -> List[str]:
        """The weight files (relative names) this checkpoint's tensors live in."""
        if self.weight_file.endswith(".index.json"):
            return sorted({i.file for i in self.tensors.values()})
        return [self.weight_file]

    def _read_headers(self) -> Dict[str, TensorInfo]:
        if self.weight_file.endswith(".index.json"):
            try:
                with open_regular(self.path / self.weight_file, self.name) as fh:
                    index = json.loads(fh.read())
                weight_map: Dict[str, str] = _checked_weight_map(index["weight_map"], self.path / self.weight_file)
                files = list(dict.fromkeys(weight_map.values()))
            except CheckpointError:
                raise
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{self.name}: {self.weight_file} is not a valid index ({exc})") from None
            for f in files:
                self._check_listed(f)
                if not (self.path / f).exists():
                    raise CheckpointError(f"{self.name}: {self.weight_file} lists {f}, which is missing")
        else:
            weight_map, files = None, [self.weight_file]
        infos: Dict[str, TensorInfo] = {}
        for f in files:
            if self.format == "safetensors":
                header, _, start = _read_header(self.path / f)
                part = infos_from_header(header, f, f"{self.name}/{f}", start)
            else:
                part = {k: TensorInfo(k, v.dtype, tuple(v.shape), f) for k, v in self._load_bin(f).items()}
            for k, info in part.items():
                if weight_map is not None and weight_map.get(k) != f:
                    continue  # the index is authoritative
                infos[k] = info
        if weight_map is not None:
            missing = [k for k in weight_map if k not in infos]
            if missing:
                raise CheckpointError(f"{self.name}: tensor {missing[0]!r} is in {self.weight_file} "
                                      f"but not in {weight_map[missing[0]]}")
        return infos

    def _check_listed(self, f: Any) -> None:
        """A shard named by the index: a relative name of a regular file inside the folder (an index
        naming ``../x.safetensors`` or ``/etc/...`` would read and merge a file the user never gave)."""
        what = f"{self.weight_file} lists {f!r}, which"
        if not isinstance(f, str) or not f or os.path.isabs(f) or ".." in Path(f).parts:
            raise CheckpointError(f"{self.name}: {what} is not a file name inside the folder")
        checked_file(self.path, f, self.name, what)

    def _load_bin(self, f: str) -> Dict[str, torch.Tensor]:
        # pickled checkpoints: mmap + weights_only, so nothing executes and pages load lazily.
        if f not in self._bin_state:
            try:
                sd = torch.load(self.path / f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
                raise CheckpointError(
                    f"{self.name}: cannot read {f} safely with torch.load(weights_only=True): {exc}. "
                    "Convert it to safetensors first."
                ) from None
            if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
                raise CheckpointError(f"{self.name}: {f} is not a plain state dict of tensors")
            self._bin_state[f] = sd
        return self._bin_state[f]

    def rekey(self, names: Mapping[str, str]) -> "Checkpoint":
        """Key tensors by other names (``names``: name in the file -> name in the merge; tensors not
        listed are left out), as transformers aligns a headless body with a headed model by its
        ``base_model_prefix``. Reads still use each tensor's name in its file. Returns self."""
        self.tensors = {names[k]: dataclasses.replace(info, name=names[k], stored_name=info.file_name)
                        for k, info in self.tensors.items() if k in names}
        return self

    # ---------------------------------------------------------------- reading
    @property
    def model_type(self) -> Optional[str]:
        return self.config.get("model_type")

    @property
    def architectures(self) -> Optional[List[str]]:
        return self.config.get("architectures")

    def get_tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """Read one tensor (a fresh CPU/device tensor in its stored dtype)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        if self.format == "bin":
            t = self._load_bin(info.file)[info.file_name].to(device, copy=True)
        else:
            # A fresh handle per read: safetensors maps the file, and pages touched through a
            # handle kept open stay resident (counted in RSS) until it closes. Per-read handles
            # tie that memory to the returned tensor's lifetime instead. Opening costs one header parse.
            try:
                with safe_open(str(self.path / info.file), framework="pt", device="cpu") as handle:
                    t = handle.get_tensor(info.file_name)
            except Exception as exc:  # noqa: BLE001 - safetensors' own error type is not an OSError/ValueError
                raise CheckpointError(f"{self.name}/{info.file}: cannot read tensor {name!r}: {exc}") from None
            if str(device) != "cpu":
                t = t.to(device, non_blocking=False)
        with _COUNTING:  # tensors may be read by several workers at once (plan's side_by_side)
            self.bytes_read += info.nbytes
        return t

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of tensor ``name`` flattened, as a fresh 1-D CPU tensor in its stored
        dtype, read with ``os.preadv`` (seek + readinto where the OS has no preadv); no memory map, so
        nothing stays resident once it is freed.
        ``.bin`` checkpoints (no byte offsets) slice the lazily loaded tensor instead."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        if not 0 <= start <= end <= info.numel:
            raise ValueError(f"{self.name}: range [{start}, {end}) is outside tensor {name!r} of {info.numel} elements")
        if self.format == "bin" or info.offset < 0:
            out = self._load_bin(info.file)[info.file_name].reshape(-1)[start:end].clone()
        else:
            esize = torch.empty((), dtype=info.dtype).element_size()
            raw = torch.empty((end - start) * esize, dtype=torch.uint8)
            fh = self._fds.get(info.file)
            if fh is None:
                fh = self._fds[info.file] = open(self.path / info.file, "rb", buffering=0)
            view, pos = memoryview(raw.numpy()), info.offset + start * esize
            while len(view):  # reads may return short counts on large requests
                if hasattr(os, "preadv"):  # Linux/BSD: positional, no seek
                    got = os.preadv(fh.fileno(), [view], pos)
                else:  # macOS/Windows; one reader thread per checkpoint, so seeking is safe
                    fh.seek(pos)
                    got = fh.readinto(view)
                if not got:
                    raise CheckpointError(f"{self.name}/{info.file}: truncated while reading tensor {name!r}")
                view, pos = view[got:], pos + got
            out = raw.view(info.dtype)  # safetensors is little-endian, as torch's CPUs
        with _COUNTING:  # blocks may be read by several workers at once (reads_concurrently)
            self.bytes_read += out.numel() * out.element_size()
        return out

    def reads_concurrently(self, name: str) -> bool:
        """Whether :meth:`read_flat` of ``name`` may run in several threads at once: positional reads
        of a safetensors file (no shared file position, no cache). Subclasses that read otherwise: no."""
        info = self.tensors.get(name)
        return (type(self).read_flat is Checkpoint.read_flat and self.format != "bin" and info is not None
                and info.offset >= 0)

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (indices along dim 0) of tensor ``name``: only the span from the first to the
        last of them is read (:meth:`read_flat`), so a few added-token rows cost a few rows."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        shape = tuple(info.shape)
        if not rows.numel():
            return torch.empty((0, *shape[1:]), dtype=info.dtype)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        width = math.prod(shape[1:])
        span = self.read_flat(name, lo * width, hi * width).reshape(hi - lo, *shape[1:])
        return span.index_select(0, rows - lo)

    def close(self) -> None:
        self._bin_state.clear()
        for fh in self._fds.values():
            fh.close()
        self._fds.clear()

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self.tensors)} tensors, {self.format})"
