"""Typed driver parameters: connector params come from URL queries (strings) or from code.

:func:`convert` is the one conversion every parameter goes through (see also
:mod:`sfm_core.driver_params`, where drivers declare theirs): a string from a URL query, or a
typed value from code or a TOML file, to ``bool``, ``int``, ``float`` or ``str``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from .errors import CommError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def convert(value: Any, kind: type) -> Any:
    """``value`` as a ``kind`` (``bool``, ``int``, ``float``, ``str``), or ``ValueError``.

    Strings (URL queries) are stripped; bools are ``1/true/yes/on`` and ``0/false/no/off/''``
    (any case), or the ints 0 and 1. An int is an integer (``"8"``, ``8``, ``8.0``, ``"64e6"``),
    never a bool or a fraction; a float is a finite number (not a bool, ``nan`` or ``inf``); a
    str is a string or a path (``os.PathLike``).
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        elif isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                value = float(text)  # "64e6"; raises ValueError for anything else
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (int, float)):
            converted = float(value)
        elif isinstance(value, str):
            converted = float(value.strip())
        else:
            raise ValueError(value)
        if not math.isfinite(converted):
            raise ValueError(value)
        return converted
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ValueError(value)
    return kind(value)


def get_param(
    params: Mapping[str, Any], key: str, kind: type, default: Any, *, driver: str, minimum: float | None = None
) -> Any:
    """``params[key]`` converted to ``kind`` with :func:`convert` (``default`` when absent or None).

    Raises ``CommError(BAD_CONFIG)`` naming the driver, the parameter and its value when the
    value does not convert or is below ``minimum``.
    """
    value = params.get(key)
    if value is None:
        return default
    try:
        converted = convert(value, kind)
    except (TypeError, ValueError, OverflowError):
        raise CommError(CommError.BAD_CONFIG, f"{driver}: parameter {key}={value!r} is not a {kind.__name__}") from None
    if minimum is not None and converted < minimum:
        raise CommError(CommError.BAD_CONFIG, f"{driver}: parameter {key}={value!r} must be at least {minimum}")
    return converted
