"""The fuzz targets' shared pieces: a byte reader and the optional atheris import.

Every target reads its input through :class:`Input` rather than atheris' FuzzedDataProvider,
so a corpus file means the same thing under the fuzzer and when the pytest replay
(``tests/test_fuzz_corpus.py``) feeds it to ``TestOneInput`` without atheris installed.
"""

from __future__ import annotations

import contextlib
import sys

try:
    import atheris
except ImportError:  # the corpus replay runs without it
    atheris = None


def instrumented(main: bool):
    """``atheris.instrument_imports()`` for ``sfm_core`` when fuzzing (the script is ``__main__``
    and atheris is installed); a no-op context otherwise."""
    if main and atheris is not None:
        return atheris.instrument_imports(include=["sfm_core"])
    return contextlib.nullcontext()


def fuzz(test_one_input) -> None:
    """Run ``test_one_input`` under libFuzzer with the command line's libFuzzer flags."""
    if atheris is None:
        sys.exit("atheris is not installed: pip install -e '.[fuzz]' (or pip install atheris)")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


class Input:
    """Consume a fuzz input from the front; once it runs out every read returns zeros/empties,
    so any byte string is a valid input."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def uint(self, nbytes: int) -> int:
        """A big-endian unsigned integer of ``nbytes`` bytes."""
        value = 0
        for _ in range(nbytes):
            value = (value << 8) | self.byte()
        return value

    def bool(self) -> bool:
        return bool(self.byte() & 1)

    def choice(self, options):
        return options[self.byte() % len(options)]

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def sized(self, max_len: int = 255) -> bytes:
        """A length byte (mod ``max_len + 1``) then that many bytes."""
        return self.take(self.byte() % (max_len + 1))

    def text(self, max_len: int = 32) -> str:
        return self.sized(max_len).decode("utf-8", "replace")

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk
