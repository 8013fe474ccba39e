"""Byte sizes as people write them (config keys and CLI flags share this one parser)."""

from __future__ import annotations

import math

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """'2GB' (10⁹), '2GiB' (2³⁰), or a number of bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().replace(" ", "")
    binary = t.endswith("IB")
    t = t.removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    number = t[:-1] if unit else t
    try:
        value = float(number)
    except ValueError as exc:
        raise ValueError(f"not a size: '{text}' (try 2GB or 512MiB)") from exc
    factor = 1024 ** ("KMGT".index(unit) + 1) if binary and unit else _UNITS[unit]
    if not math.isfinite(value * factor) or value * factor > 2**62:
        raise ValueError(f"not a size: '{text}' (try 2GB or 512MiB)")
    return int(value * factor)
