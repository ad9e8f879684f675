"""Photo messages and albums in the simulated Telegram, read by real Telethon."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from telethon import errors
from telethon.tl import functions, types

from actors.telegram.sim.client import make_sim_client
from actors.telegram.sim.local import LocalTransport
from actors.telegram.sim.samples import png_image
from actors.telegram.sim.world import SimWorld, image_dimensions, photo_size_type, write_session_file
from tests.telegram.sim_helpers import Clock

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def world(tmp_path):
    w = SimWorld(tmp_path / "world", clock=Clock())
    yield w
    w.close()


def _setup(world, tmp_path):
    alice = world.create_user("Alice", username="alice", phone="+15550000001")
    poster = world.create_user("Poster", username="poster")
    channel = world.create_channel("Source", username="source", members=[alice.user_id],
                                   admins=[poster.user_id])
    session = write_session_file(tmp_path / "alice", alice.auth_key)
    return alice, poster, channel, session


def _client(world, session):
    return make_sim_client(session, lambda: LocalTransport(world), flood_sleep_threshold=0)


def test_image_dimensions_and_size_types():
    assert image_dimensions(png_image("x", 48, 32)) == (48, 32)
    assert image_dimensions(b"GIF89a\x10\x00\x08\x00rest") == (16, 8)
    jpeg = (b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff\xc0\x00\x0b\x08\x01\x2c\x02\x58\x01\x01\x11\x00")
    assert image_dimensions(jpeg) == (600, 300)
    assert image_dimensions(b"not an image") == (0, 0)
    assert [photo_size_type(w, w) for w in (90, 300, 800, 1000, 2000)] == ["s", "m", "x", "y", "w"]


def test_photo_album_over_telethon_download_media_and_thumb_sizes(world, tmp_path):
    alice, poster, channel, session = _setup(world, tmp_path)
    big, small = png_image("cover", 640, 400), png_image("cover-small", 96, 60)
    album = 0x1234_5678_9ABC
    photo_msg = world.post_photo(channel, poster.user_id, big, caption="Cover", grouped_id=album,
                                 label="cover.png", thumbs={"s": small})
    doc_msg = world.post_document(channel, poster.user_id, "pack.zip", b"PK" + b"z" * 5000,
                                  grouped_id=album)
    lone = world.post_photo(channel, poster.user_id, small)
    world.post_text(channel, poster.user_id, "no media")

    async def main():
        client = _client(world, session)
        await client.connect()
        try:
            msgs = await client.get_messages("source", ids=[photo_msg, doc_msg, lone])
            whole = await client.download_media(msgs[0], bytes)
            thumb = await client.download_media(msgs[0], bytes, thumb="s")
            single = await client.download_media(msgs[2], bytes)
            history = [m async for m in client.iter_messages("source", limit=10)]
            photos = await client.get_messages("source", filter=types.InputMessagesFilterPhotos(), limit=10)
            p = msgs[0].media.photo
            with pytest.raises(errors.LocationInvalidError):
                await client(functions.upload.GetFileRequest(
                    types.InputPhotoFileLocation(p.id, p.access_hash, p.file_reference, "y"), 0, 4096))
            with pytest.raises(errors.FileIdInvalidError):
                await client(functions.upload.GetFileRequest(
                    types.InputPhotoFileLocation(p.id, p.access_hash + 1, p.file_reference, "m"), 0, 4096))
            return msgs, whole, thumb, single, history, photos
        finally:
            await client.disconnect()

    msgs, whole, thumb, single, history, photos = asyncio.run(main())
    photo, doc, lone_msg = msgs
    assert isinstance(photo.media, types.MessageMediaPhoto) and photo.message == "Cover"
    sizes = photo.media.photo.sizes
    assert [(s.type, s.w, s.h, s.size) for s in sizes] == [("s", 96, 60, len(small)),
                                                           ("x", 640, 400, len(big))]
    assert photo.grouped_id == doc.grouped_id == album and lone_msg.grouped_id is None
    assert isinstance(doc.media, types.MessageMediaDocument)
    assert whole == big and thumb == small and single == small
    assert world.photo_bytes(channel, photo_msg) == big
    assert world.photo_bytes(channel, photo_msg, "s") == small
    assert sum(isinstance(m.media, types.MessageMediaPhoto) for m in history) == 2
    assert sorted(m.id for m in photos) == [photo_msg, lone]
    seen = {m["id"]: m for m in world.inspect()["messages"] if m["channel_id"] == channel}
    assert seen[photo_msg]["photo"] == {"id": photo.media.photo.id, "label": "cover.png",
                                        "sizes": {"s": len(small), "x": len(big)}}
    assert seen[doc_msg]["grouped_id"] == album and seen[doc_msg]["photo"] is None


def test_a_world_written_before_photos_opens_with_the_new_columns(tmp_path):
    state_dir = tmp_path / "old"
    state_dir.mkdir()
    db = sqlite3.connect(state_dir / "world.sqlite3")
    db.executescript(
        "CREATE TABLE messages(channel_id INTEGER, id INTEGER, date REAL NOT NULL, sender_id INTEGER,"
        " text TEXT NOT NULL DEFAULT '', topic_id INTEGER, reply_to_id INTEGER, document_id INTEGER,"
        " action TEXT, deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(channel_id, id));")
    db.close()
    world = SimWorld(state_dir, clock=Clock())
    try:
        poster = world.create_user("Poster")
        channel = world.create_channel("C", admins=[poster.user_id])
        msg = world.post_photo(channel, poster.user_id, png_image("p"), grouped_id=7)
        assert world.photo_bytes(channel, msg) == png_image("p")
    finally:
        world.close()
    reopened = SimWorld(state_dir, clock=Clock())
    try:
        assert reopened.photo_bytes(channel, msg) == png_image("p")
        assert next(m for m in reopened.inspect()["messages"] if m["id"] == msg)["grouped_id"] == 7
    finally:
        reopened.close()
