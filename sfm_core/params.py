"""Typed driver parameters: connector params come from URL queries (strings) or from code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CommError

_FALSE = ("0", "false", "no", "off", "")


def get_param(
    params: Mapping[str, Any], key: str, kind: type, default: Any, *, driver: str, minimum: float | None = None
) -> Any:
    """``params[key]`` converted to ``kind`` (``default`` when absent).

    Raises ``CommError(BAD_CONFIG)`` naming the driver, the parameter and its value when the
    value does not convert or is below ``minimum``.
    """
    value = params.get(key, default)
    try:
        if kind is bool and isinstance(value, str):
            converted = value.strip().lower() not in _FALSE
        else:
            converted = kind(value)
    except (TypeError, ValueError):
        raise CommError(CommError.BAD_CONFIG, f"{driver}: parameter {key}={value!r} is not a {kind.__name__}") from None
    if minimum is not None and converted < minimum:
        raise CommError(CommError.BAD_CONFIG, f"{driver}: parameter {key}={value!r} must be at least {minimum}")
    return converted
