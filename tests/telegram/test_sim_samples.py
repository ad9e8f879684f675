"""Sample archives and the seeded source channels: real archives of every naming scheme,
forwards sharing a document id, re-uploads sharing bytes, holes left by deleted posts."""
from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import time
import zipfile

import py7zr
import pytest
import rarfile

from actors.telegram.sim import samples
from actors.telegram.sim.seed import seed_world
from actors.telegram.sim.world import SimWorld

SCHEMES = {"zip", "zip.001", "z01", "partN.rar", "rNN", "7z", "7z.001", "rar"}


def by_name(scale: float = 1.0) -> dict[tuple[str, str], samples.ArchiveSet]:
    return {(x.channel, x.name): x for x in samples.expected_sets(scale)}


def test_every_naming_scheme_and_every_outcome_is_seeded():
    sets = samples.expected_sets()
    assert {x.scheme for x in sets} == SCHEMES
    outcomes = {(x.expect, x.reason) for x in sets}
    assert outcomes == {("ingest", ""), ("ingest", "encrypted"), ("ingest", "corrupt"),
                        ("skip", "duplicate"), ("skip", "incomplete_set")}
    assert any(x.has_preview for x in sets)
    channels = {(x.channel, x.topic) for x in sets}
    assert {("sim_source_a", None), ("sim_source_b", None), ("sim_forum", "Games"),
            ("sim_forum", "Software")} <= channels
    # the default seed stays small: the demo and many tests seed it
    assert 1 << 20 < sum(x.size for x in sets) < 8 << 20


def test_samples_are_deterministic_across_cache_and_time():
    first = [(x.file_names, x.sha256) for x in samples.expected_sets()]
    samples._catalogue.cache_clear()
    time.sleep(1.1)  # 7z and zip writers must not stamp the current time
    assert [(x.file_names, x.sha256) for x in samples.expected_sets()] == first


def test_zip_schemes_are_real_archives(tmp_path):
    sets = by_name()
    single = sets["sim_source_a", "holiday-photos"]
    archive = zipfile.ZipFile(io.BytesIO(single.parts[0].data))
    assert archive.testzip() is None
    cover = archive.read("holiday-photos/cover.png")
    assert cover.startswith(b"\x89PNG\r\n\x1a\n")

    split = sets["sim_source_a", "project-backup"]
    assert split.file_names == ("project-backup.zip.001", "project-backup.zip.002")
    whole = b"".join(p.data for p in split.parts)
    assert zipfile.ZipFile(io.BytesIO(whole)).testzip() is None

    spanned = sets["sim_source_a", "music-collection"]
    assert spanned.file_names == ("music-collection.z01", "music-collection.zip")
    assert spanned.parts[0].data.startswith(b"PK\x07\x08")
    eocd = spanned.parts[1].data[-22:]
    sig, disk, cd_disk, on_disk, total = struct.unpack("<IHHHH", eocd[:12])
    assert (sig, disk, cd_disk, on_disk, total) == (0x06054B50, 1, 1, 2, 2)
    if shutil.which("zip") and shutil.which("unzip"):
        for part in spanned.parts:
            (tmp_path / part.file_name).write_bytes(part.data)
        subprocess.run(["zip", "-q", "-s", "0", "music-collection.zip", "--out", "joined.zip"],
                       cwd=tmp_path, check=True)
        assert zipfile.ZipFile(tmp_path / "joined.zip").namelist() == [
            "music-collection/side-a.bin", "music-collection/side-b.bin"]

    locked = zipfile.ZipFile(io.BytesIO(sets["sim_source_b", "private"].parts[0].data))
    assert all(info.flag_bits & 1 for info in locked.infolist())
    with pytest.raises(RuntimeError, match="password"):
        locked.read(locked.namelist()[0])
    locked.setpassword(samples.PASSWORD)
    assert locked.testzip() is None

    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(sets["sim_source_b", "broken"].parts[0].data))


def test_7z_and_rar_schemes_are_real_archives(tmp_path):
    sets = by_name()
    assert py7zr.SevenZipFile(io.BytesIO(sets["sim_source_b", "fonts"].parts[0].data)).getnames() == [
        "fonts/part-0.bin", "fonts/part-1.bin"]
    volumes = sets["sim_source_a", "dataset"]
    assert volumes.file_names == ("dataset.7z.001", "dataset.7z.002")
    joined = py7zr.SevenZipFile(io.BytesIO(b"".join(p.data for p in volumes.parts)))
    assert joined.testzip() is None

    for key, first in ((("sim_source_a", "documents"), "documents.part1.rar"),
                       (("sim_source_a", "old-scans"), "old-scans.rar")):
        for part in sets[key].parts:
            (tmp_path / part.file_name).write_bytes(part.data)
        archive = rarfile.RarFile(tmp_path / first)
        assert len(archive.volumelist()) == 3
        assert [i.filename for i in archive.infolist()] == ["vols/bigfile.txt", "vols/smallfile.txt"]
        assert len(archive.read("vols/bigfile.txt")) == 205000  # spans the volumes
    assert sets["sim_source_a", "old-scans"].file_names == ("old-scans.rar", "old-scans.r00", "old-scans.r01")

    (tmp_path / "locked.rar").write_bytes(sets["sim_forum", "locked-notes"].parts[0].data)
    assert rarfile.RarFile(tmp_path / "locked.rar").needs_password()


