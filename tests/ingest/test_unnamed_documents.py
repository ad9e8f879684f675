"""Documents without a file name: archives by mime type, else by the magic bytes of one
4 KiB ranged read; documents that are no archives are recorded as seen (not skipped) and
not examined again (simulated Telegram, real AccountActors, SQLite and PostgreSQL)."""
from __future__ import annotations

import asyncio
import os

import pytest

from actors.account_messages import GetHistory
from actors.ingest.pipeline import IngestAccountPort, archive_name_of
from actors.ingest.scan import Page, Target
from ingest_sim import SimEnv
from test_pipeline import Rig, zip_bytes

pytestmark = pytest.mark.timeout(60)

SEVEN_Z = b"7z\xbc\xaf\x27\x1c" + os.urandom(20_000)   # a 7z signature header (index reads it later)


@pytest.fixture
def env(tmp_path, db_url):
    e = SimEnv(tmp_path, db_url)
    yield e
    e.close()


def scan(rig: Rig, account: str, channel: str, channel_id: int):
    """A scan as the IngestActor does it: sniff the page, then record it."""
    env = rig.env
    msgs = env.refs[account].ask(GetHistory(channel, None, 0), timeout=20).messages
    target = Target(channel, channel_id, None)
    page = Page(msgs, max(m.id for m in msgs))
    sniffed = asyncio.run(rig.recorder.sniff(target, page, IngestAccountPort(env.refs[account], timeout=20)))
    out = rig.recorder.record_page(target, page, account=account, sniffed=sniffed)
    for key in out.set_keys:
        rig.recorder.refresh_set(key, at_present=True, account=account, outcome=out)
    return out


def test_unnamed_archives_are_found_by_mime_type_or_magic_bytes(env):
    rig = Rig(env)
    data = zip_bytes()
    by_mime = env.world.post_document(env.source_a, env.poster.user_id, "", data, mime_type="application/zip")
    by_magic = env.world.post_document(env.source_a, env.poster.user_id, "", SEVEN_Z,
                                       mime_type="application/octet-stream")
    noise = env.world.post_document(env.source_a, env.poster.user_id, "", os.urandom(9000),
                                    mime_type="application/octet-stream")
    photo = env.world.post_document(env.source_a, env.poster.user_id, "", os.urandom(5000),
                                    mime_type="image/jpeg")
    named = env.post("notes.txt", b"hello")
    reads = env.count("alice", "GetFileRequest")
    out = scan(rig, "alice", "sim_source_a", env.source_a)
    # one 4 KiB read for each unnamed document whose mime type says nothing: the 7z and the noise
    assert env.count("alice", "GetFileRequest") - reads == 2
    assert (out.seen, out.others) == (2, 3)
    store = env.storage
    zip_msg = store.get_source_message(env.source_a, by_mime)
    seven = store.get_source_message(env.source_a, by_magic)
    assert zip_msg.file_name.startswith("telegram_") and zip_msg.file_name.endswith(".zip")
    assert seven.file_name.endswith(".7z") and seven.status == "pending"
    for mid in (noise, photo, named):  # seen, not skipped: no set, no skip row
        m = store.get_source_message(env.source_a, mid)
        assert (m.status, m.reason, m.set_key) == ("seen", "not_archive", None)
    assert store.list_skips() == []
    assert sorted(s.archive_format for s in store.list_archive_sets()) == ["7z", "zip"]
    assert all(s.state == "ready" for s in store.list_archive_sets())

    # the other account reading the same channel examines nothing again: no read at all
    bob_reads = env.count("bob", "GetFileRequest")
    again = scan(rig, "bob", "sim_source_a", env.source_a)
    assert env.count("bob", "GetFileRequest") == bob_reads
    assert (again.seen, again.known, again.others) == (0, 2, 3)

    # the unnamed zip goes through like a named one
    outcomes = {o.result for o in rig.ingest_ready("alice", env.source_a)}
    assert outcomes == {"queued"}
    zip_set = next(s for s in store.list_archive_sets() if s.archive_format == "zip")
    assert env.storage.get_transfer(zip_set.transfer_id).size == len(data)


class Doc:
    def __init__(self, file_name, mime_type, doc_id=7, size=10):
        self.file_name, self.mime_type, self.id, self.size = file_name, mime_type, doc_id, size


def test_names_from_mime_types():
    assert archive_name_of(Doc(None, "application/vnd.rar")).file_name == "telegram_7.rar"
    assert archive_name_of(Doc("", "application/x-rar-compressed")).format == "rar"
    assert archive_name_of(Doc("backup", "application/x-7z-compressed")).format == "7z"   # bare name
    assert archive_name_of(Doc("report.pdf", "application/zip")) is None   # its name says otherwise
    assert archive_name_of(Doc(None, "application/octet-stream")) is None
    assert archive_name_of(Doc(None, "application/octet-stream"), {7: "zip"}).format == "zip"
    assert archive_name_of(Doc("pack.zip.002", "application/octet-stream")).number == 2
