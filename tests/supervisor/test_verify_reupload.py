"""Issue 4 with a real `stashd run` process on the standalone simulated Telegram, on SQLite and
PostgreSQL: 10 % of the uploaded messages are deleted in the destination; every one of them is
uploaded again (a new message, each part in the channel exactly once) and every transfer ends
verified.

The helpers here (config with a short [verify] schedule, live documents in the sim, waiting on
admin answers) are shared by the other tests/supervisor/test_verify_*.py modules.
"""
from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import pytest

from actors.admin.client import call as admin_call
from actors.telegram.sim.remote import SimControl
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for
from tests.supervisor.test_process import write_config as process_config

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
DEST = "stash_archive"
FINAL_STATES = ("verified", "cleaned", "failed")

FAST_VERIFY = {
    "first_check_delay_seconds": 0.2,
    "interval_seconds": 0.5,
    "verified_interval_seconds": 1.0,
    "lease_seconds": 15,
    "backoff_initial_seconds": 0.1,
    "backoff_max_seconds": 0.5,
    "max_attempts": 5,
    "cleanup_grace_seconds": 3600,
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def verify_config(state: Path, sim, root: Path, db_url: str, *, delete_original: bool = False,
                  **verify) -> Path:
    """A daemon on the test's sim and database: 1 MiB split limit (regular accounts), the
    upload pipeline on ``root``, and a [verify] schedule in tenths of seconds."""
    settings = {**FAST_VERIFY, **verify}
    lines = "\n".join(f"{k} = {toml_value(v)}" for k, v in settings.items())
    return process_config(
        state, sim,
        telegram=f"upload_limit_margin_bytes = {2000 * MIB - MIB}",
        extra=f"""[database]
url = "{db_url}"
[upload]
roots = ["{root}"]
destination = "{DEST}"
uploaders = 2
delete_original = {toml_value(delete_original)}
[verify]
{lines}
""")


def live_documents(sim, prefix: str) -> list[dict]:
    """Live (not deleted) documents in the destination whose file name starts with ``prefix``."""
    server, _ = sim
    messages = SimControl(server.socket_path).inspect(DEST)["messages"]
    return [m for m in messages if m.get("document") and not m.get("deleted")
            and m["document"]["file_name"].startswith(prefix)]


def transfers(sock, ids) -> dict[str, dict]:
    return {tid: admin_call(sock, "transfer", {"id": tid}, timeout=10) for tid in ids}


def all_in(sock, ids, states) -> dict[str, dict] | None:
    try:
        views = transfers(sock, ids)
    except Exception:
        return None
    return views if all(v["state"] in states for v in views.values()) else None


def wait_states(sock, ids, states, *, timeout: float, what: str, log: Path | None = None):
    """all_in() polled until true; on timeout the states seen and the daemon log's tail."""
    try:
        return wait_for(lambda: all_in(sock, ids, states), timeout=timeout, what=what)
    except AssertionError:
        try:
            seen = {tid[:8]: (v["state"], v.get("reason")) for tid, v in transfers(sock, ids).items()}
        except Exception as exc:
            seen = repr(exc)
        tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
        raise AssertionError(f"timed out waiting for {what}: {seen}\n{tail}") from None


def write_files(root: Path, prefix: str, sizes: list[int]) -> dict[str, bytes]:
    files = {}
    for i, size in enumerate(sizes):
        name = f"{prefix}-{i:02d}.bin"
        data = os.urandom(size)
        (root / name).write_bytes(data)
        files[name] = data
    return files


def expected_names(name: str, part_count: int) -> list[str]:
    return [name] if part_count == 1 else [f"{name}.{i:03d}" for i in range(1, part_count + 1)]


def assert_each_part_once(sim, prefix: str, views: dict[str, dict]) -> None:
    """The destination holds every part of every transfer exactly once, under the recorded id."""
    docs = live_documents(sim, prefix)
    by_name: dict[str, list[int]] = {}
    for m in docs:
        by_name.setdefault(m["document"]["file_name"], []).append(m["id"])
    recorded = {}
    for v in views.values():
        for p in v["parts"]:
            recorded[p["file_name"]] = p["message_id"]
    assert {n: len(ids) for n, ids in by_name.items()} == {n: 1 for n in recorded}, "duplicates or gaps"
    assert {n: ids[0] for n, ids in by_name.items()} == recorded


@pytest.mark.timeout(90)
def test_deleted_tenth_is_reuploaded_and_everything_verified(tmp_path, sim, db_url):
    rng = random.Random(4)
    root = tmp_path / "files"
    root.mkdir()
    prefix = f"tenth-{uuid.uuid4().hex[:8]}"
    # 13 small files and one of 2.5 MiB split in 3 parts: 16 messages
    write_files(root, prefix, [rng.randint(10_000, 200_000) for _ in range(13)] + [2 * MIB + MIB // 2])
    config = verify_config(tmp_path / "state", sim, root, db_url)
    sock = tmp_path / "state" / "stashd.sock"
    proc = stashd("run", "--config", str(config), env=env())
    try:
        wait_for(lambda: all_ready(sock), what="accounts ready")
        ids = [t["id"] for t in admin_call(sock, "upload", {"paths": [str(root)]})["transfers"]]
        assert len(ids) == 14
        views = wait_states(sock, ids, ("verified",), timeout=40, what="all verified",
                            log=tmp_path / "state" / "stashd.log")
        parts = [(tid, p) for tid, v in views.items() for p in v["parts"]]
        assert len(parts) == 16
        assert_each_part_once(sim, prefix, views)

        victims = rng.sample(parts, k=round(len(parts) * 0.1))          # 10 %: 2 messages
        server, _ = sim
        assert SimControl(server.socket_path).delete(DEST, [p["message_id"] for _, p in victims]) == 2
        gone = {(tid, p["index"]): p["message_id"] for tid, p in victims}

        def replaced():
            now = all_in(sock, ids, ("verified",))
            if now is None:
                return None
            for (tid, index), old in gone.items():
                part = now[tid]["parts"][index]
                if part["message_id"] == old or part["verified_at"] is None:
                    return None
            return now

        final = wait_for(replaced, timeout=40, what="deleted parts uploaded again and verified")
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert_each_part_once(sim, prefix, final)
    for tid, v in final.items():
        for p in v["parts"]:
            # only misses are recorded: a check may see a gone part more than once (backoff)
            assert (p["misses"] >= 1) if (tid, p["index"]) in gone else (p["misses"] == 0), (tid, p)
            assert p["verified_at"] is not None
        assert v["last_check_at"] is not None
    # a re-uploaded part keeps its place in the split: same file name and length
    for (tid, index), _old in gone.items():
        before = next(p for t, p in victims if t == tid and p["index"] == index)
        after = final[tid]["parts"][index]
        assert (after["file_name"], after["offset"], after["length"]) == \
            (before["file_name"], before["offset"], before["length"])