def test_incomplete_set_misses_a_middle_part_and_duplicates_share_bytes():
    sets = by_name()
    assert sets["sim_source_b", "partial-set"].file_names == ("partial-set.zip.001", "partial-set.zip.003")
    original = sets["sim_source_a", "shared-ebooks"]
    assert sets["sim_source_b", "shared-ebooks"].sha256 == original.sha256
    assert sets["sim_forum", "shared-ebooks"].sha256 == original.sha256
    ingested = samples.expected_ingested()
    assert len(ingested) == len([x for x in samples.expected_sets() if x.expect == "ingest"])


def test_size_scale_grows_generated_archives_but_not_fixtures():
    small = {x.name: x.size for x in samples.expected_sets(0.25)}
    big = {x.name: x.size for x in samples.expected_sets(2.0)}
    assert big["holiday-photos"] > 6 * small["holiday-photos"]
    assert big["documents"] == small["documents"]  # RAR fixtures have one size


def test_bench_sets_are_distinct_multi_part_and_about_the_asked_size():
    sets = list(samples.bench_sets(10, 10 << 20, label="t"))
    assert len({x.sha256 for x in sets}) == 10
    assert {x.scheme for x in sets} == {"zip", "zip.001", "7z.001"}
    assert any(len(x.parts) > 1 for x in sets)
    assert 5 << 20 < sum(x.size for x in sets) < 15 << 20


def test_seeded_world_has_forwards_reuploads_photo_and_holes(tmp_path):
    world = SimWorld(tmp_path / "world", clock=lambda: 1_700_000_000.0)
    try:
        first = seed_world(world, tmp_path / "sessions")
        again = seed_world(world, tmp_path / "sessions")
        assert again["created"]["messages"] == 0
        snapshot = world.inspect()
    finally:
        world.close()
    channels = {c["username"]: c["id"] for c in snapshot["channels"]}
    docs: dict[tuple[str, str], dict] = {}
    for m in snapshot["messages"]:
        if m["document"]:
            name = next(k for k, v in channels.items() if v == m["channel_id"])
            docs[name, m["document"]["file_name"]] = m
    for x in samples.expected_sets():
        for part in x.parts:
            message = docs[x.channel, part.file_name]
            assert message["document"]["size"] == part.size
    a = docs["sim_source_a", "shared-ebooks.zip"]["document"]["id"]
    assert docs["sim_source_b", "shared-ebooks.zip"]["document"]["id"] == a  # a forward
    assert docs["sim_forum", "shared-ebooks.zip"]["document"]["id"] != a  # a re-upload
    photos = {(next(k for k, v in channels.items() if v == m["channel_id"]), m["photo"]["label"]): m
              for m in snapshot["messages"] if m["photo"]}
    assert photos["sim_source_b", "cover.png"]["grouped_id"] is None  # a photo message on its own
    with_album = [x for x in samples.expected_sets() if x.album_photo is not None]
    assert {x.name for x in with_album} == {"holiday-photos", "wallpapers"}
    for x in with_album:  # the photo right before the archive, both in one album
        photo = photos[x.channel, x.album_photo.file_name]
        archive = docs[x.channel, x.parts[0].file_name]
        assert photo["grouped_id"] == archive["grouped_id"] == samples.album_grouped_id(x.channel, x.name)
        assert archive["id"] == photo["id"] + 1 and photo["photo"]["sizes"]
    assert docs["sim_source_a", "README.txt"]["document"]["mime_type"] == "text/plain"
    deleted = [m for m in snapshot["messages"] if m["deleted"]]
    assert {m["channel_id"] for m in deleted} == {channels["sim_source_a"], channels["sim_source_b"],
                                                 channels["sim_forum"]}
    assert first["created"]["channels"] == 4


