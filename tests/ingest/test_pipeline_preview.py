"""Previews from Telegram photos (actors.ingest.preview) through the real pipeline: real
AccountActors (real Telethon over the in-process sim), real storage, SetWorker + Phase2.

Rule: the archive's own image wins; else the photo of the set's album (grouped_id)."""
from __future__ import annotations

import asyncio
import io
import os
import zipfile

import pytest

from actors.ingest.index import PREVIEW_MAX_BYTES
from actors.ingest.pipeline import Phase2
from actors.ingest.preview import STAGED_PREFIX, preview_size_type
from actors.account_messages import PhotoInfo
from actors.telegram.sim.samples import png_image, pseudo_random_bytes
from ingest_sim import SimEnv
from test_pipeline import Rig

pytestmark = pytest.mark.timeout(60)


def zip_bytes(cover: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        if cover is not None:
            zf.writestr("pack/cover.png", cover)
        for i in range(2):
            zf.writestr(f"pack/file{i}.bin", os.urandom(50_000))
    return buf.getvalue()


@pytest.fixture
def env(tmp_path, db_url):
    e = SimEnv(tmp_path, db_url)
    yield e
    e.close()


def ingest_and_index(env, rig):
    rig.scan("alice", "sim_source_a", env.source_a)
    outcomes = rig.ingest_ready("alice", env.source_a)
    for o in outcomes:
        assert o.result == "queued", o
        rig.pretend_uploaded(o.transfer_id)
    staged = sorted(p.name for p in (env.tmp / "staging").glob(f"*/{STAGED_PREFIX}*"))
    phase2 = Phase2(env.storage, node="node-1", clock=env.clock, staging_dir=env.tmp / "staging")
    asyncio.run(phase2.index_pending(limit=10))
    metas = {o.transfer_id: env.storage.get_package_meta(o.sha256) for o in outcomes}
    left = list((env.tmp / "staging").glob(f"*/{STAGED_PREFIX}*"))
    return outcomes, metas, staged, left


def post_photo(env, data, *, grouped_id=None, thumbs=None):
    return env.world.post_photo(env.source_a, env.poster.user_id, data, grouped_id=grouped_id,
                                thumbs=thumbs)


def test_album_photo_becomes_the_preview_of_an_archive_without_an_image(env):
    rig = Rig(env)
    photo = png_image("album-cover", 320, 200)
    photo_msg = post_photo(env, photo, grouped_id=4242)
    env.world.post_document(env.source_a, env.poster.user_id, "pack.zip", zip_bytes(), grouped_id=4242)
    env.post("lonely.zip", zip_bytes())                    # no album: no preview
    outcomes, metas, staged, left = ingest_and_index(env, rig)
    by_name = {env.storage.get_archive_set(o.set_key).base_name: metas[o.transfer_id] for o in outcomes}
    assert by_name["pack"].preview == photo
    assert by_name["pack"].preview_name == f"album photo of message {photo_msg}"
    assert by_name["pack"].index_state == "ok" and by_name["pack"].entry_count == 2
    assert by_name["lonely"].preview is None and by_name["lonely"].preview_name is None
    assert staged == [f"{STAGED_PREFIX}album-{photo_msg}.jpg"] and left == []  # consumed by phase 2


def test_the_archive_own_cover_wins_over_the_album_photo(env):
    rig = Rig(env)
    cover = png_image("inside", 64, 48)
    post_photo(env, png_image("outside", 320, 200), grouped_id=77)
    env.world.post_document(env.source_a, env.poster.user_id, "covered.zip", zip_bytes(cover), grouped_id=77)
    [o], metas, staged, left = ingest_and_index(env, rig)
    meta = metas[o.transfer_id]
    assert (meta.preview, meta.preview_name) == (cover, "pack/cover.png")
    assert len(staged) == 1 and left == []   # fetched for phase 2, not used, removed


def test_multi_part_album_photo_over_the_cap_takes_a_smaller_rendition(env):
    rig = Rig(env)
    huge = png_image("huge", 3000, 2000)[:33] + pseudo_random_bytes("huge", PREVIEW_MAX_BYTES + 1)
    thumb = png_image("huge-thumb", 320, 213)
    whole = zip_bytes()
    half = len(whole) // 2 + 1
    photo_msg = post_photo(env, huge, grouped_id=9, thumbs={"m": thumb})
    w = env.world
    w.post_document(env.source_a, env.poster.user_id, "set.zip.001", whole[:half], grouped_id=9)
    w.post_document(env.source_a, env.poster.user_id, "set.zip.002", whole[half:], grouped_id=9)
    post_photo(env, png_image("other album"), grouped_id=10)   # a neighbour of another album
    [o], metas, staged, left = ingest_and_index(env, rig)
    meta = metas[o.transfer_id]
    assert (meta.preview, meta.preview_name) == (thumb, f"album photo of message {photo_msg}")
    assert left == []


def test_preview_size_type_picks_the_largest_under_the_cap():
    info = PhotoInfo(1, 2, b"", 2, "y", 900, (("s", 100), ("m", 400), ("y", 900)))
    assert preview_size_type(info, 1000) == "y"
    assert preview_size_type(info, 500) == "m"
    assert preview_size_type(info, 50) is None
