"""AccountActor and photo messages: MessageInfo.photo / grouped_id, DownloadPhoto (real Telethon, sim)."""
from __future__ import annotations

import pytest

from actors.account_messages import DownloadPhoto, GetHistory, GetMessages
from actors.telegram.errors import InvalidRangeError
from actors.telegram.sim.samples import png_image, pseudo_random_bytes
from tests.actors.test_account import Env, ask

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, None)
    yield e
    e.close()


def test_album_photo_is_described_and_downloaded(env):
    w = env.world
    cover, thumb = png_image("album-cover", 1000, 700), png_image("album-thumb", 90, 60)
    photo_id = w.post_photo(env.src, None, cover, caption="Cover", grouped_id=99, thumbs={"s": thumb})
    doc_id = w.post_document(env.src, None, "pack.zip", b"PK" + bytes(3000), grouped_id=99)
    plain = w.post_document(env.src, None, "other.zip", b"PK" + bytes(10))
    ref = env.start("alice")
    page = ask(ref, GetHistory(env.src, limit=10))
    by_id = {m.id: m for m in page.messages}
    photo_msg, doc_msg = by_id[photo_id], by_id[doc_id]
    assert photo_msg.document is None and photo_msg.grouped_id == doc_msg.grouped_id == 99
    assert by_id[plain].grouped_id is None and by_id[plain].photo is None and doc_msg.photo is None
    info = photo_msg.photo
    assert (info.size_type, info.size) == ("y", len(cover))
    assert info.sizes == (("s", len(thumb)), ("y", len(cover)))
    assert ask(ref, DownloadPhoto(info)) == cover
    assert ask(ref, DownloadPhoto(info, "s")) == thumb
    with pytest.raises(InvalidRangeError):
        ask(ref, DownloadPhoto(info, max_bytes=len(cover) - 1))
    again = ask(ref, GetMessages(env.src, (photo_id,))).messages[0]
    assert again.photo == info and again.grouped_id == 99


def test_a_photo_over_one_mib_comes_in_several_requests(env):
    # a PNG header (for the dimensions) followed by 2.5 MiB: the sim stores what it is given
    big = png_image("huge", 3000, 2000)[:33] + pseudo_random_bytes("huge", 5 * 512 * 1024)
    msg = env.world.post_photo(env.src, None, big)
    ref = env.start("bob")
    info = ask(ref, GetMessages(env.src, (msg,))).messages[0].photo
    assert info.size_type == "w" and info.size == len(big)
    before = len(env.requests(env.bob, "GetFileRequest"))
    assert ask(ref, DownloadPhoto(info)) == big
    assert len(env.requests(env.bob, "GetFileRequest")) - before == 3


def test_photo_info_keeps_downloadable_sizes_only():
    import datetime

    from telethon.tl import types

    from actors.account_core import message_info, photo_info

    date = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    photo = types.Photo(id=5, access_hash=6, file_reference=b"ref", date=date, dc_id=4, sizes=[
        types.PhotoStrippedSize("i", b"\x01\x02"),
        types.PhotoSize("m", 320, 200, 9000),
        types.PhotoSizeProgressive("y", 1280, 800, [1000, 20000, 40000]),
        types.PhotoPathSize("j", b"path"),
    ])
    info = photo_info(photo)
    assert (info.id, info.access_hash, info.file_reference, info.dc_id) == (5, 6, b"ref", 4)
    assert (info.size_type, info.size, info.sizes) == ("y", 40000, (("m", 9000), ("y", 40000)))
    assert photo_info(types.PhotoEmpty(id=1)) is None
    assert photo_info(types.Photo(id=1, access_hash=2, file_reference=b"", date=date, dc_id=2,
                                  sizes=[types.PhotoStrippedSize("i", b"x")])) is None
    msg = types.Message(id=3, peer_id=types.PeerChannel(1), date=date, message="hi",
                        media=types.MessageMediaPhoto(photo=photo), grouped_id=77)
    got = message_info(msg)
    assert got.photo == info and got.grouped_id == 77 and got.document is None
