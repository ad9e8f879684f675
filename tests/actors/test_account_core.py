"""Account logic without threads: ledger, limits, ranges, conversions."""
from __future__ import annotations

import datetime as dt

import pytest
from telethon.tl import types

from actors.account_core import (
    FloodLedger,
    bare_channel_id,
    check_download_range,
    check_ids,
    json_value,
    message_info,
    request_kind,
    sent_message,
    upload_limit_bytes,
)
from actors.telegram.errors import CoolingDownError, InvalidRangeError
from telethon.tl.functions.upload import SaveBigFilePartRequest

MIB = 1024 * 1024


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_ledger_refuses_until_expiry_and_keeps_later():
    clock = Clock()
    ledger = FloodLedger(clock)
    until = ledger.record("SaveBigFilePartRequest", 30)
    assert until == 1030
    with pytest.raises(CoolingDownError) as err:
        ledger.check("SaveBigFilePartRequest")
    assert err.value.kind == "SaveBigFilePartRequest" and err.value.until == 1030
    ledger.check("GetHistoryRequest")  # other kinds unaffected
    assert ledger.record("SaveBigFilePartRequest", 5) == 1030  # the later one wins
    clock.now = 1030.0
    ledger.check("SaveBigFilePartRequest")
    assert ledger.active() == {}


def test_ledger_load_and_zero_second_wait():
    clock = Clock()
    ledger = FloodLedger(clock)
    ledger.load({"GetFileRequest": 1100.0})
    assert ledger.active() == {"GetFileRequest": 1100.0}
    assert ledger.record("SendMediaRequest", 0) == 1001  # FLOOD_WAIT_0 still means "not now"


def test_upload_limit_from_app_config():
    cfg = json_value(
        types.JsonObject(
            [
                types.JsonObjectValue("upload_max_fileparts_default", types.JsonNumber(4000)),
                types.JsonObjectValue("upload_max_fileparts_premium", types.JsonNumber(8000)),
                types.JsonObjectValue("x", types.JsonArray([types.JsonString("a"), types.JsonNull()])),
            ]
        )
    )
    assert cfg["x"] == ["a", None]
    margin = 64 * MIB
    assert upload_limit_bytes(cfg, True, margin) == 8000 * 512 * 1024 - margin
    assert upload_limit_bytes(cfg, False, margin) == 4000 * 512 * 1024 - margin
    assert upload_limit_bytes({}, True, 0) == 8000 * 512 * 1024  # defaults when missing


@pytest.mark.parametrize(
    "offset,limit",
    [(0, 4096), (MIB, MIB), (4096 * 3, 4096), (MIB - 512 * 1024, 512 * 1024)],
)
def test_download_range_ok(offset, limit):
    check_download_range(offset, limit)


@pytest.mark.parametrize(
    "offset,limit",
    [(1, 4096), (0, 4000), (0, 2 * MIB), (0, 3 * 4096), (MIB - 4096, 8192), (-4096, 4096), (0, 0)],
)
def test_download_range_refused(offset, limit):
    with pytest.raises(InvalidRangeError):
        check_download_range(offset, limit)


def test_ids_and_channel_ids():
    assert check_ids((3, 1)) == [3, 1]
    with pytest.raises(ValueError):
        check_ids(range(101))
    with pytest.raises(ValueError):
        check_ids(())
    assert bare_channel_id(-1001234567) == 1234567
    assert bare_channel_id(1234567) == 1234567
    assert request_kind(SaveBigFilePartRequest(1, 0, 1, b"")) == "SaveBigFilePartRequest"


def _doc_message(msg_id, random_topic=None):
    doc = types.Document(
        id=77, access_hash=5, file_reference=b"ref", date=None, mime_type="application/zip",
        size=123, dc_id=2, attributes=[types.DocumentAttributeFilename("a.zip")],
    )
    reply = types.MessageReplyHeader(forum_topic=True, reply_to_msg_id=random_topic) if random_topic else None
    return types.Message(
        id=msg_id, peer_id=types.PeerChannel(9), date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        message="cap", media=types.MessageMediaDocument(document=doc), reply_to=reply,
    )


def test_message_info_and_sent_message():
    info = message_info(_doc_message(10, random_topic=4))
    assert info.id == 10 and info.text == "cap" and info.topic_id == 4
    assert info.document.file_name == "a.zip" and info.document.size == 123
    assert info.date == dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    assert message_info(None) is None and message_info(types.MessageEmpty(3, None)) is None
    updates = types.Updates(
        updates=[
            types.UpdateMessageID(id=10, random_id=42),
            types.UpdateNewChannelMessage(_doc_message(10), pts=1, pts_count=1),
        ],
        users=[], chats=[], date=None, seq=0,
    )
    msg_id, message = sent_message(updates, 42)
    assert msg_id == 10 and message.id == 10


def test_rpc_error_name_recovers_telegrams_error_string():
    from telethon.errors import rpc_message_to_error
    from telethon.tl.types import RpcError as TlRpcError

    from actors.account_core import rpc_error_name

    def err(message):
        return rpc_message_to_error(TlRpcError(400, message), None)

    assert err("MEDIA_INVALID").message == "BAD_REQUEST"  # what Telethon keeps
    assert rpc_error_name(err("MEDIA_INVALID")) == "MEDIA_INVALID"
    assert rpc_error_name(err("FILE_PART_0_MISSING")) == "FILE_PART_0_MISSING"
    assert rpc_error_name(err("FILE_PART_7_MISSING")) == "FILE_PART_7_MISSING"
    assert rpc_error_name(err("SOMETHING_NEW_FROM_TELEGRAM")) == "SOMETHING_NEW_FROM_TELEGRAM"
