"""Device names, device maps and free memory: written once, used by placement, plan and executor."""
from __future__ import annotations

import os
from typing import Callable, Dict, Mapping, Union

import torch

from .errors import DevicePlacementError

__all__ = ["DeviceMap", "as_device", "check_device", "device_lookup", "available_memory", "fits_on_gpus"]

DeviceMap = Union[None, str, torch.device, Mapping[str, Union[str, int, torch.device]],
                  Callable[[str], Union[str, torch.device]]]


def as_device(v: Union[str, int, torch.device]) -> torch.device:
    """A device-map value as a torch device: an int is a CUDA index; Accelerate's offload targets
    ("disk", "meta") are merged on the CPU."""
    if isinstance(v, int) and not isinstance(v, bool):
        return torch.device("cuda", v)
    if v in ("disk", "meta"):
        return torch.device("cpu")
    return torch.device(v)


def check_device(dev: Union[str, int, torch.device], where: str = "device_map") -> str:
    """Normalise a device name and check that it exists on this machine."""
    if isinstance(dev, int) and not isinstance(dev, bool):
        dev = f"cuda:{dev}"
    name = str(dev)
    if name in ("cpu", "disk", "meta"):
        return name
    try:
        d = torch.device(name)
    except (RuntimeError, TypeError):
        raise DevicePlacementError(f"{where}: {name!r} is not a device name") from None
    if d.type == "cuda":
        n = torch.cuda.device_count()
        idx = 0 if d.index is None else d.index
        if idx >= n:
            raise DevicePlacementError(
                f"{where}: {name!r} is not available: torch sees {n} CUDA device(s)"
                + (" (CPU-only torch build?)" if n == 0 else "")
            )
        return f"cuda:{idx}"
    if d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DevicePlacementError(f"{where}: 'mps' is not available on this machine")
    return str(d)


def device_lookup(device_map: DeviceMap) -> Callable[[str], torch.device]:
    """Turn a device map into name -> device. A mapping is keyed by module prefixes, as
    Accelerate's device maps are ("" = whole model); the longest matching prefix wins."""
    if device_map is None:
        return lambda name: torch.device("cpu")
    if callable(device_map) and not isinstance(device_map, Mapping):
        return lambda name: torch.device(device_map(name))  # type: ignore[misc]
    if isinstance(device_map, (str, torch.device, int)):
        dev = as_device(device_map)
        return lambda name: dev
    prefixes = sorted(((k, as_device(v)) for k, v in device_map.items()), key=lambda kv: -len(kv[0]))
    counts: Dict[torch.device, int] = {}
    for _, dev in prefixes:
        counts[dev] = counts.get(dev, 0) + 1
    # A tensor whose name matches no module (a file name that differs from the in-memory name)
    # goes to the device holding most modules.
    fallback = max(counts, key=lambda d: counts[d]) if counts else torch.device("cpu")

    def lookup(name: str) -> torch.device:
        for prefix, dev in prefixes:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                return dev
        return fallback

    return lookup


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable; a conservative guess elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def fits_on_gpus(nbytes: int) -> bool:
    """Whether ``nbytes`` fit in half the free memory of the least free visible GPU."""
    if not torch.cuda.is_available():
        return False
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return nbytes <= free // 2
