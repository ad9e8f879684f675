"""Framing and request validation, without sockets or threads."""
from __future__ import annotations

import io
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.admin import protocol
from actors.admin.protocol import (
    AdminCommandError,
    FrameError,
    FrameTooLargeError,
    FrameTruncatedError,
    RequestError,
    decode_body,
    encode_frame,
    parse_reply,
    parse_request,
    read_frame,
)


class CountingStream(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n=-1):
        data = super().read(n)
        self.bytes_read += len(data)
        return data


def test_round_trip_is_length_prefixed_msgpack():
    obj = {"id": 7, "cmd": "status", "args": {"x": [1, "two", None, b"\x00"]}}
    data = encode_frame(obj)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert msgpack.unpackb(data[4:], raw=False) == obj
    stream = io.BytesIO(data + data)
    assert read_frame(stream) == obj
    assert read_frame(stream) == obj
    assert read_frame(stream) is None  # clean EOF between frames


def test_encode_converts_paths_sets_and_dataclasses(tmp_path):
    from actors.admin.protocol import Request

    data = encode_frame({"p": tmp_path, "s": {"b", "a"}, "r": Request(1, "status", {})})
    assert read_frame(io.BytesIO(data)) == {
        "p": str(tmp_path), "s": ["a", "b"], "r": {"id": 1, "cmd": "status", "args": {}}}


def test_encode_failure_is_a_frame_error():
    with pytest.raises(FrameError, match="cannot encode"):
        encode_frame({"x": object()})


def test_oversized_frame_is_refused_without_reading_the_body():
    body = msgpack.packb({"id": 1, "cmd": "status", "args": {"pad": "x" * 200}})
    stream = CountingStream(struct.pack(">I", len(body)) + body)
    with pytest.raises(FrameTooLargeError) as info:
        read_frame(stream, max_bytes=100)
    assert info.value.code == "frame_too_large" and info.value.reply
    assert stream.bytes_read == 4


def test_default_cap_is_one_mib():
    assert protocol.MAX_FRAME_BYTES == 1 << 20
    with pytest.raises(FrameTooLargeError):
        read_frame(io.BytesIO(struct.pack(">I", (1 << 20) + 1)))
    read_frame(io.BytesIO(encode_frame("x" * ((1 << 20) - 10))))  # just under: fine


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x00\x00", struct.pack(">I", 10) + b"\x81\xa1"])
def test_truncated_frame(data):
    with pytest.raises(FrameTruncatedError) as info:
        read_frame(io.BytesIO(data))
    assert not info.value.reply  # nobody to answer


@pytest.mark.parametrize("body", [
    b"\xc1",                                  # never-used msgpack byte
    b"\x81\x01",                              # map missing its value
    b"\x91" * 5000 + b"\xc0",                 # nested beyond msgpack's stack
    b"\xdf\xff\xff\xff\xff",                  # map claims 4 G entries
    b"\x81\x81\x01\x02\x03",                  # map as a map key (unhashable)
    b"\xd4\x05\x00",                          # extension type
    msgpack.packb(1) + msgpack.packb(2),      # extra data after the object
])
def test_undecodable_body_is_one_error_type(body):
    with pytest.raises(FrameError) as info:
        read_frame(io.BytesIO(struct.pack(">I", len(body)) + body))
    assert info.value.reply and info.value.code == "bad_frame"


def test_empty_frame_is_an_error():
    with pytest.raises(FrameError):
        read_frame(io.BytesIO(b"\x00\x00\x00\x00"))


def test_parse_valid_request():
    req = parse_request({"id": "a1", "cmd": "pause", "args": {"account": "bob"}})
    assert (req.id, req.cmd, dict(req.args)) == ("a1", "pause", {"account": "bob"})
    assert parse_request({"id": 3, "cmd": "status"}).args == {}


@pytest.mark.parametrize("obj, message, has_id", [
    ([1, 2], "must be a map", False),
    ("status", "must be a map", False),
    ({"cmd": "status", "args": {}}, "'id'", False),
    ({"id": True, "cmd": "status", "args": {}}, "'id'", False),
    ({"id": 1.5, "cmd": "status", "args": {}}, "'id'", False),
    ({"id": "x" * 300, "cmd": "status", "args": {}}, "256", False),
    ({"id": 1, "cmd": 5, "args": {}}, "'cmd'", True),
    ({"id": 1, "cmd": "status", "args": [1]}, "'args'", True),
    ({"id": 1, "cmd": "status", "args": {1: 2}}, "'args'", True),
    ({"id": 1, "cmd": "status", "arg": {}}, "unknown request key", True),
])
def test_wrong_shapes_are_bad_requests(obj, message, has_id):
    with pytest.raises(RequestError, match=message) as info:
        parse_request(obj)
    assert info.value.code == "bad_request"
    assert info.value.request_id == (obj["id"] if has_id else None)


def test_unknown_command_suggests_the_closest():
    with pytest.raises(RequestError) as info:
        parse_request({"id": 9, "cmd": "stauts", "args": {}})
    assert info.value.code == "unknown_command"
    assert "did you mean 'status'?" in info.value.message
    assert info.value.request_id == 9
    with pytest.raises(RequestError, match="unknown command") as info:
        parse_request({"id": 9, "cmd": "zzzzzz", "args": {}})
    assert "did you mean" not in info.value.message


def test_command_set_is_extensible():
    assert parse_request({"id": 1, "cmd": "scan", "args": {}}, commands={"scan"}).cmd == "scan"


def test_parse_reply():
    assert parse_reply(protocol.ok_reply(4, [1])) == (4, [1])
    with pytest.raises(AdminCommandError) as info:
        parse_reply(protocol.error_reply(4, "not_found", "no such account"))
    assert (info.value.code, info.value.message) == ("not_found", "no such account")
    with pytest.raises(FrameError):
        parse_reply({"id": 1})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_only_raises_frame_error(body):
    try:
        decode_body(body)
    except FrameError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_values, st.dictionaries(st.sampled_from(["id", "cmd", "args", "x"]), _values, max_size=4)))
def test_parse_request_of_anything_only_raises_request_error(obj):
    try:
        req = parse_request(obj)
    except RequestError as exc:
        assert exc.code in ("bad_request", "unknown_command")
    else:
        assert req.cmd in protocol.COMMANDS and isinstance(req.args, dict)