def test_seeded_bytes_match_the_expected_sets(tmp_path):
    world = SimWorld(tmp_path / "world", clock=lambda: 1_700_000_000.0)
    try:
        seed_world(world, tmp_path / "sessions")
        snapshot = world.inspect()
        for x in samples.expected_sets():
            cid = next(c["id"] for c in snapshot["channels"] if c["username"] == x.channel)
            digest = hashlib.sha256()
            for name in x.file_names:
                msg = next(m for m in snapshot["messages"] if m["channel_id"] == cid and m["document"]
                           and m["document"]["file_name"] == name)
                digest.update(world.document_bytes(cid, msg["id"]))
            assert digest.hexdigest() == x.sha256, x.name
    finally:
        world.close()


def test_pages_around_deleted_posts_are_short_but_history_goes_on(tmp_path):
    import asyncio

    from telethon.tl import functions, types

    from actors.telegram.sim.client import make_sim_client
    from actors.telegram.sim.local import LocalTransport

    world = SimWorld(tmp_path / "world", clock=lambda: 1_700_000_000.0)
    try:
        seed_world(world, tmp_path / "sessions")
        snapshot = world.inspect()
        source_a = next(c["id"] for c in snapshot["channels"] if c["username"] == "sim_source_a")
        live = sorted((m["id"] for m in snapshot["messages"]
                       if m["channel_id"] == source_a and not m["deleted"]), reverse=True)

        async def pages():
            client = make_sim_client(str(tmp_path / "sessions" / "alice.session"),
                                     lambda: LocalTransport(world), flood_sleep_threshold=0)
            await client.connect()
            try:
                peer = await client.get_input_entity("sim_source_a")
                sizes, offset, seen = [], 0, []
                while True:
                    r = await client(functions.messages.GetHistoryRequest(
                        peer=peer, offset_id=offset, offset_date=None, add_offset=0, limit=5,
                        max_id=0, min_id=0, hash=0))
                    assert r.count == len(live)
                    if not r.messages:
                        break
                    sizes.append(len(r.messages))
                    seen += [m.id for m in r.messages if not isinstance(m, types.MessageEmpty)]
                    offset = r.messages[-1].id
                via_telethon = [m.id async for m in client.iter_messages("sim_source_a", limit=None)]
                return sizes, seen, via_telethon
            finally:
                await client.disconnect()

        sizes, seen, via_telethon = asyncio.run(pages())
    finally:
        world.close()
    assert any(n < 5 for n in sizes[:-1])  # a short page that is not the end
    assert seen == live and via_telethon == live


@pytest.mark.parametrize("size, parts", [(7 * 1024, 2), (3 * 1024, 3), (1_000_000, 3), (2 * 1024 * 1024, 2), (10, 2)])
def test_volume_split_has_equal_volumes_and_a_smaller_last_one(size, parts):
    data = samples.pseudo_random_bytes("v", size)
    pieces = samples.volume_split(data, parts)
    assert b"".join(pieces) == data and len(pieces) == parts
    assert len({len(p) for p in pieces[:-1]}) == 1
    assert 0 < len(pieces[-1]) < len(pieces[0])


def test_every_multi_part_sample_ends_with_a_smaller_volume():
    for x in samples.expected_sets():
        if len(x.parts) > 1 and x.scheme in ("zip.001", "7z.001", "partN.rar"):
            sizes = [p.size for p in x.parts]
            assert len(set(sizes[:-1])) == 1 and sizes[-1] < sizes[0], x.name


def test_ingest_readers_see_each_sample_as_expected(tmp_path):
    """The samples against the ingest code that reads them (actors/ingest): one set key
    per set, complete unless it is the incomplete one, and the index state each expects."""
    from actors.ingest.archives import SetPart, detect_archive, set_key, set_status
    from actors.ingest.index import index_archive

    for x in samples.expected_sets():
        names = [detect_archive(p.file_name, p.data[:16]) for p in x.parts]
        assert all(names), x.name
        assert len({set_key(1, None, n) for n in names}) == 1, x.name
        status = set_status([SetPart(n, p.size, ref=p) for n, p in zip(names, x.parts)])
        assert status.complete == (x.reason != "incomplete_set"), x.name
        if not status.complete:
            continue
        folder = tmp_path / x.channel / x.name
        folder.mkdir(parents=True)
        ordered = [part.ref for part in status.ordered]
        assert [p.file_name for p in ordered] == list(x.file_names), x.name  # posted in content order
        for p in ordered:
            (folder / p.file_name).write_bytes(p.data)
        result = index_archive([folder / p.file_name for p in ordered], names=[p.file_name for p in ordered])
        index_state = x.reason if x.reason in ("encrypted", "corrupt") else "ok"
        assert result.state == index_state, (x.name, result.state, result.reason)
        assert (result.preview_name is not None) == x.has_preview, x.name
