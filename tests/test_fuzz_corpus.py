"""Replay the fuzz corpus (fuzz/corpus/<target>/*) through each target's TestOneInput.

The seeds and every crash kept as a regression file run here on every test run, without
atheris (docs/fuzzing.md): a target's checks raise AssertionError or the unexpected exception
itself, so a regression fails this test with the input's name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = ("frames", "handshake", "session")


def _load(target: str):
    path = FUZZ / f"fuzz_{target}.py"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    name = f"_sfm_fuzz_{target}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # An ImportError fails the replay: a renamed sfm_core name must not skip the regressions.
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _cases():
    for target in TARGETS:
        for path in sorted((FUZZ / "corpus" / target).glob("*")):
            if path.is_file():
                yield pytest.param(target, path, id=f"{target}/{path.name}")


CASES = list(_cases())


@pytest.mark.parametrize(("target", "path"), CASES)
def test_corpus_input(target: str, path: Path) -> None:
    _load(target).TestOneInput(path.read_bytes())


def test_every_target_has_seeds() -> None:
    for target in TARGETS:
        assert any(case.values[0] == target for case in CASES), f"no corpus files in fuzz/corpus/{target}"


def test_replay_needs_no_atheris() -> None:
    """The targets import (and TestOneInput runs) with atheris hidden."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "atheris" or k.startswith("atheris.")}
    saved.update({k: sys.modules.pop(k) for k in list(sys.modules) if k == "fuzzinput"})
    sys.modules["atheris"] = None  # import atheris raises ImportError
    try:
        spec = importlib.util.spec_from_file_location("_sfm_fuzz_noatheris", FUZZ / "fuzz_frames.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.TestOneInput(b"\x00\x01" + b"\x00\x00\x00\x10" + b"\x00" * 12)
    finally:
        del sys.modules["atheris"]
        sys.modules.pop("fuzzinput", None)
        sys.modules.update(saved)
