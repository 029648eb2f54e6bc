"""The frame decoder: the same messages and the same limits however the bytes arrive.

A read that holds exactly one message is decoded whole, anything else by the
streaming parser; the two must not differ in what they accept or in how they
count the bytes of an unfinished frame.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from khod.errors import Errno
from khod.protocol import BadRequest, Decoder, FrameError, Limits, encode, parse_request

values = st.recursive(
    st.none() | st.booleans() | st.integers(0, 2**64 - 1) | st.text(max_size=20) | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
messages = st.dictionaries(st.text(max_size=8), values, max_size=6)


@given(st.lists(messages, min_size=1, max_size=8), st.data())
def test_any_split_gives_the_same_messages(msgs: list[dict[str, Any]], data: Any) -> None:
    frames = [encode(m) for m in msgs]
    stream = b"".join(frames)
    cuts = sorted(
        data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)) if len(stream) > 1 else []
    )
    ends = {sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))}
    decoder, got, at = Decoder(), [], 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[at:cut])
        at = cut
        last_end = max((e for e in ends if e <= at), default=0)
        assert decoder.pending == at - last_end  # the bytes of the unfinished frame, no more
    assert got == msgs


def test_whole_messages_then_split_ones_count_from_the_right_place() -> None:
    lim = Limits(max_frame=4096)
    decoder = Decoder(lim)
    small = encode({"id": 1, "op": "ping"})
    near = encode({"id": 2, "op": "ping", "pad": b"x" * 4000})  # just under the limit
    assert decoder.feed(small) == [{"id": 1, "op": "ping"}]  # decoded whole
    assert decoder.feed(near[:100]) == [] and decoder.pending == 100
    assert decoder.feed(near[100:]) == [msgpack.unpackb(near)]
    assert decoder.pending == 0
    assert decoder.feed(small + small) == [{"id": 1, "op": "ping"}] * 2  # two in one read
    assert decoder.feed(small) == [{"id": 1, "op": "ping"}]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",  # never valid msgpack
        encode({"id": 1, "list": list(range(17))}),  # an array over the limit
        encode({str(i): i for i in range(9)}),  # a map over the limit
        encode({"id": 1, "pad": b"x" * 5000}),  # a frame over the limit
        b"\x81\xa2id\xa2\xff\xfe",  # a str that is not UTF-8
        b"\x81\xa2id\xc7\x01\x05x",  # an ext type with a payload
    ],
    ids=["invalid", "array", "map", "frame", "utf8", "ext"],
)
def test_limits_hold_whole_or_split(frame: bytes, split: bool) -> None:
    decoder = Decoder(Limits(max_frame=4096, max_array=16, max_map=8))
    pieces = [frame[: len(frame) // 2], frame[len(frame) // 2 :]] if split else [frame]

    def feed_all() -> None:
        for piece in pieces:
            decoder.feed(piece)

    with pytest.raises(FrameError):
        feed_all()


def test_a_frame_of_exactly_the_limit_is_taken_whole() -> None:
    pad = 4096 - len(encode({"pad": b""})) - 1  # a bin16 header is a byte longer than bin8's
    frame = encode({"pad": b"x" * pad})
    assert len(frame) == 4096
    assert Decoder(Limits(max_frame=4096)).feed(frame) == [{"pad": b"x" * pad}]
    with pytest.raises(FrameError):
        Decoder(Limits(max_frame=4095)).feed(frame)


@pytest.mark.parametrize(
    ("message", "req_id", "text"),
    [
        ([1], None, "must be a map, got list"),
        ({"op": "ping"}, None, "integer 'id'"),
        ({"id": True, "op": "ping"}, None, "integer 'id'"),
        ({"id": 3}, 3, "string 'op'"),
        ({"id": 4, "op": "ping", 5: 1}, 4, "map keys must be strings, got int"),
        ({"id": 6, "op": "ping", None: 1}, 6, "map keys must be strings, got NoneType"),
    ],
)
def test_envelope_errors(message: Any, req_id: int | None, text: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_request(message)
    assert e.value.code is Errno.EPROTO and e.value.req_id == req_id and text in e.value.message


def test_a_request_without_its_envelope() -> None:
    req = parse_request({"id": 7, "op": "preserve_folio", "phys": 4096, "order": None})
    assert (req.id, req.op, req.args) == (7, "preserve_folio", {"phys": 4096, "order": None})
