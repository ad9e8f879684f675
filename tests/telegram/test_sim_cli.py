"""``stashd sim`` commands: seed, inspect, delete, fault; against a server and without one."""
from __future__ import annotations

import asyncio
import json
import stat
import time
import zipfile
import io

import pytest
from telethon import errors

from actors.telegram.sim import cli, samples
from actors.telegram.sim.client import make_sim_client
from actors.telegram.sim.remote import RemoteTransport, SimControl
from actors.telegram.sim.server import SimServer


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_of(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def sim_dir(tmp_path):
    return tmp_path / "sim"


@pytest.fixture
def server(sim_dir):
    server = SimServer(sim_dir).start_in_thread()
    yield server
    server.stop_thread()


def client_for(sim_dir, name):
    sock = sim_dir / "sim.sock"
    client = make_sim_client(str(sim_dir / "sessions" / f"{name}.session"), lambda: RemoteTransport(sock))
    client.flood_sleep_threshold = 0
    return client


def test_seed_through_server_writes_private_sessions_and_is_idempotent(server, sim_dir, capsys):
    first = json_of(capsys, "seed", "--dir", sim_dir)
    sessions = sim_dir / "sessions"
    for name in ("alice", "bob", "carol"):
        assert stat.S_IMODE((sessions / f"{name}.session").stat().st_mode) == 0o600
    assert first["created"]["sessions"] == 3
    premium = {a["name"]: a["premium"] for a in first["accounts"]}
    assert premium["bob"] and not premium["alice"] and not premium["carol"]

    before = json_of(capsys, "inspect", "--dir", sim_dir)
    (sessions / "carol.session").unlink()
    second = json_of(capsys, "seed", "--dir", sim_dir)
    after = json_of(capsys, "inspect", "--dir", sim_dir)
    assert second["created"] == {"users": 0, "channels": 0, "topics": 0, "messages": 0, "sessions": 1}
    assert (sessions / "carol.session").exists()
    for key in ("users", "channels", "topics", "messages"):
        assert len(after[key]) == len(before[key]), key


def test_inspect_lists_seeded_world_with_phones_redacted(server, sim_dir, capsys):
    json_of(capsys, "seed", "--dir", sim_dir)
    code, out, _ = run_cli(capsys, "inspect", "--dir", sim_dir)
    assert code == 0
    assert "+15550000001" not in out and "15550000002" not in out
    world = json.loads(out)
    usernames = {c.get("username") for c in world["channels"]}
    assert usernames == {"sim_source_a", "sim_source_b", "sim_forum", "stash_archive"}
    assert {t["title"] for t in world["topics"]} >= {"Games", "Software"}

    source_a = json_of(capsys, "inspect", "--dir", sim_dir, "--channel", "sim_source_a")
    assert [c["title"] for c in source_a["channels"]] == ["Sim Source A"]
    names = {m.get("file_name") for m in source_a["messages"]}
    for expected in ("holiday-photos.zip", "project-backup.zip.001", "project-backup.zip.002",
                     "music-collection.z01", "music-collection.zip", "documents.part1.rar",
                     "documents.part2.rar", "old-scans.r00", "old-scans.rar", "dataset.7z.001",
                     "dataset.7z.002", "shared-ebooks.zip"):
        assert expected in names
    sizes = [m.get("size") or 0 for m in source_a["messages"]]
    assert 0 < sum(sizes) < 16 * 1024 * 1024
    for message in source_a["messages"]:
        assert {"id", "date"} <= set(message)

    by_title = json_of(capsys, "inspect", "--dir", sim_dir, "--channel", "Sim Source B")
    assert "shared-ebooks.zip" in {m.get("file_name") for m in by_title["messages"]}


def test_inspect_unknown_channel_fails_with_one_line(server, sim_dir, capsys):
    json_of(capsys, "seed", "--dir", sim_dir)
    code, out, err = run_cli(capsys, "inspect", "--dir", sim_dir, "--channel", "nope")
    assert code == 1 and out == ""
    assert "nope" in err and len(err.strip().splitlines()) == 1


def test_delete_by_ids_and_fraction(server, sim_dir, capsys):
    json_of(capsys, "seed", "--dir", sim_dir)

    def live_ids():
        world = json_of(capsys, "inspect", "--dir", sim_dir, "--channel", "sim_source_a")
        return {m["id"] for m in world["messages"] if not m.get("deleted")}

    ids = sorted(live_ids())
    result = json_of(capsys, "delete", "--dir", sim_dir, "--channel", "sim_source_a",
                     "--ids", f"{ids[0]},{ids[1]}")
    assert result["deleted"] == 2
    assert live_ids() == set(ids[2:])

    result = json_of(capsys, "delete", "--dir", sim_dir, "--channel", "sim_source_a",
                     "--fraction", "0.5", "--seed", "7")
    assert result["deleted"] == len(result["ids"]) == round(len(ids[2:]) / 2 + 0.01)
    survivors = live_ids()
    assert survivors == set(ids[2:]) - set(result["ids"])
    kept = min(survivors)

    async def alice_sees_them_gone():
        client = client_for(sim_dir, "alice")
        await client.connect()
        try:
            got = await client.get_messages("sim_source_a", ids=[ids[0], result["ids"][0], kept])
            assert got[0] is None and got[1] is None and got[2].id == kept
        finally:
            await client.disconnect()

    asyncio.run(alice_sees_them_gone())


def test_fault_flood_then_clear(server, sim_dir, capsys):
    json_of(capsys, "seed", "--dir", sim_dir)
    fault = json_of(capsys, "fault", "--dir", sim_dir, "flood", "--request", "GetHistoryRequest",
                    "--seconds", "17")
    assert fault["kind"] == "flood"

    async def history():
        client = client_for(sim_dir, "bob")
        await client.connect()
        try:
            return await client.get_messages("sim_source_b", limit=2)
        finally:
            await client.disconnect()

    with pytest.raises(errors.FloodWaitError) as info:
        asyncio.run(history())
    assert info.value.seconds == 17
    json_of(capsys, "fault", "--dir", sim_dir, "clear")
    assert asyncio.run(history())


def test_fault_latency_is_applied(server, sim_dir, capsys):
    json_of(capsys, "seed", "--dir", sim_dir)
    json_of(capsys, "fault", "--dir", sim_dir, "latency", "--request", "GetHistoryRequest",
            "--seconds", "0.3", "--account", "carol")

    async def timed_history():
        client = client_for(sim_dir, "carol")
        await client.connect()
        try:
            started = time.monotonic()
            await client.get_messages("sim_forum", limit=2)
            return time.monotonic() - started
        finally:
            await client.disconnect()

    assert asyncio.run(timed_history()) >= 0.3


def test_fault_error_and_bandwidth_arguments(server, sim_dir, capsys):
    json_of(capsys, "seed", "--dir", sim_dir)
    fault = json_of(capsys, "fault", "--dir", sim_dir, "error", "--error", "RPC_CALL_FAIL",
                    "--fraction", "0.25", "--account", "alice")
    assert fault["error"] == "RPC_CALL_FAIL" and fault["fraction"] == 0.25
    assert isinstance(fault["account"], int)
    fault = json_of(capsys, "fault", "--dir", sim_dir, "bandwidth", "--bps", "1000000")
    assert fault["bytes_per_second"] == 1000000
    code, _, err = run_cli(capsys, "fault", "--dir", sim_dir, "drop", "--account", "mallory")
    assert code == 1 and "mallory" in err


@pytest.mark.parametrize("argv, needle", [
    ([], "COMMAND"),
    (["inspect"], "--dir"),
    (["fault", "--dir", "X", "nonsense"], "invalid choice"),
    (["fault", "--dir", "X", "error"], "--error"),
    (["fault", "--dir", "X", "bandwidth"], "--bps"),
    (["fault", "--dir", "X", "latency"], "--seconds"),
    (["fault", "--dir", "X", "flood", "--fraction", "2"], "0..1"),
    (["delete", "--dir", "X", "--channel", "c"], "--ids"),
    (["delete", "--dir", "X", "--channel", "c", "--ids", "1,x"], "message ids"),
    (["delete", "--dir", "X", "--channel", "c", "--ids", "1", "--fraction", "0.1"], "not allowed"),
])
def test_usage_errors_exit_2(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err


def test_without_server_commands_open_the_world_directly(sim_dir, capsys):
    code, _, err = run_cli(capsys, "inspect", "--dir", sim_dir)
    assert code == 1 and "no simulated Telegram" in err

    summary = json_of(capsys, "seed", "--dir", sim_dir, "--sessions", sim_dir / "keys")
    assert (sim_dir / "keys" / "alice.session").exists()
    assert summary["created"]["channels"] == 4
    world = json_of(capsys, "inspect", "--dir", sim_dir, "--channel", "stash_archive")
    assert world["channels"][0]["title"] == "Stash Archive"

    # A fault set offline is stored with the world and applies once a server runs.
    json_of(capsys, "fault", "--dir", sim_dir, "flood", "--request", "GetHistoryRequest",
            "--seconds", "9", "--account", "alice")
    server = SimServer(sim_dir).start_in_thread()
    try:
        async def history():
            sock = sim_dir / "sim.sock"
            client = make_sim_client(str(sim_dir / "keys" / "alice.session"),
                                     lambda: RemoteTransport(sock))
            client.flood_sleep_threshold = 0
            await client.connect()
            try:
                return await client.get_messages("sim_source_a", limit=1)
            finally:
                await client.disconnect()

        with pytest.raises(errors.FloodWaitError):
            asyncio.run(history())
        assert SimControl(server.socket_path).inspect()["channels"]
    finally:
        server.stop_thread()


def test_samples_are_deterministic_and_zips_are_real():
    first, again = samples.source_a_samples(), samples.source_a_samples()
    assert [(s.file_name, s.data) for s in first] == [(s.file_name, s.data) for s in again]
    whole = next(s for s in first if s.file_name == "holiday-photos.zip")
    assert zipfile.ZipFile(io.BytesIO(whole.data)).testzip() is None
    split = b"".join(s.data for s in first if s.file_name.startswith("project-backup.zip."))
    assert zipfile.ZipFile(io.BytesIO(split)).testzip() is None
    assert next(s for s in first if s.file_name == "documents.part1.rar").data.startswith(b"Rar!")
    assert next(s for s in first if s.file_name == "dataset.7z.001").data.startswith(b"7z\xbc\xaf")
    big = samples.source_a_samples(scale=4.0)
    assert sum(s.size for s in big) > 3 * sum(s.size for s in first)
