"""Where each tensor is merged: Accelerate device maps over an empty-weight skeleton."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch

from .architecture import empty_model, file_to_model_renamer, model_class_for
from .devices import as_device, check_device, device_lookup
from .errors import DevicePlacementError

__all__ = ["resolve_device_map", "tensor_device_lookup", "load_model"]

_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(
    device_map: Union[None, str, int, torch.device, Mapping[str, Any]],
    config_path: Optional[str] = None,
    *,
    max_memory: Optional[Mapping[Union[int, str], Union[int, str]]] = None,
    dtype: Optional[torch.dtype] = None,
    trust_remote_code: bool = False,
) -> Dict[str, str]:
    """A {module prefix: device} map (Accelerate's format; "" is the whole model).

    ``None`` / ``"cpu"`` -> CPU; a device -> everything there; a dict -> checked and returned;
    ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` -> Accelerate's
    ``infer_auto_device_map`` over an empty-weight skeleton of the architecture (no memory used),
    honouring ``max_memory`` and the model's no-split modules. Without GPUs and without
    ``max_memory``, "auto" is simply the CPU.
    """
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, Mapping):
        out = {}
        for k, v in device_map.items():
            if not isinstance(k, str):
                raise DevicePlacementError(f"device_map: keys are module names (str), got {k!r}")
            out[k] = check_device(v, f"device_map[{k!r}]")
        if not out:
            raise DevicePlacementError("device_map: empty mapping")
        return out
    if isinstance(device_map, str) and device_map in _STRATEGIES:
        if max_memory is None and torch.cuda.device_count() == 0:
            return {"": "cpu"}
        if config_path is None:
            raise DevicePlacementError("device_map='auto' needs the model's config")
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_path, trust_remote_code=trust_remote_code)
        model = empty_model(config, trust_remote_code)
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        mm = dict(max_memory) if max_memory is not None else None
        if mm is not None:
            for k in mm:
                check_device(k, f"max_memory[{k!r}]")
        if device_map != "sequential" and torch.cuda.device_count() > 1:
            mm = get_balanced_memory(model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
        dm = infer_auto_device_map(model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype)
        return {k: check_device(v, f"device_map[{k!r}]") for k, v in dm.items()}
    return {"": check_device(device_map, "device_map")}


def tensor_device_lookup(device_map: Mapping[str, str], config_path: Optional[str] = None,
                         trust_remote_code: bool = False):
    """name-in-file -> device for the engine: the longest module prefix of the in-memory name."""
    if len(set(device_map.values())) <= 1:
        dev = as_device(next(iter(device_map.values())))
        return lambda name: dev
    rename = lambda n: n  # noqa: E731
    if config_path is not None:
        from transformers import AutoConfig

        model = empty_model(AutoConfig.from_pretrained(config_path, trust_remote_code=trust_remote_code),
                            trust_remote_code)
        rename = file_to_model_renamer(model)
    lookup = device_lookup(dict(device_map))
    return lambda name: lookup(rename(name))


def load_model(path, device_map: Optional[Mapping[str, str]] = None, *, dtype: Any = None,
               trust_remote_code: bool = False):
    """``from_pretrained`` of the architecture named in ``path``'s config, placed by ``device_map``."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = model_class_for(cfg, trust_remote_code)
    dm: Any = dict(device_map) if device_map else None
    if dm is not None and set(dm.values()) <= {"cpu", "disk"}:
        dm = None  # plain CPU load; nothing to dispatch
    kwargs: Dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return cls.from_pretrained(path, device_map=dm, **kwargs).eval()
