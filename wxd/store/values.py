"""Column values from WeChat's loosely typed fields: blank text and non-integers become NULL.

Pure, stdlib only; each has a fast path for the usual type (the backfill runs them on 1M rows).
"""

from __future__ import annotations


def nonblank_str(value: object) -> str | None:
    """The value as stripped text, None when it is None or blank (WeChat sends "" for absent
    unionids and scenes)."""
    if type(value) is str:
        return value.strip() or None
    if value is None:
        return None
    return str(value).strip() or None


def int_or_none(value: object) -> int | None:
    """An int, or a str of decimal digits (with an optional "-") as an int; None for anything
    else (bools included)."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None
