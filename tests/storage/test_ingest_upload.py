"""A multi-source transfer (an archive set's staged volumes) through the real
UploaderActor and AccountActor on the in-process simulated Telegram: each volume
becomes a document under its own name when it fits, the set is re-split
byte-level when one does not, and the documents joined are the set's content."""
from __future__ import annotations

import os

import pykka
import pytest

from actors.account import AccountActor
from actors.telegram.client import build_client
from actors.telegram.sim.local import LocalTransport
from actors.telegram.sim.world import SimWorld, write_session_file
from actors.uploader import UploaderActor
from actors.uploader_messages import UploadTransfer
from config.loader import settings_from_dict
from storage.database import open_storage
from storage.manifest import build_multi_manifest, write_manifest

MIB = 1024 * 1024


class Clock:
    now = 1_700_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def env(tmp_path, db_url):
    clock = Clock()
    world = SimWorld(tmp_path / "sim", clock=clock)
    alice = world.create_user("Alice", username="alice", phone="+15550001111")
    dest = world.create_channel("Stash", username="stash_archive", admins=[alice.user_id])
    settings = settings_from_dict(
        {"daemon": {"state_dir": str(tmp_path)}, "telegram": {"mode": "simulated"}},
        base_dir=tmp_path, env={})
    session = write_session_file(tmp_path / "sessions" / "alice", alice.auth_key)
    storage = open_storage(db_url, clock=clock)
    factory = lambda: build_client(settings, session,  # noqa: E731
                                   transport_factory=lambda: LocalTransport(world))
    account = AccountActor.start("alice", session, settings, storage, None, clock,
                                 client_factory=factory)

    async def no_sleep(_seconds):
        return None

    uploader = UploaderActor.start(storage, {"alice": account}, window=4, clock=clock,
                                   sleep=no_sleep)
    yield tmp_path, world, dest, storage, uploader
    pykka.ActorRegistry.stop_all(block=True, timeout=10)
    storage.close()
    world.close()


def _plan(tmp_path, storage, names, sizes, limit):
    staged = tmp_path / "staged"
    staged.mkdir(exist_ok=True)
    paths = []
    for i, (name, size) in enumerate(zip(names, sizes)):
        path = staged / f"{i}.part"  # staged names differ from the posted ones
        path.write_bytes(os.urandom(size))
        paths.append(path)
    m = build_multi_manifest(paths, "stash_archive", limit, names=names, caption="a set",
                             split_name="set.7z")
    mpath = write_manifest(m, tmp_path / f"{m.transfer_id}.manifest")
    storage.create_transfer(
        m.transfer_id, source_path=str(paths[0]), size=m.total_size, sha256=m.sha256,
        destination="stash_archive", manifest_path=str(mpath), delete_original=False,
        parts=[(p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id) for p in m.parts])
    return paths, m


@pytest.mark.timeout(60)
def test_volumes_that_fit_keep_their_names_and_bytes(env):
    tmp_path, world, dest, storage, uploader = env
    names = ["set.7z.001", "set.7z.002", "set.7z.003"]
    paths, m = _plan(tmp_path, storage, names, [MIB + 1, MIB + 1, 300_000], 2 * MIB)
    result = uploader.ask(UploadTransfer(m.transfer_id, "alice"), timeout=45)
    assert result.state == "uploaded" and len(result.parts) == 3
    for path, part in zip(paths, result.parts):
        assert world.document_bytes(dest, part.message_id) == path.read_bytes()
    docs = {msg["id"]: msg["document"]["file_name"]
            for msg in world.inspect()["messages"] if msg["document"]}
    assert [docs[p.message_id] for p in result.parts] == names
    assert storage.find_package(m.sha256).transfer_id == m.transfer_id  # phase 1 done


@pytest.mark.timeout(60)
def test_a_volume_over_the_limit_resplits_the_whole_set(env):
    tmp_path, world, dest, storage, uploader = env
    paths, m = _plan(tmp_path, storage, ["set.7z.001", "set.7z.002"], [3 * MIB, MIB], 2 * MIB)
    assert [p.file_name for p in m.parts] == ["set.7z.001", "set.7z.002"]  # split_name + .00N
    assert [p.length for p in m.parts] == [2 * MIB, 2 * MIB]
    result = uploader.ask(UploadTransfer(m.transfer_id, "alice"), timeout=45)
    joined = b"".join(world.document_bytes(dest, p.message_id) for p in result.parts)
    assert joined == b"".join(p.read_bytes() for p in paths)
