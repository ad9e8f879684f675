"""Thousands of malformed frames from several threads; everyone else is still served.

Each case opens a connection, sends its bytes, half-closes, and reads until the
server closes.  Every byte the server sends back must be well-formed reply
frames; nothing may hang; a prober on other connections must get its status
answered during the storm and after it.
"""
from __future__ import annotations

import random
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import msgpack
from admin_helpers import connect, frames, read_all

from actors.admin.client import call
from actors.admin.protocol import COMMANDS, encode_frame

CAP = 4096
THREADS = 6
CASES_PER_THREAD = 500  # 3000 frames in all
ERROR_CODES = {"bad_frame", "bad_request", "unknown_command", "frame_too_large", "not_found"}


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "str", "bytes", "none", "bool", "float"] + (["list", "map"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), rng.randint(-1000, 1000)])
    if kind == "str":
        return rng.choice(["status", "pause", "id", "cmd", "args", "", "\u2603" * rng.randint(1, 5)])
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 8))
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.random() * 1e6
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_value(rng, 4): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def wrong_shape(rng: random.Random):
    base = {"id": rng.randint(1, 99), "cmd": rng.choice(sorted(COMMANDS)), "args": {}}
    key = rng.choice(["id", "cmd", "args", "extra", "drop"])
    if key == "drop":
        base.pop(rng.choice(["id", "cmd"]))
    else:
        base[key] = random_value(rng)
    return base


def make_case(rng: random.Random, kind: int) -> tuple[str, bytes]:
    header = struct.Struct(">I").pack
    if kind == 0:
        return "random", rng.randbytes(rng.randint(1, 64))
    if kind == 1:
        return "huge", header(rng.choice([CAP + 1, 2**31, 2**32 - 1])) + rng.randbytes(16)
    if kind == 2:
        body = msgpack.packb({"id": 1, "cmd": "status", "args": {}})
        return "truncated", header(len(body) + rng.randint(1, 100)) + body[: rng.randint(0, len(body))]
    if kind == 3:
        n = rng.randint(1, 256)
        return "garbage", header(n) + rng.randbytes(n)
    if kind == 4:
        return "shape", encode_frame(wrong_shape(rng))
    if kind == 5:
        return "non-map", encode_frame(random_value(rng))
    if kind == 6:
        body = b"\x91" * rng.randint(100, CAP - 1) + b"\xc0"
        return "nested", header(len(body)) + body
    if kind == 7:
        body = b"\xdf\xff\xff\xff\xff" + rng.randbytes(rng.randint(0, 30))
        return "claims-huge", header(len(body)) + body
    if kind == 8:
        ok = encode_frame({"id": 5, "cmd": "accounts", "args": {}})
        return "valid-then-garbage", ok + rng.randbytes(rng.randint(1, 40))
    frame = bytearray(encode_frame({"id": 1, "cmd": "pause", "args": {"account": "alice"}}))
    for _ in range(rng.randint(1, 4)):
        frame[rng.randrange(len(frame))] = rng.randrange(256)
    return "mutated", bytes(frame)


def run_case(path, label: str, data: bytes) -> list:
    s = connect(path, timeout=10)  # a timeout here means the server hung on us
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may legitimately hang up before reading everything
        replies = frames(read_all(s))
    finally:
        s.close()
    for r in replies:
        assert isinstance(r, dict) and set(r) in ({"id", "ok", "result"}, {"id", "ok", "error"}), (label, r)
        if not r["ok"]:
            assert r["error"]["code"] in ERROR_CODES, (label, r)
            assert isinstance(r["error"]["message"], str)
    if label == "huge":
        assert [r["error"]["code"] for r in replies] == ["frame_too_large"], replies
    if label == "valid-then-garbage" and replies and replies[0]["ok"]:
        assert replies[0]["id"] == 5
    if label == "truncated":
        assert replies == []  # nobody left to answer
    return replies


def fuzz_worker(path, seed: int) -> int:
    rng = random.Random(seed)
    answered = 0
    for i in range(CASES_PER_THREAD):
        label, data = make_case(rng, i % 10)
        answered += bool(run_case(path, label, data))
    return answered


def test_fuzz_thousands_of_bad_frames_while_others_are_served(start_server, daemon):
    srv = start_server(max_frame_bytes=CAP, read_timeout=2.0, max_connections=THREADS + 4)
    done = threading.Event()
    probes: list[bool] = []

    def prober():
        while not done.is_set():
            status = call(srv.path, "status", timeout=10)
            probes.append(status["state"] == "running")

    with ThreadPoolExecutor(THREADS + 1) as pool:
        probe_future = pool.submit(prober)
        workers = [pool.submit(fuzz_worker, srv.path, seed) for seed in range(THREADS)]
        try:
            answered = sum(w.result(timeout=100) for w in workers)
        finally:
            done.set()
        probe_future.result(timeout=20)

    assert len(probes) >= 3 and all(probes), "status went unanswered during the fuzz"
    assert answered > THREADS * CASES_PER_THREAD // 2  # most bad frames got an error reply
    assert call(srv.path, "status", timeout=5)["state"] == "running"
    for cmd, args in daemon.calls:  # nothing malformed reached the daemon
        assert cmd in COMMANDS and isinstance(args, dict) and all(isinstance(k, str) for k in args)
    assert ("accounts", {}) in daemon.calls  # the valid frames before garbage were served
