"""Write the seed corpus: a few valid inputs per target into fuzz/corpus/<target>/seed-*.

Run: ``python fuzz/make_corpus.py`` (the files are checked in; run it again after changing how
a target reads its input, and check the replay test still passes). Each seed is the target's
mode byte(s) followed by what that mode reads (see the targets' docstrings); frames are made
with the codec's own encoder. Crash regressions (``crash-*``) in the same folders are not
touched.
"""

from __future__ import annotations

import os
import struct
import sys

import msgpack

from sfm_core.frames import FrameType, encode_frame
from sfm_core.handshake import build_handshake

HERE = os.path.dirname(os.path.abspath(__file__))
TS = 1_700_000_000.25


def frame(ftype: int, payload=None, headers=None, app_id: int = 0, stream_id: int = 1, sequence: int = 1) -> bytes:
    return b"".join(encode_frame(ftype, app_id, stream_id, headers, payload, sequence=sequence))


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


HELLO = frame(FrameType.HELLO, build_handshake("site-1", {"role": "client"}, ["frame-limit"], TS, 1 << 20))
READY = frame(FrameType.READY, build_handshake("server", {"role": "srv"}, ["frame-limit"], TS, 4096))
DATA = frame(FrameType.DATA, b"payload" * 3, {"topic": "t", "n": 7}, app_id=1, stream_id=17, sequence=2)
PING = frame(FrameType.PING, b"\xc0", sequence=3)

# fuzz_frames: mode 0 decode (then the max-size byte: odd = the protocol's maximum), 1 headers,
# 2 stream (max-size, first-frame limit, buffers, feed, chunk count and sizes), 3 encode.
FRAMES = {
    "decode-hello": b"\x00\x01" + HELLO,
    "decode-data": b"\x00\x01" + DATA,
    "decode-ping-small-limit": b"\x00\x00\x04" + PING,  # max-size byte even: the next picks 300
    "headers-map": b"\x01" + msgpack.packb({"topic": "t", "n": 7, "b": b"\x00", "l": [1.5, None]}),
    # default limits, handshake first-frame limit, default buffers, get_buffer, chunks of 1, 5, 16
    "stream-chunked": b"\x02\x00\x01\x00\x01\x03\x01\x05\x10" + HELLO + DATA + PING,
    # tiny buffers (64/16/8) so DATA gets its own buffer, one chunk size of 3 bytes
    "stream-large-frame": b"\x02\x00\x00\x02\x01\x01\x03" + DATA + PING + DATA[:20],
    # feed() in 7-byte chunks
    "stream-feed": b"\x02\x00\x00\x00\x00\x01\x07" + PING + DATA,
    # type DATA, flags 0, app 1, stream 17, sequence 70000 (masked), max 0 (the maximum),
    # headers kind 3 (three generated keys), payload of 5 bytes twice as a list
    "encode-data": b"\x03\x01\x00\x00\x00\x01\x00\x00\x11\x01\x11\x70\x00\x03"
    + b"\x01k\x00\x00\x00\x00\x07"
    + b"\x01s\x01\x03abc"
    + b"\x01b\x04"
    + b"\x05hello\x01\x04\x02",
}

# fuzz_handshake: mode 0 raw payload, 1 built map, 2 endpoint name.
HANDSHAKE = {
    "raw-hello": b"\x00" + build_handshake("site-1", {"role": "client"}, ["frame-limit"], TS, 1 << 20),
    "raw-ready-plain": b"\x00" + build_handshake("client", None, [], TS),
    "raw-ping": b"\x00\xc0",
    # flags 0x7d: a name from the list (site-1), a float timestamp, an sfm_ext list (frame-limit,
    # compression), a listed limit (1 MiB), one more property
    "map-frame-limit": b"\x01\x7d\x00" + b"\x05" + b"\x00" * 8 + b"\x02\x00\x01" + b"\x05" + b"\x01\x01x\x06",
    "name-dotted": b"\x02site-1.region_2.a~b",
    "name-repeated": b"\x02a.b.a",
}

# fuzz_session: active?, max size, interval, dead_after, handshake timeout, extensions; then
# steps (op byte >> 4: 0-7 a received frame of kind op % 8, 8-9 tick, 10 heard/progressed/adopt,
# 11 initiate, 12 accept, 13 data_frame, 14 begin_close/refuse, 15 connection_lost).
_PASSIVE = b"\x00\x00\x00\x01\x00\x02"
_ACTIVE = b"\x01\x00\x00\x01\x00\x02"
_HELLO_STEP = b"\x00" + b"\x00\x01\x00\x00" + u16(1)  # site-1, frame-limit, no limit, no properties
_READY_STEP = b"\x01" + b"\x01\x01\x04\x01\x07" + u16(1)  # server, frame-limit, 4096, properties
_DATA_STEP = b"\x02" + b"\x01\x02hi" + b"\x03xyz\x01" + u16(1) + u16(17)
_PING_STEP = b"\x03\x00" + u16(5)
_PONG_STEP = b"\x04\x00" + u16(5)
_TICK_10S = b"\x80\x05"
_TICK_HUGE = b"\x80\x08"
_SEND = b"\xd0\x02\x02" + u16(100) + u16(1) + u16(17)  # data_frame: {"k": 2}, 100 bytes
SESSION = {
    "passive-open": _PASSIVE + _HELLO_STEP + b"\xc0" + _DATA_STEP + _SEND + _PING_STEP + _TICK_10S + _PONG_STEP,
    "passive-close": _PASSIVE + _HELLO_STEP + b"\xc0" + _SEND + b"\xe0" + _DATA_STEP + b"\xf0" + _PING_STEP + _SEND,
    "passive-refuse": _PASSIVE + _HELLO_STEP + b"\xe1" + _HELLO_STEP + b"\xc0",
    "active-open": _ACTIVE + b"\xb0" + _READY_STEP + _SEND + _TICK_10S + _PING_STEP + _TICK_HUGE + _SEND,
    "active-garbage": _ACTIVE + b"\xb0" + b"\x07\x10" + b"\x00" * 16 + _READY_STEP,
    "passive-adopt": _PASSIVE + b"\xa2" + b"\x00\x01\x04\x00" + u16(1) + _SEND + _PING_STEP,
}


def main() -> int:
    for target, seeds in (("frames", FRAMES), ("handshake", HANDSHAKE), ("session", SESSION)):
        folder = os.path.join(HERE, "corpus", target)
        os.makedirs(folder, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(folder, f"seed-{name}"), "wb") as f:
                f.write(data)
        print(f"{folder}: {len(seeds)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
