"""Quantized ingredients: FP8 dequantized while streaming, every other scheme refused by name.

Large community models ship FP8 weights: transformers' ``fp8`` (float8 weights with block-wise
``weight_scale_inv``, ``weight_block_size`` in ``quantization_config``) and compressed-tensors'
float8 (``weight_scale`` per tensor, channel or group). An :class:`FP8Checkpoint` shows each such
weight as the float32 tensor it stands for (``weight * scale``, one tensor at a time, as it is
read) and hides the scales; the merge then runs as for any checkpoint and the output is written in
``dtype=`` (default bfloat16) with no scales and no ``quantization_config``. GPTQ, AWQ,
bitsandbytes and the rest are refused before anything is read: merge their unquantized originals.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open

from .checkpoints import Checkpoint, TensorInfo, register_checkpoint_kind
from .errors import CheckpointError, IncompatibleCheckpointsError
from .limits import MAX_FP8_BLOCK
from .trust import unsafe_reason

__all__ = ["FP8Checkpoint", "quant_method", "check_quantization", "check_scales", "block_size", "is_fp8",
           "dequantized_infos", "dequantize"]

_FP8 = ("fp8", "compressed-tensors")
_SCALES = ("weight_scale_inv", "weight_scale")
_DROPPED = ("input_scale", "activation_scale", "k_scale", "v_scale")  # activation scales: nothing to merge


def quant_method(config: Mapping[str, Any]) -> Optional[str]:
    """The quantization scheme a config.json declares (``quantization_config.quant_method``), or None."""
    q = config.get("quantization_config") if isinstance(config, Mapping) else None  # a bad config.json: named later
    if isinstance(q, Mapping):
        return str(q.get("quant_method")
                   or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else "unknown"))
    return None


def is_fp8(config: Mapping[str, Any]) -> bool:
    return quant_method(config) in _FP8


def check_quantization(name: str, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    """Refuse a quantized model hf_ame cannot dequantize, naming its scheme (before anything is read)."""
    method = quant_method(config)
    if method is None:
        return
    fp8_weights = any(str(i.dtype).startswith("torch.float8") for i in tensors.values())
    if method in _FP8 and (fp8_weights or method == "fp8"):
        check_scales(name, config, tensors)
        return
    raise IncompatibleCheckpointsError(
        f"model {name!r} is quantized ({method}): hf_ame merges full-precision weights and dequantizes only FP8 "
        "(transformers' fp8, compressed-tensors float8); merge its unquantized original instead")


_DEFAULT_BLOCK = [128, 128]  # transformers' FineGrainedFP8Config when weight_block_size is not given


def block_size(name: str, config: Mapping[str, Any]) -> Optional[List[int]]:
    """The tile of transformers' fp8 ``weight_scale_inv`` ([rows, cols]; None: one scale per tensor),
    checked: two whole numbers from 1 to :data:`~hf_ame.limits.MAX_FP8_BLOCK` (a 0 would divide by zero)."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size", _DEFAULT_BLOCK)
    if block is None:
        return None
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_FP8_BLOCK for b in block)):
        raise CheckpointError(f"{name}: config.json's quantization_config.weight_block_size must be two whole numbers "
                              f"from 1 to {MAX_FP8_BLOCK:,} (rows, columns of a scale's tile), got {block!r}")
    return list(block)


def check_scales(name: str, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    """Every FP8 weight's scale has a shape its weight and tile explain, from the headers (a scale of
    another shape would be broadcast wrongly: one entry for every tile)."""
    block = block_size(name, config)
    tiles = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    for weight, scale in dequantized_infos(tensors)[1].items():
        w, sc = tuple(tensors[weight].shape), tuple(tensors[scale].shape)
        ok, need = _tile_scale(w, sc, block) if tiles and scale.endswith("_scale_inv") else _channel_scale(w, sc)
        if not ok:
            raise CheckpointError(f"{name}: tensor {scale!r} has shape {list(sc)}, but its weight {weight!r} of shape "
                                  f"{list(w)} needs {need}")


def _tile_scale(w: Tuple[int, ...], sc: Tuple[int, ...], block: Optional[List[int]]) -> Tuple[bool, str]:
    """transformers' fp8: one scale per tensor without a block size, else one per tile (as its FP8Linear)."""
    if block is None:
        return math.prod(sc) == 1, "one scale (weight_block_size: null)"
    if len(w) != 2:
        return math.prod(sc) == 1, f"one scale (only 2-D weights are read in tiles of {block})"
    grid = (-(-w[0] // block[0]), -(-w[1] // block[1]))
    return sc == grid or (grid == (1, 1) and math.prod(sc) == 1), f"shape {list(grid)} (tiles of {block})"


def _channel_scale(w: Tuple[int, ...], sc: Tuple[int, ...]) -> Tuple[bool, str]:
    """compressed-tensors' float8: per tensor, per channel or per group; never more scales than weights."""
    ok = math.prod(sc) == 1 or (len(w) == 2 and len(sc) == 2 and 1 <= sc[0] <= w[0] and 1 <= sc[1] <= w[1])
    return ok, "one scale, or at most one per entry of a 2-D weight"


def dequantized_infos(tensors: Mapping[str, TensorInfo]) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """The tensors as the merge sees them: float8 weights with a scale as float32, scales and
    activation scales left out; and {weight: its scale's name}."""
    scales: Dict[str, str] = {}
    for n, info in tensors.items():
        if str(info.dtype).startswith("torch.float8"):
            scale = next((f"{n}{s[len('weight'):]}" for s in _SCALES if n.endswith(".weight")
                          and f"{n}{s[len('weight'):]}" in tensors), None)
            if scale is None:
                raise CheckpointError(f"tensor {n!r} is float8 but has no {n}_scale_inv / {n}_scale beside it")
            scales[n] = scale
    hidden = set(scales.values()) | {n for n in tensors if n.rsplit(".", 1)[-1] in _DROPPED}
    out = {n: (dataclasses.replace(i, dtype=torch.float32, offset=-1) if n in scales else i)
           for n, i in tensors.items() if n not in hidden}
    return out, scales


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: Optional[List[int]] = None) -> torch.Tensor:
    """``weight * scale`` in float32: a scale per tensor (one element), per row (rows x 1), per
    group along the columns (rows x groups), or per block (a grid of ``block`` = [rows, cols] tiles,
    the last ones possibly partial), as transformers' FP8 dequantization computes it."""
    w, s = weight.to(torch.float32), scale.to(torch.float32)
    if s.numel() == 1:
        return w * s.reshape(())
    if w.dim() != 2 or s.dim() != 2:
        raise CheckpointError(f"cannot apply a scale of shape {tuple(s.shape)} to a weight of shape {tuple(w.shape)}")
    rows, cols = w.shape
    if s.shape[0] == rows:  # per row, or per row and column group
        return w * s.repeat_interleave(-(-cols // s.shape[1]), dim=1)[:, :cols]
    if rows % s.shape[0] == 0 and cols % s.shape[1] == 0:  # transformers derives the tile from the grid
        br, bc = rows // s.shape[0], cols // s.shape[1]
    else:  # partial last tiles: the config's block size
        br = block[0] if block else -(-rows // s.shape[0])
        bc = block[1] if block else -(-cols // s.shape[1])
    return w * s.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]


class FP8Checkpoint(Checkpoint):
    """A checkpoint of FP8 weights, read as the float32 weights they stand for (see the module
    docstring). Never streamed in blocks: each weight is dequantized whole, one at a time."""

    dequantized = True

    def __init__(self, path: Union[str, Path], name: Optional[str] = None):
        super().__init__(path, name)
        self.raw_tensors = self.tensors
        self.tensors, self.scales = dequantized_infos(self.raw_tensors)
        check_scales(self.name, self.config, self.raw_tensors)
        self.block = block_size(self.name, self.config)
        self.format = "fp8"  # not plain safetensors: no byte-range block reads

    def _read_raw(self, name: str) -> torch.Tensor:
        info = self.raw_tensors[name]
        with safe_open(str(self.path / info.file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def get_tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None or info.file_name not in self.scales:
            return super().get_tensor(name, device)
        raw = info.file_name
        self.bytes_read += self.raw_tensors[raw].nbytes + self.raw_tensors[self.scales[raw]].nbytes
        return dequantize(self._read_raw(raw), self._read_raw(self.scales[raw]), self.block).to(device)

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        return self.get_tensor(name).reshape(-1)[start:end].clone()


def _detect(path: Path) -> bool:
    cfg = path / "config.json"
    if unsafe_reason(path, "config.json") is not None:
        return False  # a link out of the folder or a FIFO: Checkpoint refuses it, naming it
    try:
        return cfg.is_file() and is_fp8(json.loads(cfg.read_text()))
    except ValueError:
        return False


register_checkpoint_kind(_detect, FP8Checkpoint)
