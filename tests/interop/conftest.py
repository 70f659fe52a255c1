"""Fixtures for interoperability tests against a real NVFlare endpoint.

* ``nvflare_python`` (session): python of the nvflare==2.9.0 venv, built on first
  use (see ``nvflare_env.py``).  Skipped only when ``SFM_SKIP_NVFLARE=1``; a
  failure to build the venv is an error.
* ``nvflare_peer_factory``: ``factory(name, **kwargs) -> NvflarePeer`` (kwargs as
  for ``NvflarePeer``); every peer made is closed at teardown.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:  # robust against --import-mode=importlib
    sys.path.insert(0, _HERE)

from nvflare_env import ensure_nvflare_venv  # noqa: E402
from peer import NvflarePeer  # noqa: E402


@pytest.fixture(scope="session")
def nvflare_python() -> pathlib.Path:
    if os.environ.get("SFM_SKIP_NVFLARE") == "1":
        pytest.skip("SFM_SKIP_NVFLARE=1: NVFlare interop tests skipped")
    return ensure_nvflare_venv()  # RuntimeError here is a test error, on purpose


@pytest.fixture
def nvflare_peer_factory(nvflare_python):
    peers: list[NvflarePeer] = []

    def make(name: str, **kwargs) -> NvflarePeer:
        kwargs.setdefault("python", nvflare_python)
        p = NvflarePeer(name, **kwargs)
        peers.append(p)
        return p

    yield make

    errors = []
    for p in reversed(peers):
        try:
            p.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"{p!r}: {e}")
    if errors:
        raise RuntimeError("closing nvflare peers failed:\n" + "\n".join(errors))
