"""Command-line values shared by the CLI's subcommands: ``KEY=VALUE`` flags read as JSON where they parse."""
from __future__ import annotations

import json
from typing import Any, Dict, List

__all__ = ["parse_value", "key_values"]


def parse_value(text: str) -> Any:
    """``text`` as JSON (numbers, lists, true/false) when it parses, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def key_values(items: List[str], flag: str = "--opt") -> Dict[str, Any]:
    """``["k=v", ...]`` of a repeatable ``flag`` as a dict; a malformed item ends the program naming ``flag``."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"hf-ame: {flag} expects KEY=VALUE (e.g. {flag} betas=[0.9,0.999]), got {item!r}")
        out[key] = parse_value(value)
    return out
