"""The sim socket's frames (map + raw payload) and the save-part requests both
sides serialize by hand: same bytes as Telethon, parts never joined or copied."""
from __future__ import annotations

import asyncio
import os
import socket
import struct

import msgpack
import pytest
from telethon.tl import functions

from actors.telegram.sim import remote
from actors.telegram.sim.handlers_upload import decode_part_request, part_request_chunks
from actors.telegram.sim.remote import FrameConnection, FrameError, FrameReader, encode_frame, frame_pieces

KIB = 1024


def feed(reader: FrameReader, stream: bytes, step: int) -> list[tuple[dict, bytes]]:
    """Push ``stream`` through ``reader`` at most ``step`` bytes per receive."""
    got, pos = [], 0
    while pos < len(stream):
        view = reader.get_buffer()
        assert len(view) > 0
        n = min(len(view), step, len(stream) - pos)
        view[:n] = stream[pos:pos + n]
        pos += n
        reader.buffer_updated(n)
        got.extend((message, bytes(payload)) for message, payload in reader.frames())
    reader.eof()
    return got


FRAMES = [({"op": "ping", "id": 1}, b""),
          ({"op": "invoke", "id": 2, "name": "SaveBigFilePartRequest"}, os.urandom(512 * KIB + 24)),
          ({"id": 3, "ok": True}, b"\x01\x02\x03\x04"),
          ({"op": "invoke", "id": 4}, os.urandom(3 * 1024 * KIB)),    # larger than the reader's buffer
          ({"id": 5, "ok": False, "code": 400, "message": "FILE_PART_EMPTY"}, b"")]


@pytest.mark.parametrize("step", [4096, 300 * KIB, 1 << 30])
def test_frames_come_out_whole_however_the_stream_is_cut(step):
    stream = b"".join(b"".join(frame_pieces(m, (p,) if p else ())) for m, p in FRAMES)
    assert feed(FrameReader(buffer_bytes=1024 * KIB), stream, step) == FRAMES


@pytest.mark.parametrize("step", [1, 3])
def test_small_frames_cut_at_every_byte(step):
    frames = [({"id": i, "ok": True}, os.urandom(i * 7)) for i in range(12)]
    stream = b"".join(b"".join(frame_pieces(m, (p,) if p else ())) for m, p in frames)
    assert feed(FrameReader(buffer_bytes=64), stream, step) == frames


def test_a_large_payload_is_sent_as_its_own_piece_and_a_small_one_joined():
    part = os.urandom(512 * KIB)
    head, piece = frame_pieces({"id": 1}, (part,))
    assert piece is part                                       # not copied
    (length,) = struct.unpack(">I", head[:4])
    assert msgpack.unpackb(head[4:4 + length]) == {"id": 1, "raw": len(part)}
    [one] = frame_pieces({"id": 1}, (b"abc",))
    assert one == encode_frame({"id": 1}, b"abc") and one.endswith(b"abc")


def test_a_frame_over_the_cap_or_with_a_bad_payload_length_is_refused():
    with pytest.raises(FrameError, match="exceeds"):
        feed(FrameReader(max_bytes=1000), struct.pack(">I", 1001), 4)
    with pytest.raises(FrameError, match="exceeds"):   # the map is small, map + payload is not
        feed(FrameReader(max_bytes=1000), encode_frame({"id": 1}, b"x" * 1000), 1 << 20)
    for raw in (-1, "12", 1.5):
        body = msgpack.packb({"id": 1, "raw": raw})
        with pytest.raises(FrameError, match="payload length"):
            feed(FrameReader(), struct.pack(">I", len(body)) + body, 1 << 20)
    with pytest.raises(FrameError, match="undecodable"):
        feed(FrameReader(), b"\x00\x00\x00\x01\xc1", 5)
    with pytest.raises(FrameError, match="not a map"):
        feed(FrameReader(), struct.pack(">I", 2) + msgpack.packb([1]), 8)


def test_a_stream_ending_inside_a_frame_is_truncated():
    frame = encode_frame({"id": 1}, b"payload")
    with pytest.raises(FrameError, match="truncated frame header"):
        feed(FrameReader(), frame[:3], 3)
    with pytest.raises(FrameError, match="truncated frame"):
        feed(FrameReader(), frame[:-1], 1 << 20)


@pytest.mark.parametrize("size", [1, 3, 4, 253, 254, 255, 1023, 128 * KIB, 512 * KIB - 1, 512 * KIB])
def test_save_part_chunks_are_telethons_bytes_and_decode_without_copy(size):
    data = os.urandom(size)
    for request in (functions.upload.SaveBigFilePartRequest(-1234567890123, 7, 99, data),
                    functions.upload.SaveFilePartRequest(42, 3, data)):
        chunks = part_request_chunks(request)
        assert any(c is data for c in chunks)                  # the part itself is not copied
        wire = b"".join(chunks)
        assert wire == bytes(request)
        decoded = decode_part_request(memoryview(wire))
        assert type(decoded) is type(request) and decoded.to_dict() | {"bytes": None} == \
            request.to_dict() | {"bytes": None}
        assert isinstance(decoded.bytes, memoryview) and decoded.bytes == data
        assert decode_part_request(wire[:len(wire) - len(data) // 2 - 1]) is None   # cut short: not ours to judge


def test_other_requests_are_left_to_telethon():
    assert part_request_chunks(functions.upload.SaveFilePartRequest(1, 0, "text")) is None
    assert part_request_chunks(functions.help.GetConfigRequest()) is None
    assert decode_part_request(bytes(functions.help.GetConfigRequest())) is None
    assert decode_part_request(b"") is None


def test_connection_queues_what_the_socket_does_not_take_and_sends_it_in_order():
    """A peer that does not read: frames queue as views (no copy), drain waits, and
    everything arrives in order once it reads."""
    async def run():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        got: list = []
        done = asyncio.get_running_loop().create_future()

        def on_frame(_conn, message, payload):
            got.append((message["id"], bytes(payload)))
            if len(got) == 40 and not done.done():
                done.set_result(None)

        sender = FrameConnection(a, lambda *_: None, lambda *_: None)
        parts = [os.urandom(512 * KIB) for _ in range(40)]
        for i, part in enumerate(parts):
            sender.send({"id": i}, (part,))
        assert sender._queued > 0                        # more than the socket buffers took
        receiver = FrameConnection(b, on_frame, lambda *_: None)
        await sender.drain()
        await asyncio.wait_for(done, 30)
        assert got == list(enumerate(parts))
        sender.close()
        receiver.close()

    asyncio.run(run())


def test_connection_reports_a_bad_frame_and_can_still_answer_it():
    async def run():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lost = []

        def on_lost(conn, exc):
            lost.append(exc)
            conn.send({"id": None, "ok": False, "message": str(exc)})

        FrameConnection(b, lambda *_: None, on_lost)
        a.sendall(struct.pack(">I", remote.MAX_FRAME_BYTES + 1))
        a.setblocking(False)
        loop = asyncio.get_running_loop()
        reply = await asyncio.wait_for(loop.sock_recv(a, 1 << 16), 10)
        assert isinstance(lost[0], FrameError)
        assert b"exceeds" in reply
        assert await asyncio.wait_for(loop.sock_recv(a, 1 << 16), 10) == b""   # then closed
        a.close()

    asyncio.run(run())
