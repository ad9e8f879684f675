"""Real Telethon calls against the in-process simulated Telegram."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from telethon import errors
from telethon.tl import functions, types

from actors.telegram.sim.client import make_sim_client
from actors.telegram.sim.local import LocalTransport
from actors.telegram.sim.world import Fault, SimWorld, auth_key_id, write_session_file
from tests.telegram.sim_helpers import Clock


@dataclass
class Env:
    world: SimWorld
    clock: Clock
    tmp: Path
    alice: object
    bob: object
    dest: int
    src: int
    forum: int

    def client(self, user, **kw):
        name = f"s{user.user_id}_{len(list(self.tmp.glob('*.session')))}"
        path = write_session_file(self.tmp / name, user.auth_key)
        kw.setdefault("flood_sleep_threshold", 0)
        return make_sim_client(path, lambda: LocalTransport(self.world), **kw)


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    world = SimWorld(tmp_path / "world", clock=clock, seed=7)
    alice = world.create_user("Alice", username="alice", phone="+15550000001")
    bob = world.create_user("Bob", username="bob", phone="+15550000002", premium=True)
    dest = world.create_channel("Stash", username="stash_archive", admins=[alice.user_id, bob.user_id])
    src = world.create_channel("Source", username="source", members=[alice.user_id, bob.user_id])
    forum = world.create_channel("Forum", username="forum", forum=True, members=[alice.user_id],
                                 admins=[bob.user_id])
    yield Env(world, clock, tmp_path, alice, bob, dest, src, forum)
    world.close()


def run(coro):
    return asyncio.run(coro)


async def connected(env: Env, user, **kw):
    client = env.client(user, **kw)
    await client.connect()
    return client


def test_get_me_reports_premium_and_requests_stay_on_one_thread(env):
    async def main():
        results = []
        for user in (env.alice, env.bob):
            client = await connected(env, user)
            me = await client.get_me()
            results.append((me.id, me.premium, me.username))
            await client.disconnect()
        return results

    assert run(main()) == [(env.alice.user_id, False, "alice"), (env.bob.user_id, True, "bob")]
    names = {entry[1] for entry in env.world.request_log}
    assert {"GetConfigRequest", "GetUsersRequest", "GetStateRequest"} <= names
    assert {entry[2] for entry in env.world.request_log} == {threading.current_thread().name}


def test_dialogs_and_entities_by_username_and_marked_id(env):
    async def main():
        client = await connected(env, env.alice)
        dialogs = await client.get_dialogs()
        by_name = await client.get_entity("stash_archive")
        by_id = await client.get_entity(int(f"-100{env.src}"))
        full = await client(functions.channels.GetFullChannelRequest(by_name))
        assert full.full_chat.id == env.dest and full.full_chat.participants_count == 2
        await client.disconnect()
        return {d.entity.username for d in dialogs}, by_name, by_id

    names, by_name, by_id = run(main())
    assert names == {"stash_archive", "source", "forum"}
    assert by_name.id == env.dest and by_name.admin_rights.post_messages
    assert by_id.id == env.src and by_id.title == "Source"


@pytest.mark.parametrize("size", [3 * 1024 * 1024 + 5, 11 * 1024 * 1024 + 77])
def test_send_file_and_download_back_byte_exact(env, size):
    data = os.urandom(size)

    async def main():
        client = await connected(env, env.alice)
        message = await client.send_file("stash_archive", data, caption="marker-1",
                                         attributes=[types.DocumentAttributeFilename("a.zip")])
        downloaded = await client.download_media(message, file=bytes)
        await client.disconnect()
        return message, downloaded

    message, downloaded = run(main())
    assert message.message == "marker-1" and message.file.name == "a.zip" and message.file.size == size
    assert downloaded == data
    assert env.world.document_bytes(env.dest, message.id) == data
    kinds = {e[1] for e in env.world.request_log}
    assert ("SaveBigFilePartRequest" in kinds) == (size > 10 * 1024 * 1024)


def test_history_in_reverse_over_pages_with_deleted_messages(env):
    ids = [env.world.post_text(env.src, env.alice.user_id, f"m{i}") for i in range(260)]
    deleted = set(ids[10:15]) | {ids[150], ids[-1]}
    env.world.delete_messages(env.src, deleted)
    since = ids[3]

    async def main():
        client = await connected(env, env.alice)
        entity = await client.get_entity("source")
        forward = [m.id async for m in client.iter_messages(entity, min_id=since, reverse=True, wait_time=0)]
        backward = [m.id async for m in client.iter_messages(entity, min_id=since, wait_time=0)]
        await client.disconnect()
        return forward, backward

    forward, backward = run(main())
    expected = [i for i in ids if i > since and i not in deleted]
    assert forward == expected
    assert backward == expected[::-1]
    history = [e for e in env.world.request_log if e[1] == "GetHistoryRequest"]
    assert len(history) >= 3  # 100-message pages


def test_get_messages_and_delete_messages(env):
    ids = [env.world.post_text(env.dest, env.alice.user_id, f"m{i}") for i in range(5)]
    env.world.delete_messages(env.dest, [ids[1]])

    async def main():
        client = await connected(env, env.alice)
        entity = await client.get_entity("stash_archive")
        first = await client.get_messages(entity, ids=[ids[0], ids[1], 99999, ids[2]])
        await client.delete_messages(entity, [ids[2], ids[3]])
        second = await client.get_messages(entity, ids=[ids[2], ids[3], ids[4]])
        with pytest.raises(errors.MessageIdsEmptyError):
            await client(functions.channels.GetMessagesRequest(entity, []))
        await client.disconnect()
        return first, second

    first, second = run(main())
    assert [m.id if m else None for m in first] == [ids[0], None, None, ids[2]]
    assert [m.id if m else None for m in second] == [None, None, ids[4]]


def test_forum_topics_send_and_read_by_topic(env):
    topic = env.world.create_topic(env.forum, "Archives")
    other = env.world.create_topic(env.forum, "Chat")
    env.world.post_text(env.forum, env.bob.user_id, "in other", topic_id=other)
    env.world.post_text(env.forum, env.bob.user_id, "in general")

    async def main():
        client = await connected(env, env.alice)
        entity = await client.get_entity("forum")
        topics = await client(functions.messages.GetForumTopicsRequest(
            peer=entity, offset_date=None, offset_id=0, offset_topic=0, limit=100))
        sent = await client.send_file(entity, b"PK\x05\x06" + bytes(18), file_name="t.zip", reply_to=topic)
        text = await client.send_message(entity, "hello topic", reply_to=topic)
        in_topic = [m async for m in client.iter_messages(entity, reply_to=topic)]
        await client.disconnect()
        return topics, sent, text, in_topic

    topics, sent, text, in_topic = run(main())
    assert {t.title: t.id for t in topics.topics} == {"Archives": topic, "Chat": other, "General": 1}
    assert sent.reply_to.forum_topic and sent.reply_to.reply_to_msg_id == topic
    assert [m.id for m in in_topic] == [text.id, sent.id]


def test_flood_wait_reaches_caller_with_its_seconds(env):
    env.world.set_fault(Fault("flood", request="GetHistoryRequest", seconds=7, account=env.alice.user_id))

    async def main():
        client = await connected(env, env.alice)
        entity = await client.get_entity("source")
        with pytest.raises(errors.FloodWaitError) as info:
            await client.get_messages(entity, limit=10)
        bob = await connected(env, env.bob)
        ok = await bob.get_messages(await bob.get_entity("source"), limit=10)
        await client.disconnect()
        await bob.disconnect()
        return info.value, ok

    error, ok = run(main())
    assert error.seconds == 7
    assert len(ok) == 1  # the channel-created service message


def test_client_survives_dropped_connections(env):
    ids = [env.world.post_text(env.src, env.alice.user_id, f"m{i}") for i in range(120)]
    env.world.set_fault(Fault("drop", request="GetHistoryRequest", fraction=0.5))
    drops = []
    should_drop = env.world.should_drop

    def counting(key, name):
        dropped = should_drop(key, name)
        drops.append(dropped)
        return dropped

    env.world.should_drop = counting

    async def main():
        client = await connected(env, env.alice)
        entity = await client.get_entity("source")
        got = [m.id async for m in client.iter_messages(entity, min_id=1, reverse=True, wait_time=0)]
        still = client.is_connected()
        env.world.clear_faults()
        me = await client.get_me()
        await client.disconnect()
        return got, still, me

    got, still, me = run(main())
    assert got == ids and still and me.id == env.alice.user_id
    assert any(drops) and not all(drops)


def test_forced_disconnect_mid_request_is_resent_after_reconnect(env):
    transports = []

    class FlakyOnce(LocalTransport):
        async def invoke(self, key, name, data):
            if name == "GetHistoryRequest" and len(transports) == 1:
                transports.append("dropped")
                raise ConnectionError("reset by peer")
            return await super().invoke(key, name, data)

    def factory():
        transports.append("opened")
        return FlakyOnce(env.world)

    path = write_session_file(env.tmp / "flaky", env.alice.auth_key)

    async def main():
        client = make_sim_client(path, factory, flood_sleep_threshold=0)
        await client.connect()
        entity = await client.get_entity("source")
        messages = await client.get_messages(entity, limit=5)
        await client.disconnect()
        return messages

    assert [m.id for m in run(main())] == [1]
    assert transports[:3] == ["opened", "dropped", "opened"]


def test_upload_part_rules(env):
    async def main():
        client = await connected(env, env.alice)
        premium = await connected(env, env.bob)
        big = functions.upload.SaveBigFilePartRequest
        cases = [
            (big(1, 0, 3, b"x" * 1000), errors.FilePartSizeInvalidError),      # not % 1024
            (big(1, 0, 3, b"x" * 3072), errors.FilePartSizeInvalidError),      # 524288 % 3072 != 0
            (big(1, 0, 3, b"x" * (1024 * 1024)), errors.FilePartTooBigError),
            (big(1, 0, 4001, b"x" * 1024), errors.FilePartsInvalidError),     # > 4000 parts, regular
            (big(1, 5, 3, b"x" * 1024), errors.FilePartInvalidError),
            (functions.upload.SaveFilePartRequest(1, 0, b""), errors.FilePartEmptyError),
        ]
        raised = []
        for request, expected in cases:
            with pytest.raises(expected):
                await client(request)
            raised.append(expected)
        assert await client(big(2, 2, 3, b"x" * 10)) is True  # the last part may be short
        assert await premium(big(3, 0, 4001, b"x" * 1024)) is True  # premium: 8000 parts
        # unequal parts are refused when the file is sent
        await client(big(4, 0, 2, b"x" * 2048))
        await client(big(4, 1, 2, b"x" * 4096))
        entity = await client.get_entity("stash_archive")
        with pytest.raises(errors.FilePartSizeChangedError):
            await client(functions.messages.SendMediaRequest(
                entity, types.InputMediaUploadedDocument(types.InputFileBig(4, 2, "f"), "a/b", []),
                "", random_id=11))
        await client.disconnect()
        await premium.disconnect()
        return raised

    assert len(run(main())) == 6


def test_file_part_missing_after_expiry_and_for_a_gap(env):
    async def main():
        client = await connected(env, env.alice)
        entity = await client.get_entity("stash_archive")
        uploaded = await client.upload_file(os.urandom(600 * 1024), file_name="x.bin")
        env.clock.now += env.world.part_ttl_seconds + 1
        # Telethon maps part 0 to its own class (FilePart0MissingError, no .which)
        with pytest.raises(errors.FilePart0MissingError) as expired:
            await client.send_file(entity, uploaded)
        for part in (0, 1, 2, 4):
            await client(functions.upload.SaveFilePartRequest(77, part, b"y" * 1024))
        with pytest.raises(errors.FilePartMissingError) as gap:
            await client(functions.messages.SendMediaRequest(
                entity, types.InputMediaUploadedDocument(types.InputFile(77, 5, "g", ""), "a/b", []),
                "", random_id=5))
        await client.disconnect()
        return type(expired.value).__name__, gap.value.which

    assert run(main()) == ("FilePart0MissingError", 3)


def test_random_id_deduplicates_per_account(env):
    async def send(user, random_id):
        client = await connected(env, user)
        entity = await client.get_entity("stash_archive")
        handle = await client.upload_file(b"payload" * 100, file_name="p.bin")
        request = functions.messages.SendMediaRequest(
            entity, types.InputMediaUploadedDocument(handle, "application/octet-stream", []),
            "cap", random_id=random_id)
        first = await client(request)
        again = await client(functions.messages.SendMediaRequest(
            entity, types.InputMediaUploadedDocument(handle, "application/octet-stream", []),
            "cap", random_id=random_id))
        await client.disconnect()
        return first, again

    def ids(updates):
        assert isinstance(updates, types.Updates)
        mapped = [u for u in updates.updates if isinstance(u, types.UpdateMessageID)]
        new = [u for u in updates.updates if isinstance(u, types.UpdateNewChannelMessage)]
        assert mapped[0].id == new[0].message.id
        return mapped[0].id

    a1, a2 = run(send(env.alice, 4242))
    b1, _ = run(send(env.bob, 4242))
    assert ids(a1) == ids(a2)
    assert ids(b1) != ids(a1)
    live = [m for m in env.world.inspect()["messages"] if m["channel_id"] == env.dest and m["document"]]
    assert len(live) == 2


def test_access_hash_is_per_account(env):
    async def main():
        alice = await connected(env, env.alice)
        channel = await alice.get_entity("source")
        bob = await connected(env, env.bob)
        stolen = types.InputPeerChannel(channel.id, channel.access_hash)
        with pytest.raises(errors.ChannelInvalidError):
            await bob(functions.messages.GetHistoryRequest(stolen, 0, None, 0, 10, 0, 0, 0))
        own = await bob.get_entity("source")
        await alice.disconnect()
        await bob.disconnect()
        return channel.access_hash, own.access_hash

    hash_a, hash_b = run(main())
    assert hash_a != hash_b


def test_get_file_offset_and_limit_rules(env):
    data = os.urandom(2 * 1024 * 1024 + 100)
    msg_id = env.world.post_document(env.dest, env.alice.user_id, "d.bin", data)

    async def main():
        client = await connected(env, env.alice)
        message = await client.get_messages(await client.get_entity("stash_archive"), ids=msg_id)
        doc = message.document
        loc = types.InputDocumentFileLocation(doc.id, doc.access_hash, doc.file_reference, "")
        get = functions.upload.GetFileRequest
        out = {}
        for name, (offset, limit) in {
            "offset_unaligned": (100, 4096), "limit_unaligned": (0, 5000),
            "limit_not_divisor": (0, 12288), "crosses_mib": (1024 * 1024 - 4096, 8192),
            "too_big": (0, 2 * 1024 * 1024),
        }.items():
            try:
                await client(get(loc, offset, limit))
                out[name] = "ok"
            except errors.RPCError as e:
                out[name] = type(e).__name__
        out["ranged"] = (await client(get(loc, 1024 * 1024, 65536))).bytes
        out["tail"] = (await client(get(loc, 2 * 1024 * 1024, 4096))).bytes
        out["past_end"] = (await client(get(loc, 3 * 1024 * 1024, 4096))).bytes
        await client.disconnect()
        return out

    out = run(main())
    assert out["offset_unaligned"] == "OffsetInvalidError"
    for name in ("limit_unaligned", "limit_not_divisor", "crosses_mib", "too_big"):
        assert out[name] == "LimitInvalidError", name
    assert out["ranged"] == data[1024 * 1024: 1024 * 1024 + 65536]
    assert out["tail"] == data[2 * 1024 * 1024:]
    assert out["past_end"] == b""


def test_only_admins_post_to_broadcast_channels(env):
    async def main():
        client = await connected(env, env.alice)
        with pytest.raises(errors.ChatWriteForbiddenError):
            await client.send_message("source", "hi")
        await client.disconnect()

    run(main())


def test_sign_in_with_code_binds_a_new_session(env, tmp_path):
    async def main():
        client = make_sim_client(tmp_path / "fresh.session", lambda: LocalTransport(env.world))
        await client.connect()
        assert not await client.is_user_authorized()
        await client.send_code_request("+15550000002")
        with pytest.raises(errors.PhoneCodeInvalidError):
            await client.sign_in("+15550000002", code="00000")
        await client.sign_in("+15550000002", code="12345")
        me = await client.get_me()
        await client.disconnect()
        # the generated key reached the session file through the auth-key callback
        again = make_sim_client(tmp_path / "fresh.session", lambda: LocalTransport(env.world))
        await again.connect()
        me_again = await again.get_me()
        await again.disconnect()
        return me, me_again

    me, me_again = run(main())
    assert me.id == me_again.id == env.bob.user_id
    assert (tmp_path / "fresh.session").exists()


def test_exported_sender_and_concurrent_requests(env):
    async def main():
        client = await connected(env, env.alice)
        sender = await client._borrow_exported_sender(4)
        users = await client._call(sender, functions.users.GetUsersRequest([types.InputUserSelf()]))
        await client._return_exported_sender(sender)
        results = await asyncio.gather(*(
            client(functions.upload.SaveBigFilePartRequest(9, i, 8, b"z" * 131072)) for i in range(8)))
        await client.disconnect()
        return users[0].id, results

    user_id, results = run(main())
    assert user_id == env.alice.user_id and results == [True] * 8
    keys = {e[0] for e in env.world.request_log}
    assert auth_key_id(env.alice.auth_key) in keys and len(keys) >= 2


def test_search_documents_and_total_count(env):
    env.world.post_text(env.dest, env.alice.user_id, "text only")
    doc = env.world.post_document(env.dest, env.alice.user_id, "a.7z.001", b"7z" * 50, caption="part one")
    env.world.post_document(env.dest, env.alice.user_id, "b.rar", b"Rar!" * 9, caption="other")

    async def main():
        client = await connected(env, env.alice)
        entity = await client.get_entity("stash_archive")
        docs = [m.file.name async for m in client.iter_messages(
            entity, filter=types.InputMessagesFilterDocument, wait_time=0)]
        found = [m.id async for m in client.iter_messages(entity, search="part one", wait_time=0)]
        total = (await client.get_messages(entity, limit=0)).total
        await client.disconnect()
        return docs, found, total

    docs, found, total = run(main())
    assert docs == ["b.rar", "a.7z.001"]
    assert found == [doc]
    assert total == 4  # the channel-created service message counts too


def test_request_fails_cleanly_when_reconnecting_is_impossible(env):
    opened = []

    class DiesOnHistory(LocalTransport):
        async def invoke(self, key, name, data):
            if name == "GetHistoryRequest":
                raise ConnectionError("server went away")
            return await super().invoke(key, name, data)

    def factory():
        opened.append(1)
        if len(opened) > 1:
            raise ConnectionRefusedError("no server")
        return DiesOnHistory(env.world)

    path = write_session_file(env.tmp / "dying", env.alice.auth_key)

    async def main():
        client = make_sim_client(path, factory, connection_retries=2)
        await client.connect()
        entity = await client.get_entity("source")
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(client.get_messages(entity, limit=5), timeout=30)
        connected_after = client.is_connected()
        await client.disconnect()
        return connected_after

    assert run(main()) is False
    assert len(opened) == 1 + 2
