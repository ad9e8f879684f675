"""The standalone simulated Telegram under real Telethon calls, over its Unix socket."""
from __future__ import annotations

import asyncio
import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from telethon import errors

from actors.telegram.sim.client import make_sim_client
from actors.telegram.sim.remote import RemoteTransport, SimControl
from actors.telegram.sim.seed import seed_world
from actors.telegram.sim.server import SimServer, SimServerError

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def payload(size: int, salt: int = 0) -> bytes:
    return bytes((i * 31 + salt) & 0xFF for i in range(256)) * (size // 256) + b"t" * (size % 256)


def named(data: bytes, name: str) -> io.BytesIO:
    stream = io.BytesIO(data)
    stream.name = name  # Telethon takes the file name from the stream
    return stream


def start_process(state_dir: Path) -> subprocess.Popen:
    """``python -m actors.telegram.sim.cli serve --dir DIR``, returned once it answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors.telegram.sim.cli", "serve", "--dir", str(state_dir)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    control = SimControl(state_dir / "sim.sock", timeout=5)
    deadline = time.monotonic() + 30
    while not control.is_running():
        if proc.poll() is not None:
            raise AssertionError(f"sim server exited {proc.returncode}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("sim server did not answer within 30 s")
        time.sleep(0.05)  # polling another process's socket, not a thread
    return proc


@pytest.fixture
def sim_dir(tmp_path):
    return tmp_path / "sim"


@pytest.fixture
def sim_process(sim_dir):
    procs = []

    def start() -> subprocess.Popen:
        procs.append(start_process(sim_dir))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
def threaded_server(sim_dir):
    server = SimServer(sim_dir).start_in_thread()
    seed_world(SimControl(server.socket_path), sim_dir / "sessions")
    yield server
    server.stop_thread()


def client_for(sim_dir: Path, name: str):
    sock = sim_dir / "sim.sock"
    client = make_sim_client(str(sim_dir / "sessions" / f"{name}.session"), lambda: RemoteTransport(sock))
    client.flood_sleep_threshold = 0
    return client


def test_process_serves_telethon_and_keeps_state_across_sigkill(sim_dir, sim_process):
    proc = sim_process()
    sock = sim_dir / "sim.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert int((sim_dir / "sim.pid").read_text()) == proc.pid
    summary = SimControl(sock).seed(sim_dir / "sessions")
    assert {a["name"] for a in summary["accounts"] if a["session"]} == {"alice", "bob", "carol"}
    data = payload(3 * MIB + 12345)

    async def upload() -> int:
        client = client_for(sim_dir, "alice")
        await client.connect()
        try:
            me = await client.get_me()
            assert me.username == "alice" and not me.premium
            titles = {d.name for d in await client.get_dialogs()}
            assert {"Sim Source A", "Sim Forum", "Stash Archive"} <= titles
            assert "Sim Source B" not in titles
            message = await client.send_file("stash_archive", named(data, "roundtrip.bin"),
                                             caption="roundtrip", force_document=True)
            assert await client.download_media(message, file=bytes) == data
            return message.id
        finally:
            await client.disconnect()

    msg_id = asyncio.run(upload())
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    sim_process()  # same dir: the stale socket is replaced, state reloaded

    async def download_again() -> None:
        client = client_for(sim_dir, "alice")
        await client.connect()
        try:
            channel = await client.get_entity("stash_archive")
            (message,) = await client.get_messages(channel, ids=[msg_id])
            assert message is not None and message.message == "roundtrip"
            assert message.file.name == "roundtrip.bin"
            assert await client.download_media(message, file=bytes) == data
        finally:
            await client.disconnect()

    asyncio.run(download_again())


def test_sigterm_stops_gracefully_and_removes_socket(sim_dir, sim_process):
    proc = sim_process()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not (sim_dir / "sim.sock").exists()
    assert not (sim_dir / "sim.pid").exists()


def test_second_server_on_same_dir_is_refused(threaded_server, sim_dir):
    with pytest.raises(SimServerError, match="already answers"):
        SimServer(sim_dir).start_in_thread()
    assert SimControl(threaded_server.socket_path).is_running()


def test_two_accounts_concurrently(threaded_server, sim_dir):
    async def roundtrip(name: str, salt: int) -> tuple[str, bool]:
        client = client_for(sim_dir, name)
        await client.connect()
        try:
            me = await client.get_me()
            data = payload(MIB + salt * 4096, salt)
            message = await client.send_file("stash_archive", named(data, f"{name}.bin"),
                                             force_document=True)
            return me.username, bool(me.premium), await client.download_media(message, file=bytes) == data
        finally:
            await client.disconnect()

    async def both():
        return await asyncio.gather(roundtrip("alice", 1), roundtrip("bob", 2))

    assert asyncio.run(both()) == [("alice", False, True), ("bob", True, True)]
    messages = SimControl(threaded_server.socket_path).inspect("stash_archive")["messages"]
    assert {"alice.bin", "bob.bin"} <= {m.get("file_name") for m in messages}


def test_dropped_connection_reconnects(threaded_server, sim_dir):
    world = threaded_server.world
    dropped = []

    def drop_first_history(auth_key_id, request_name):
        if request_name == "GetHistoryRequest" and not dropped:
            dropped.append(request_name)
            return True
        return False

    world.should_drop = drop_first_history  # the server asks the world per request

    async def run():
        client = client_for(sim_dir, "carol")
        await client.connect()
        try:
            # Telethon sees the connection drop, reconnects and resends.
            messages = await asyncio.wait_for(client.get_messages("sim_forum", limit=5), 30)
            assert messages
        finally:
            await client.disconnect()

    asyncio.run(run())
    assert dropped == ["GetHistoryRequest"]


def test_remote_transport_refused_raises_connection_error(tmp_path):
    async def run():
        transport = RemoteTransport(tmp_path / "nothing.sock")
        with pytest.raises(ConnectionError):
            await transport.invoke(1, "GetConfigRequest", b"")
        await transport.close()

    asyncio.run(run())


def test_flood_fault_reaches_telethon(threaded_server, sim_dir):
    control = SimControl(threaded_server.socket_path)
    control.set_fault("flood", request="GetHistoryRequest", seconds=42, account="bob")

    async def run():
        bob, carol = client_for(sim_dir, "bob"), client_for(sim_dir, "carol")
        await bob.connect()
        await carol.connect()
        try:
            with pytest.raises(errors.FloodWaitError) as info:
                await bob.get_messages("sim_source_b", limit=3)
            assert info.value.seconds == 42
            assert await carol.get_messages("sim_source_b", limit=3)  # only bob is hit
        finally:
            await bob.disconnect()
            await carol.disconnect()

    asyncio.run(run())


def test_bandwidth_cap_holds_across_concurrent_requests(threaded_server, sim_dir):
    """Two downloads at once by one account share its cap instead of doubling it."""
    bps = 4_000_000
    control = SimControl(threaded_server.socket_path)
    control.set_fault("bandwidth", request="GetFileRequest", account="alice", bytes_per_second=bps)

    async def run():
        client = client_for(sim_dir, "alice")
        await client.connect()
        try:
            history = await client.get_messages("sim_source_a", limit=50)
            docs = sorted((m for m in history if m.file), key=lambda m: -m.file.size)[:2]
            started = time.monotonic()
            blobs = await asyncio.gather(*(client.download_media(m, file=bytes) for m in docs))
            return time.monotonic() - started, sum(len(b) for b in blobs)
        finally:
            await client.disconnect()

    elapsed, total = asyncio.run(run())
    assert total > 500_000
    assert elapsed >= total / bps


def test_control_post_document_and_topic_text(threaded_server, sim_dir, tmp_path):
    control = SimControl(threaded_server.socket_path)
    source = tmp_path / "big.bin"
    source.write_bytes(payload(700_000, 3))
    from_path = control.post("sim_source_a", path=source, caption="from a path")
    from_bytes = control.post("Sim Forum", file_name="inline.zip", data=b"PK" + b"x" * 5000, topic="Games")
    text = control.post("sim_forum", text="hello games", topic="Games", sender="bob")
    messages = {(m["channel_id"], m["id"]): m for m in control.inspect()["messages"]}
    a = control.inspect("sim_source_a")["channels"][0]["id"]
    forum = control.inspect("sim_forum")
    f, games = forum["channels"][0]["id"], next(t["id"] for t in forum["topics"] if t["title"] == "Games")
    assert messages[(a, from_path)]["file_name"] == "big.bin" and messages[(a, from_path)]["size"] == 700_000
    assert messages[(f, from_bytes)]["topic_id"] == games and messages[(f, from_bytes)]["size"] == 5002
    assert messages[(f, text)]["text"] == "hello games"

    async def bob_reads_topic():
        client = client_for(sim_dir, "bob")
        await client.connect()
        try:
            got = await client.get_messages("sim_forum", reply_to=games, limit=10)
            return {m.id for m in got}
        finally:
            await client.disconnect()

    assert {from_bytes, text} <= asyncio.run(bob_reads_topic())


def test_garbage_frames_do_not_stop_the_server(threaded_server):
    import socket as socketlib
    import struct

    for frame in (b"\x00\x00\x00\x03abc", struct.pack(">I", 1 << 30), b"\x00\x00\x00\x01\xc1", b"\x00\x00"):
        with socketlib.socket(socketlib.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(threaded_server.socket_path))
            sock.sendall(frame)
            sock.shutdown(socketlib.SHUT_WR)
            while sock.recv(65536):
                pass  # an error reply, then the server closes
    control = SimControl(threaded_server.socket_path)
    assert control.ping()["pid"] == os.getpid()
    with pytest.raises(Exception, match="unknown op"):
        control.call("explode")


def test_control_posts_a_photo_album_that_telethon_downloads(threaded_server, sim_dir):
    from actors.telegram.sim.samples import png_image

    control = SimControl(threaded_server.socket_path)
    image = png_image("remote-album", 200, 120)
    photo = control.post("sim_source_a", file_name="remote.png", data=image, caption="look", photo=True,
                         grouped_id=555)
    doc = control.post("sim_source_a", file_name="remote.zip", data=b"PK" + b"r" * 3000, grouped_id=555)
    shown = {m["id"]: m for m in control.inspect("sim_source_a")["messages"]}
    assert shown[photo]["photo"]["label"] == "remote.png" and shown[photo]["document"] is None
    assert shown[photo]["grouped_id"] == shown[doc]["grouped_id"] == 555

    async def alice_downloads():
        client = client_for(sim_dir, "alice")
        await client.connect()
        try:
            msg = await client.get_messages("sim_source_a", ids=photo)
            return msg.grouped_id, await client.download_media(msg, file=bytes)
        finally:
            await client.disconnect()

    assert asyncio.run(alice_downloads()) == (555, image)


def test_a_part_is_committed_before_it_is_acknowledged(threaded_server, sim_dir):
    """The server commits the part rows of a loop pass at once, then answers: whatever
    the client was told is stored survives a crash of the server right after."""
    import sqlite3

    from telethon.tl.functions.upload import SaveBigFilePartRequest

    db = sqlite3.connect(sim_dir / "world.sqlite3")

    async def run():
        client = client_for(sim_dir, "alice")
        await client.connect()
        try:
            async def one(index):
                assert await client(SaveBigFilePartRequest(777, index, 24, payload(512 * 1024, index)))
                stored = {r[0] for r in db.execute("SELECT part FROM parts WHERE file_id=777")}
                assert index in stored

            await asyncio.gather(*(one(i) for i in range(24)))   # many in flight: several per pass
        finally:
            await client.disconnect()

    try:
        asyncio.run(run())
    finally:
        db.close()


def test_parts_whose_rows_cannot_be_committed_are_not_acknowledged(threaded_server, sim_dir):
    from telethon.tl.functions.upload import SaveBigFilePartRequest

    world = threaded_server.world

    calls = []

    def broken():
        calls.append(1)
        raise OSError("disk full")

    async def run():
        client = client_for(sim_dir, "alice")
        await client.connect()
        world.commit_part_rows = broken   # every reply of a pass whose commit fails is an error
        try:
            client._request_retries = 1   # Telethon retries a 500 (5 times by default), then gives up
            with pytest.raises((errors.ServerError, ValueError)):
                await client(SaveBigFilePartRequest(778, 0, 2, payload(512 * 1024)))
            assert calls
        finally:
            await client.disconnect()

    asyncio.run(run())


class CountingTransport(RemoteTransport):
    """RemoteTransport that counts what went out together (invoke_many) and alone."""

    def __init__(self, *args, counts: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = counts

    async def invoke_many(self, auth_key_id, calls):
        self.counts.setdefault("together", []).append(len(calls))
        return await super().invoke_many(auth_key_id, calls)

    async def invoke(self, auth_key_id, request_name, data):
        self.counts.setdefault("alone", []).append(request_name)
        return await super().invoke(auth_key_id, request_name, data)


@pytest.mark.parametrize("drop", [False, True])
def test_requests_sent_together_go_out_in_one_write_each_with_its_own_outcome(threaded_server, sim_dir,
                                                                              drop):
    """client([...]): one invoke_many for the list; a refused request fails alone (MultiError);
    a connection lost under the list resends its requests one by one, none lost."""
    from telethon.tl.functions.upload import SaveBigFilePartRequest

    world, counts, dropped = threaded_server.world, {}, []

    def drop_first_part(auth_key_id, request_name):
        if drop and request_name == "SaveBigFilePartRequest" and not dropped:
            dropped.append(request_name)
            return True
        return False

    world.should_drop = drop_first_part
    sock = sim_dir / "sim.sock"

    async def run():
        client = make_sim_client(str(sim_dir / "sessions" / "alice.session"),
                                 lambda: CountingTransport(sock, counts=counts))
        client.flood_sleep_threshold = 0
        await client.connect()
        try:
            requests = [SaveBigFilePartRequest(779, i, 4, payload(512 * 1024, i)) for i in range(3)]
            requests.append(SaveBigFilePartRequest(779, 3, 4, b""))   # refused: FILE_PART_EMPTY
            with pytest.raises(errors.MultiError) as info:
                await asyncio.wait_for(client(requests), 30)
            assert info.value.results[:3] == [True, True, True]
            assert info.value.exceptions[:3] == [None, None, None]
            assert isinstance(info.value.exceptions[3], errors.FilePartEmptyError)
        finally:
            await client.disconnect()

    asyncio.run(run())
    assert counts["together"] == [4]
    assert dropped == (["SaveBigFilePartRequest"] if drop else [])
    parts_alone = [name for name in counts.get("alone", []) if name == "SaveBigFilePartRequest"]
    assert len(parts_alone) == (4 if drop else 0)   # after a drop: each resent on its own
