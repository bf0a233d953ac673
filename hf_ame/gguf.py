"""GGUF files as ingredients: llama.cpp / Ollama / LM Studio checkpoints read as transformers reads them.

A ``.gguf`` file, or a folder holding exactly one (a Hub repo: ``{"id": repo, "gguf_file": name}``,
transformers' ``gguf_file`` argument), opens as a :class:`GGUFCheckpoint`:

- **names, shapes, config, tokenizer** come from transformers' own GGUF support, nothing of ours:
  the config is ``AutoConfig.from_pretrained(folder, gguf_file=name)`` (``architectures`` filled in
  with the causal-LM class transformers' Auto mapping gives its ``model_type`` when the GGUF leaves
  it empty), the tokenizer ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``, both saved into
  a scratch folder (``files_path``) that the output's config and tokenizer are copied from; tensor
  names are ``get_gguf_hf_weights_map`` over an empty-weight model of that config (transformers'
  ``modeling_gguf_pytorch_utils``), shapes that model's.
- **values**: each tensor's bytes are read with ``os.preadv`` when the merge asks for it (no memory
  map kept: nothing stays resident), dequantized by the ``gguf`` package's ``dequantize`` and passed
  through the architecture's transformers ``TensorProcessor`` (Llama's q/k un-permutation, Gemma's
  norm offset, ...), then cast to float32: the same calls, in the same order, as
  ``from_pretrained(..., gguf_file=)`` on the CPU, so the tensors are bit for bit transformers'
  (``tests/test_gguf.py``). One tensor at a time: memory is flat in the number of GGUF ingredients.
- **refused by name, before any tensor is read**: an architecture transformers cannot map (not in
  ``GGUF_SUPPORTED_ARCHITECTURES``), the architectures transformers loads through its packed-GGUF
  path (``transformers.integrations.gguf.GGUF_ARCHS``) or whose processor splits one GGUF tensor into
  many (GPT-OSS), and any tensor of a ggml type the ``gguf`` package cannot dequantize.

Tensors are float32 (what transformers' default load gives); the merge writes ``dtype=`` (default
the first ingredient's dtype, float32 when that is a GGUF). Needs ``pip install gguf`` (the ``gguf``
extra). Importing this module registers the kind with :class:`~hf_ame.checkpoints.Checkpoint`.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .architecture import empty_model
from .checkpoints import WEIGHT_FILE_NAMES, Checkpoint, TensorInfo, register_checkpoint_kind
from .errors import CheckpointError
from .scratch import scratch_dir
from .trust import check_folder, checked_file

__all__ = ["GGUFCheckpoint", "is_gguf", "gguf_in_folder", "GGUF_SUFFIX"]

GGUF_SUFFIX = ".gguf"


def is_gguf(path: Union[str, Path]) -> bool:
    """A ``.gguf`` file, or a folder with a ``.gguf`` file and no weights transformers would load first."""
    p = Path(path)
    if p.suffix.lower() == GGUF_SUFFIX:
        return p.is_file()
    if not p.is_dir() or any(os.path.lexists(p / f) for f in WEIGHT_FILE_NAMES + ("adapter_config.json",)):
        return False
    return any(f.suffix.lower() == GGUF_SUFFIX for f in p.iterdir())


def gguf_in_folder(folder: Union[str, Path], who: str) -> str:
    """The name of the one ``.gguf`` file in ``folder``; none or several are refused, naming them."""
    names = sorted(f.name for f in Path(folder).iterdir() if f.suffix.lower() == GGUF_SUFFIX)
    if len(names) != 1:
        what = f"holds {len(names)} GGUF files ({', '.join(names[:6])})" if names else "holds no .gguf file"
        raise CheckpointError(f"{who}: {folder} {what}; name the one to merge: {{id: ..., gguf_file: NAME}}")
    return names[0]


@dataclass(frozen=True)
class _Source:
    """One tensor as the GGUF file stores it: where its bytes are and how ``GGUFReader`` views them."""

    name: str
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int
    np_dtype: str
    np_shape: Tuple[int, ...]


@dataclass
class _Header:
    """Everything read from one GGUF file before any tensor: cached per file (path, size, mtime)."""

    architecture: str
    config: Dict[str, Any]
    files: Path  # config.json and tokenizer files, as transformers builds them from the GGUF
    tokenizer: bool  # the GGUF holds a tokenizer: built into ``files`` on first use of files_path
    tensors: Dict[str, TensorInfo]
    sources: Dict[str, List[_Source]]
    processor: Any
    key_mapping: Dict[str, str]
    quantization: str


_CACHE: Dict[Tuple[str, int, int], _Header] = {}
_CACHE_LOCK = threading.Lock()
_SCRATCH: List[Path] = []


def _gguf():
    try:
        import gguf
    except ImportError:  # an optional dependency: named, with the command that installs it
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'hf_ame[gguf]' "
                              "(or pip install gguf)") from None
    return gguf


class GGUFCheckpoint(Checkpoint):
    """One GGUF file read as the checkpoint transformers loads from it (see the module docstring).

    Args:
        path: the ``.gguf`` file, or a folder holding exactly one.
        name: how errors and cards name it (default: the path).
        gguf_file: the file's name inside ``path`` when ``path`` is a folder holding several.
    Attributes beyond :class:`Checkpoint`'s: ``gguf_file`` (the file name), ``architecture`` (the
    GGUF's ``general.architecture``), ``quantization`` (e.g. ``"Q4_1 (Q4_1: 210, F32: 61, Q8_0: 1)"``).
    """

    def __init__(self, path: Union[str, Path], name: Optional[str] = None, gguf_file: Optional[str] = None):
        p = Path(path)
        self.name = name or str(path)
        folder, file = (p, gguf_file or gguf_in_folder(p, self.name)) if p.is_dir() else (p.parent, p.name)
        check_folder(folder, self.name)
        self.path = checked_file(folder, file, self.name)  # a link out of the folder or a FIFO: refused
        self.gguf_file = file
        header = _header(self.path, self.name)
        self.architecture, self.quantization = header.architecture, header.quantization
        self.config = dict(header.config)
        self.tensors: Dict[str, TensorInfo] = dict(header.tensors)
        self._header = header
        self.format, self.weight_file = "gguf", file
        self._bin_state, self._fds = {}, {}
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._cache: Tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    @property
    def files_path(self) -> Path:  # type: ignore[override]
        """The folder with config.json and the tokenizer files transformers builds from the GGUF (the
        tokenizer built on first use: converting a large vocabulary takes seconds)."""
        h = self._header
        with _CACHE_LOCK:
            if h.tokenizer and not (h.files / "tokenizer_config.json").exists():
                _tokenizer(self.path, h.files, self.name)
        return h.files

    def weight_files(self) -> List[str]:
        return [self.gguf_file]

    def get_tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """Tensor ``name`` dequantized (float32, a fresh tensor), as transformers' GGUF load gives it.
        Not kept: each ingredient holding its last tensor would make memory grow with N."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        with self._lock:
            self._cache = (None, None)
        t = self._dequantize(info)
        self.bytes_read += info.nbytes
        return t if torch.device(device).type == "cpu" else t.to(device)

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the dequantized tensor, flattened (the tensor is dequantized whole
        once and kept until another one is read: row groups read one tensor's spans in a row).
        The bytes counted are the whole tensor's, once per dequantization."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        if not 0 <= start <= end <= info.numel:
            raise ValueError(f"{self.name}: range [{start}, {end}) is outside tensor {name!r} of {info.numel} elements")
        return self._cached(name).reshape(-1)[start:end].clone()

    def _cached(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        with self._lock:  # the prefetch thread and the merge may ask at once
            if self._cache[0] == name:
                return self._cache[1]  # type: ignore[return-value]
            t = self._dequantize(info)
            self._cache = (name, t)
            self.bytes_read += info.nbytes  # the dequantized bytes, as the plan counts them
            return t

    def _dequantize(self, info: TensorInfo) -> torch.Tensor:
        """transformers' ``load_gguf_checkpoint`` for one tensor: dequantize, process, copy, cast."""
        import numpy as np

        gguf = _gguf()
        h = self._header
        target = info.file_name
        produced: Dict[str, Any] = {"tensors": {}}
        out = None
        for src in h.sources[target]:
            weights = gguf.dequantize(self._raw(src), src.ggml_type)
            result = h.processor.process(weights=weights, name=src.name, tensor_key_mapping=h.key_mapping,
                                         parsed_parameters=produced)
            if result.name is not None:
                out = torch.from_numpy(np.copy(result.weights)).to(torch.float32)
        if out is None:  # the processor wrote it itself (MoE experts fused from several GGUF tensors)
            out = produced["tensors"].get(target)
            if out is None:
                raise CheckpointError(f"{self.name}: transformers' GGUF processor produced no tensor {target!r}")
            out = out.to(torch.float32)
        if out.numel() != info.numel:
            raise CheckpointError(f"{self.name}/{self.gguf_file}: tensor {target!r} dequantizes to {tuple(out.shape)}, "
                                  f"not the model's {tuple(info.shape)}")
        return out.reshape(info.shape)

    def _raw(self, src: _Source):
        """The tensor's stored bytes, read with ``os.preadv`` into a fresh array viewed as ``GGUFReader`` does."""
        import numpy as np

        fh = self._fds.get("gguf")
        if fh is None:
            fh = self._fds["gguf"] = open(self.path, "rb", buffering=0)
        raw = np.empty(src.nbytes, dtype=np.uint8)
        view, pos = memoryview(raw), src.offset
        while len(view):
            got = os.preadv(fh.fileno(), [view], pos) if hasattr(os, "preadv") else _seek_read(fh, view, pos)
            if not got:
                raise CheckpointError(f"{self.name}/{self.gguf_file}: truncated while reading tensor {src.name!r}")
            view, pos = view[got:], pos + got
        return raw.view(np.dtype(src.np_dtype)).reshape(src.np_shape)

    def close(self) -> None:
        self._cache = (None, None)
        super().close()

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({self.name!r}, {self.architecture}, {self.quantization}, {len(self.tensors)} tensors)"


def _seek_read(fh: Any, view: memoryview, pos: int) -> int:
    fh.seek(pos)
    return fh.readinto(view)


# ----------------------------------------------------------------------------- header (no tensor read)
def _header(file: Path, who: str) -> _Header:
    """The file's header, parsed once per (path, size, mtime) in this process."""
    st = os.stat(file)
    key = (os.path.realpath(file), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _read_header(file, who)
        return _CACHE[key]


def _read_header(file: Path, who: str) -> _Header:
    """Architecture and tensor types checked first (refused by name), then transformers' config,
    tokenizer and name mapping; no tensor data is read."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:  # noqa: BLE001 - numpy / struct / ValueError from a corrupt file
        raise CheckpointError(f"{who}: {file.name} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field(reader, "general.architecture")
    _check_architecture(arch, file, who)
    _check_types(reader, file, who)
    files = _files_folder()
    config, parsed = _config(file, files, who)
    processor, key_mapping, model_state = _mapping(arch, config, parsed)
    sources = _sources(reader, processor, key_mapping, model_state, file, who)
    tensors = {t: TensorInfo(t, torch.float32, tuple(model_state[t].shape), file.name) for t in sources}
    return _Header(arch, config, files, "tokenizer.ggml.model" in reader.fields, tensors, sources, processor,
                   key_mapping, _quantization(reader))


def _field(reader: Any, key: str) -> Any:
    """A scalar or string field of the GGUF metadata (None when absent)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - older gguf: read the part directly
        part = f.parts[f.data[0]]
        return bytes(part).decode("utf-8") if f.types and f.types[0].name == "STRING" else part[0]


def _check_architecture(arch: Any, file: Path, who: str) -> None:
    """Refuse what transformers cannot map, or maps through paths this reader does not follow."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, TENSOR_PROCESSORS

    if not isinstance(arch, str):
        raise CheckpointError(f"{who}: {file.name} has no general.architecture in its GGUF metadata")
    try:
        from transformers.integrations.gguf import GGUF_ARCHS  # transformers' packed-GGUF loader (newer releases)
    except ImportError:
        GGUF_ARCHS = {}
    if arch in GGUF_ARCHS:
        raise CheckpointError(f"{who}: {file.name} is a GGUF of architecture {arch!r}, which transformers loads "
                              "through its packed-GGUF path (transformers.integrations.gguf); hf_ame reads the "
                              "architectures of transformers' dequantizing GGUF loader only: "
                              + ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in GGUF_ARCHS)))
    known = set(GGUF_SUPPORTED_ARCHITECTURES) | {"mistral", "t5", "t5encoder", "umt5"}
    if arch not in known and not any(a in arch for a in ("qwen2moe", "qwen3moe", "gpt-oss", "minimax-m2")):
        raise CheckpointError(f"{who}: {file.name} is a GGUF of architecture {arch!r}, which transformers cannot map "
                              f"to a model (it maps: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    processor = TENSOR_PROCESSORS.get(arch)
    if processor is not None and processor.__name__ == "GptOssTensorProcessor" or arch in ("gpt-oss", "gpt_oss"):
        raise CheckpointError(f"{who}: {file.name} is a GGUF of architecture {arch!r}, whose transformers processor "
                              "splits each stored expert tensor into many; hf_ame does not stream it: load it with "
                              "transformers and save_pretrained it first")


def _check_types(reader: Any, file: Path, who: str) -> None:
    """Every tensor's ggml type must be one the gguf package dequantizes (transformers' GGUF loader
    accepts exactly these: it calls the same ``gguf.dequantize``)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    ok = {q.F32, q.F16} | set(getattr(gguf.quants, "_type_traits", {}))  # dequantize's own dispatch table
    for t in reader.tensors:
        if t.tensor_type not in ok:
            raise CheckpointError(f"{who}: {file.name}: tensor {t.name!r} is stored as ggml type "
                                  f"{t.tensor_type.name}, which the gguf package (and so transformers) cannot "
                                  "dequantize")


def _files_folder() -> Path:
    """A new folder for one GGUF's config and tokenizer files, inside this process's scratch folder."""
    if not _SCRATCH:

        _SCRATCH.append(scratch_dir("gguf"))
        atexit.register(shutil.rmtree, str(_SCRATCH[0]), True)
    folder = _SCRATCH[0] / f"files-{len(list(_SCRATCH[0].iterdir()))}"
    folder.mkdir()
    return folder


def _config(file: Path, files: Path, who: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(config.json as transformers builds it from the GGUF, with ``architectures`` filled in;
    the raw GGUF config dict transformers hands its tensor processor). ``AutoConfig.from_pretrained(
    folder, gguf_file=)`` is ``CONFIG_MAPPING[model_type].from_dict`` of that same dict for the
    architectures of the dequantizing loader: done here on the dict already parsed (one parse, not two)."""
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(file), return_tensors=False)["config"]
        config = CONFIG_MAPPING[parsed["model_type"]].from_dict(dict(parsed))
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{who}: transformers cannot build a config from {file.name}: {exc}") from None
    if not getattr(config, "architectures", None):
        config.architectures = [_model_class_name(config.model_type)]
    config.save_pretrained(str(files))
    return json.loads((files / "config.json").read_text()), parsed


def _model_class_name(model_type: str) -> str:
    """The class transformers' Auto mapping loads a GGUF of ``model_type`` into: its causal LM
    (a GGUF holds a generative model), else its encoder-decoder, else its bare model."""
    from transformers.models.auto import modeling_auto as m

    for mapping in (m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, m.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                    m.MODEL_MAPPING_NAMES):
        if model_type in mapping:
            return mapping[model_type]
    raise CheckpointError(f"model_type {model_type!r}: transformers has no model class for it")


def _tokenizer(file: Path, files: Path, who: str) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name).save_pretrained(str(files))
    except Exception as exc:  # noqa: BLE001 - converters raise many kinds
        raise CheckpointError(f"{who}: transformers cannot build a tokenizer from {file.name}: "
                              f"{type(exc).__name__}: {exc}") from None


def _mapping(arch: str, config: Dict[str, Any], parsed: Dict[str, Any]) -> Tuple[Any, Dict[str, str], Dict[str, Any]]:
    """(transformers' tensor processor for ``arch``, its GGUF -> transformers name map over an
    empty-weight model of ``config``, that model's state dict of meta tensors)."""
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map


    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed)
    model = empty_model(CONFIG_MAPPING[config["model_type"]].from_dict(dict(config)))
    return processor, get_gguf_hf_weights_map(model, processor), model.state_dict()


def _sources(reader: Any, processor: Any, key_mapping: Dict[str, str], model_state: Dict[str, Any], file: Path,
             who: str) -> Dict[str, List[_Source]]:
    """transformers name -> the GGUF tensors it is made of, in file order. Tensors transformers'
    loader skips (no name in the map) are skipped here too."""
    moe = getattr(processor, "GGUF_MOE_WEIGHTS_PATTERN", None)
    out: Dict[str, List[_Source]] = {}
    for t in reader.tensors:
        target = key_mapping.get(t.name)
        m = moe.fullmatch(t.name) if moe is not None else None
        if m is not None:  # fused by the processor from gate and up (or stored whole: down)
            target = key_mapping.get(m["name"])
        if target is None or target not in model_state:
            continue
        if target in out and m is None:
            raise CheckpointError(f"{who}: {file.name}: tensors {out[target][0].name!r} and {t.name!r} both map to "
                                  f"{target!r}")
        src = _Source(t.name, int(t.tensor_type), int(t.data_offset), int(t.n_bytes), t.data.dtype.str,
                      tuple(int(d) for d in t.data.shape))
        out.setdefault(target, []).append(src)
        numel = int(t.n_elements) if m is None else None
        if numel is not None and numel != model_state[target].numel():
            raise CheckpointError(f"{who}: {file.name}: tensor {t.name!r} has {numel} elements but transformers' "
                                  f"{target!r} has shape {tuple(model_state[target].shape)}")
    return out


def _quantization(reader: Any) -> str:
    """The file's type (``general.file_type``, e.g. ``Q4_K_M``) and its tensors' types with counts."""
    gguf = _gguf()
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    label = None
    ftype = _field(reader, "general.file_type")
    if isinstance(ftype, int):
        try:
            label = gguf.LlamaFileType(ftype).name.replace("MOSTLY_", "")
        except ValueError:
            label = None
    label = label or max((k for k in counts if k not in ("F32",)), key=counts.get, default="F32")
    return f"{label} ({', '.join(f'{k}: {v}' for k, v in counts.most_common())})"


register_checkpoint_kind(is_gguf, GGUFCheckpoint)
