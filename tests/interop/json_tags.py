"""JSON with tags for what JSON lacks (bytes, dicts with non-str keys): the language both
sides of the NVFlare peer harness speak. Standard library only: it is imported by
``nvflare_peer.py`` inside NVFlare's own virtualenv as well as by ``peer.py`` in ours.
"""

from __future__ import annotations

import base64
from typing import Any

TAGS = ("__bytes__", "__dict__", "__repr__")


def to_json(v: Any, *, strict: bool = True) -> Any:
    """Encode ``v``; an unencodable value raises (``strict``) or becomes ``{"__repr__": ...}``."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, (list, tuple)):
        return [to_json(x, strict=strict) for x in v]
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v) and not (len(v) == 1 and next(iter(v)) in TAGS):
            return {k: to_json(x, strict=strict) for k, x in v.items()}
        return {"__dict__": [[to_json(k, strict=strict), to_json(x, strict=strict)] for k, x in v.items()]}
    if strict:
        raise TypeError(f"cannot encode {type(v).__name__} for the nvflare peer")
    return {"__repr__": repr(v)}


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def from_json(v: Any, *, strict: bool = True) -> Any:
    """Decode tags; a ``{"__repr__": ...}`` raises (``strict``) or is kept as it is."""
    if isinstance(v, list):
        return [from_json(x, strict=strict) for x in v]
    if isinstance(v, dict):
        if len(v) == 1:
            ((k, x),) = v.items()
            if k == "__bytes__":
                return base64.b64decode(x)
            if k == "__dict__":
                return {_hashable(from_json(a, strict=strict)): from_json(b, strict=strict) for a, b in x}
            if k == "__repr__":
                if strict:
                    raise ValueError(f"cannot decode {{'__repr__': {x!r}}}")
                return v
        return {k: from_json(x, strict=strict) for k, x in v.items()}
    return v
