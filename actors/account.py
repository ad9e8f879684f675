"""AccountActor: the only owner of one Telegram session and its TelegramClient.

Created, used and closed on the actor's own thread (a LoopActor: that thread runs
the client's asyncio loop for the actor's whole life).  Handlers are ``async`` so
many requests (e.g. a window of upload parts) are in flight at once on the loop.

Start-up failures: a connection error raises from ``on_start`` (pykka stops the
actor; the supervisor replaces it with backoff).  A session that is not
authorized is not a transient fault: the actor stays alive in state "error",
reports the reason in GetAccountInfo, and refuses work with
AccountUnavailableError.

FloodWait: the client's flood_sleep_threshold is 0, so every FLOOD_WAIT reaches
here.  It is recorded in the persisted ledger (storage), counted in metrics,
told to the optional ``listener`` actor as FloodWaitHit, and returned to the
caller as FloodWaitError.  A request kind still cooling down per the ledger
(loaded from storage at start, so it survives restarts) is refused locally with
CoolingDownError without calling Telegram.
"""
from __future__ import annotations

import asyncio
import mimetypes
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from loguru import logger
from telethon import errors as tg_errors
from telethon.tl import functions, types

from actors.account_core import (
    AccountMetrics,
    FloodLedger,
    bare_channel_id,
    check_download_range,
    check_ids,
    json_value,
    message_info,
    request_kind,
    rpc_error_name,
    sent_message,
    upload_limit_bytes,
)
from actors.account_messages import (
    AccountInfoResult,
    AccountStateChanged,
    ChannelInfo,
    DeletedResult,
    DeleteMessages,
    DialogsResult,
    DocumentSentResult,
    DownloadPhoto,
    DownloadRange,
    FloodWaitHit,
    GetAccountInfo,
    GetDialogs,
    GetHistory,
    GetMessages,
    HistoryResult,
    ListTopics,
    MessagesResult,
    PartUploadedResult,
    PartsUploadedResult,
    Pause,
    Resume,
    SearchMessages,
    SendDocument,
    TopicInfo,
    TopicsResult,
    UploadPart,
    UploadParts,
)
from actors.base import LoopActor
from actors.supervision import SupervisedMixin
from actors.telegram.errors import (
    AccountPausedError,
    AccountUnavailableError,
    ChannelNotFoundError,
    CoolingDownError,
    FilePartMissingError,
    FloodWaitError,
    InvalidRangeError,
    RpcError,
    TelegramError,
)

__all__ = ["AccountActor", "NOT_AUTHORIZED"]

NOT_AUTHORIZED = "session not authorized; run stashd login {name}"

_FLOOD_ERRORS = (
    tg_errors.FloodWaitError,
    tg_errors.FloodPremiumWaitError,
    tg_errors.FloodTestPhoneWaitError,
    tg_errors.SlowModeWaitError,
)
_TELEGRAM_FAILURES = (tg_errors.RPCError, ConnectionError, OSError, TimeoutError)


def _part_request(msg: UploadPart) -> Any:
    if msg.big:
        return functions.upload.SaveBigFilePartRequest(
            file_id=msg.file_id, file_part=msg.index, file_total_parts=msg.total, bytes=msg.data
        )
    return functions.upload.SaveFilePartRequest(file_id=msg.file_id, file_part=msg.index, bytes=msg.data)


def _part_outcome(msg: UploadPart, request: Any, ok: Any) -> PartUploadedResult:
    """Telegram answers a saved part with true; anything else is a refusal."""
    if not ok:
        raise RpcError(request_kind(request), None, f"part {msg.index} refused")
    return PartUploadedResult(msg.file_id, msg.index, len(msg.data))


class AccountActor(SupervisedMixin, LoopActor):
    """One Telegram account.  See module doc and actors.account_messages."""

    def __init__(
        self,
        name: str,
        session_path: Path | str,
        settings: Any,
        storage: Any,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
        *,
        listener: Any = None,
        client_factory: Callable[[], Any] | None = None,
        paused: bool = False,
    ):
        super().__init__()
        self.name = name
        self._session_path = Path(session_path)
        self._settings = settings
        self._storage = storage
        self._clock = clock
        self._listener = listener
        self._client_factory = client_factory
        self._start_paused = paused
        self._metrics = AccountMetrics(metrics, name)
        self._ledger = FloodLedger(clock)
        self._log = logger.bind(actor="account", account=name)
        self._client: Any = None
        self._state = "starting"
        self._error: str | None = None
        self._user_id: int | None = None
        self._premium: bool | None = None
        self._limit: int | None = None
        self._phone_redacted: str | None = None
        self._peers: dict[int, Any] = {}
        self._handlers: dict[type, Callable[[Any], Any]] = {
            GetAccountInfo: self._info,
            GetDialogs: self._dialogs,
            GetHistory: self._history,
            ListTopics: self._topics,
            DownloadRange: self._download,
            DownloadPhoto: self._download_photo,
            UploadPart: self._upload_part,
            UploadParts: self._upload_parts,
            SendDocument: self._send_document,
            GetMessages: self._get_messages,
            DeleteMessages: self._delete_messages,
            SearchMessages: self._search,
            Pause: self._pause,
            Resume: self._resume,
        }

    def __str__(self) -> str:
        return f"AccountActor({self.name})"

    # -- life cycle --------------------------------------------------------------------
    async def on_start(self) -> None:
        record = self._storage.get_account(self.name)  # before "starting" overwrites a pause
        paused = self._start_paused or (record is not None and record.state == "paused")
        self._set_state("starting")
        self._ledger.load(self._storage.active_flood_waits(self.name))
        if self._client_factory is not None:
            self._client = self._client_factory()
        else:
            from actors.telegram.client import build_client

            self._client = build_client(self._settings, self._session_path)
        await self._client.connect()  # connection errors raise: the supervisor retries
        if not await self._client.is_user_authorized():
            self._error = NOT_AUTHORIZED.format(name=self.name)
            self._log.error("{}", self._error)
            self._set_state("error")
            return
        me = await self._request("GetUsersRequest", self._client.get_me)
        self._user_id, self._premium = me.id, bool(getattr(me, "premium", False))
        app_config: dict = {}
        try:
            raw = await self._request(
                "GetAppConfigRequest", lambda: self._client(functions.help.GetAppConfigRequest(hash=0))
            )
            app_config = json_value(getattr(raw, "config", None)) or {}
        except TelegramError as exc:
            self._log.warning("help.getAppConfig failed ({}); using default part limits", exc)
        margin = self._settings.telegram.upload_limit_margin_bytes
        self._limit = upload_limit_bytes(app_config, self._premium, margin)
        state = "paused" if paused else "ready"
        saved = self._storage.upsert_account(
            self.name,
            user_id=self._user_id,
            phone=getattr(me, "phone", None),
            premium=self._premium,
            upload_limit_bytes=self._limit,
            state=state,
        )
        self._phone_redacted = saved.phone_redacted
        self._set_state(state, persist=False)
        self._log.info(
            "account ready: user {} premium={} upload limit {} B, state {}",
            self._user_id, self._premium, self._limit, state,
        )

    def on_stop(self) -> None:
        if self._state != "paused" and self._state != "error":
            self._set_state("stopped")

    def on_failure(self, exc_type, exc_value, tb) -> None:
        self._log.opt(exception=(exc_type, exc_value, tb)).error("account actor failed")
        super().on_failure(exc_type, exc_value, tb)  # SupervisedMixin: report the death now

    async def on_teardown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the ending
                self._log.warning("disconnect failed: {!r}", exc)

    # -- dispatch ----------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        handler = self._handlers.get(type(message))
        if handler is None:
            raise TypeError(f"{self} does not handle {type(message).__name__}")
        return handler(message)

    # -- state -------------------------------------------------------------------------
    def _set_state(self, state: str, *, persist: bool = True) -> None:
        self._state = state
        if persist:
            self._storage.set_account_state(self.name, state)
        self._metrics.state(state)
        if self._listener is not None:
            try:
                self._listener.tell(AccountStateChanged(self.name, state))
            except Exception:  # noqa: BLE001 - a dead listener must not stop the account
                pass

    def _ensure_working(self) -> None:
        if self._state == "error":
            raise AccountUnavailableError(self.name, self._error or "error")
        if self._state == "paused":
            raise AccountPausedError(self.name)
        if self._client is None or self._state not in ("ready", "cooling_down"):
            raise AccountUnavailableError(self.name, f"state {self._state}")

    def _info(self, _msg: GetAccountInfo) -> AccountInfoResult:
        return AccountInfoResult(
            name=self.name,
            user_id=self._user_id,
            premium=self._premium,
            upload_limit_bytes=self._limit,
            phone_redacted=self._phone_redacted,
            state=self._state,
            flood_waits=tuple(self._ledger.active().items()),
            error=self._error,
        )

    def _pause(self, _msg: Pause) -> AccountInfoResult:
        if self._state == "error":
            raise AccountUnavailableError(self.name, self._error or "error")
        if self._state != "paused":
            self._set_state("paused")
            self._log.info("paused")
        return self._info(GetAccountInfo())

    def _resume(self, _msg: Resume) -> AccountInfoResult:
        if self._state == "error":
            raise AccountUnavailableError(self.name, self._error or "error")
        if self._state == "paused":
            self._set_state("ready")
            self._log.info("resumed")
        return self._info(GetAccountInfo())

    # -- the one path every Telegram call takes ----------------------------------------
    async def _request(self, kind: str, call: Callable[[], Awaitable[Any]]) -> Any:
        self._ledger.check(kind)
        try:
            result = await call()
        except _TELEGRAM_FAILURES as exc:
            raise self._failure(kind, exc) from None
        self._metrics.request(kind, "ok")
        return result

    async def _request_many(self, kind: str, requests: list) -> list:
        """Requests of one ``kind`` in one Telethon call (``client([...])``: one
        hand-off to the sender for all); each one's result or error (as _request
        raises it), in order."""
        try:
            self._ledger.check(kind)
        except CoolingDownError as exc:
            return [exc] * len(requests)
        try:
            results = await self._client(requests)
            failures = [None] * len(requests)
        except tg_errors.MultiError as exc:   # some failed: Telethon keeps each one's outcome
            results, failures = exc.results, exc.exceptions
        except _TELEGRAM_FAILURES as exc:
            error = self._failure(kind, exc)
            return [error] * len(requests)
        outcomes = []
        for result, failure in zip(results, failures, strict=True):
            if failure is None:
                self._metrics.request(kind, "ok")
                outcomes.append(result)
            else:
                outcomes.append(self._failure(kind, failure))
        return outcomes

    def _failure(self, kind: str, exc: BaseException) -> Exception:
        """A Telethon failure as the error this actor answers with (recording floods)."""
        if isinstance(exc, _FLOOD_ERRORS):
            req = getattr(exc, "request", None)
            self._forget_telethon_flood(req)
            return self._flooded(request_kind(req) if req is not None else kind, exc.seconds)
        self._metrics.request(kind, "error")
        if isinstance(exc, (tg_errors.FilePartMissingError, tg_errors.FilePart0MissingError)):
            # Telethon gives part 0 a class of its own, without .which
            return FilePartMissingError(kind, getattr(exc, "which", 0))
        if isinstance(exc, tg_errors.RPCError):
            return RpcError(kind, exc.code, rpc_error_name(exc))
        return RpcError(kind, None, f"connection failed: {exc!r}")

    async def _raw(self, request: Any) -> Any:
        return await self._request(request_kind(request), lambda: self._client(request))

    def _flooded(self, kind: str, seconds: float) -> FloodWaitError:
        until = self._ledger.record(kind, seconds)
        self._storage.record_flood_wait(self.name, kind, max(float(seconds), 1.0))
        self._metrics.request(kind, "flood")
        self._metrics.flood(kind, seconds)
        self._log.warning("FloodWait {} s on {} (until {:.0f})", seconds, kind, until)
        if self._listener is not None:
            try:
                self._listener.tell(FloodWaitHit(self.name, kind, float(seconds), until))
            except Exception:  # noqa: BLE001
                pass
        return FloodWaitError(kind, float(seconds), until)

    def _forget_telethon_flood(self, request: Any) -> None:
        """Telethon keeps its own in-memory wait per constructor (wall clock): our
        ledger (persisted, injected clock) is the one authority, so drop Telethon's."""
        waited = getattr(self._client, "_flood_waited_requests", None)
        if waited is not None and request is not None:
            waited.pop(getattr(request, "CONSTRUCTOR_ID", None), None)

    # -- channels ----------------------------------------------------------------------
    async def _entity(self, channel: int | str) -> Any:
        if isinstance(channel, str) and not channel.lstrip("-").isdigit():
            username = channel.lstrip("@")

            async def resolve() -> Any:
                try:
                    return await self._client.get_input_entity(username)
                except ValueError:
                    raise ChannelNotFoundError(channel) from None

            return await self._request("ResolveUsernameRequest", resolve)
        cid = bare_channel_id(int(channel))
        peer = self._cached_peer(cid)
        if peer is None:
            await self._load_dialogs()  # an unseen id: learn access hashes from dialogs once
            peer = self._cached_peer(cid)
        if peer is None:
            raise ChannelNotFoundError(channel)
        return peer

    def _cached_peer(self, cid: int) -> Any:
        peer = self._peers.get(cid)
        if peer is not None:
            return peer
        try:
            peer = self._client.session.get_input_entity(types.PeerChannel(cid))
        except (ValueError, KeyError, TypeError):
            return None
        if isinstance(peer, types.InputPeerChannel):
            self._peers[cid] = peer
            return peer
        return None

    async def _load_dialogs(self) -> list[ChannelInfo]:
        dialogs = await self._request("GetDialogsRequest", self._client.get_dialogs)
        channels = []
        for dialog in dialogs:
            ent = dialog.entity
            if not isinstance(ent, types.Channel):
                continue
            self._peers[ent.id] = types.InputPeerChannel(ent.id, ent.access_hash or 0)
            info = ChannelInfo(
                channel_id=ent.id,
                title=ent.title or "",
                username=ent.username,
                is_forum=bool(getattr(ent, "forum", False)),
                is_admin=bool(ent.creator or ent.admin_rights is not None),
            )
            channels.append(info)
            self._storage.upsert_channel(
                info.channel_id, title=info.title, username=info.username,
                is_forum=info.is_forum, seen_by=self.name,
            )
        return channels

    # -- handlers ----------------------------------------------------------------------
    async def _dialogs(self, _msg: GetDialogs) -> DialogsResult:
        self._ensure_working()
        channels = await self._load_dialogs()
        return DialogsResult(tuple(sorted(channels, key=lambda c: c.channel_id)))

    async def _history(self, msg: GetHistory) -> HistoryResult:
        self._ensure_working()
        if not 1 <= msg.limit <= 100:
            raise ValueError(f"limit {msg.limit}: 1..100 messages per page")
        entity = await self._entity(msg.channel)
        kind = "GetRepliesRequest" if msg.topic_id else "GetHistoryRequest"

        async def fetch() -> list:
            return [
                m
                async for m in self._client.iter_messages(
                    entity, min_id=msg.since_id, reverse=True, limit=msg.limit, reply_to=msg.topic_id
                )
            ]

        found = await self._request(kind, fetch)
        found = [m for m in found if m.id > msg.since_id]
        infos = sorted(
            (message_info(m, msg.topic_id) for m in found if isinstance(m, types.Message)),
            key=lambda i: i.id,
        )
        next_since = max((m.id for m in found), default=msg.since_id)
        return HistoryResult(tuple(infos), next_since)

    async def _topics(self, msg: ListTopics) -> TopicsResult:
        self._ensure_working()
        entity = await self._entity(msg.channel)
        res = await self._raw(
            functions.messages.GetForumTopicsRequest(
                peer=entity, offset_date=None, offset_id=0, offset_topic=0, limit=100
            )
        )
        topics = tuple(
            TopicInfo(t.id, t.title) for t in res.topics if isinstance(t, types.ForumTopic)
        )
        return TopicsResult(topics)

    async def _download(self, msg: DownloadRange) -> bytes:
        self._ensure_working()
        check_download_range(msg.offset, msg.limit)
        doc = msg.document
        location = types.InputDocumentFileLocation(
            id=doc.id, access_hash=doc.access_hash, file_reference=doc.file_reference, thumb_size=""
        )
        request = functions.upload.GetFileRequest(location=location, offset=msg.offset, limit=msg.limit)
        return await self._get_file(request, doc.dc_id)

    async def _get_file(self, request: Any, dc_id: int | None) -> bytes:
        """One upload.getFile, in the file's own DC (Telethon's exported sender) when not ours."""
        home = getattr(self._client.session, "dc_id", None)
        if not dc_id or home is None or dc_id == home:
            result = await self._raw(request)
        else:
            client = self._client

            async def call_other_dc() -> Any:
                sender = await client._borrow_exported_sender(dc_id)
                try:
                    return await client._call(sender, request)
                finally:
                    await client._return_exported_sender(sender)

            result = await self._request("GetFileRequest", call_other_dc)
        if not isinstance(result, types.upload.File):
            raise RpcError("GetFileRequest", None, f"unsupported reply {type(result).__name__}")
        return bytes(result.bytes)

    async def _download_photo(self, msg: DownloadPhoto) -> bytes:
        """One rendition of a photo, whole (InputPhotoFileLocation, 1 MiB requests)."""
        self._ensure_working()
        photo = msg.photo
        size_type = msg.size_type or photo.size_type
        size = dict(photo.sizes).get(size_type, photo.size if size_type == photo.size_type else None)
        if size is not None and size > msg.max_bytes:
            raise InvalidRangeError(f"photo size {size_type} is {size} bytes > {msg.max_bytes}")
        location = types.InputPhotoFileLocation(
            id=photo.id, access_hash=photo.access_hash, file_reference=photo.file_reference,
            thumb_size=size_type)
        chunk, out = 1024 * 1024, bytearray()
        while True:
            request = functions.upload.GetFileRequest(location=location, offset=len(out), limit=chunk)
            data = await self._get_file(request, photo.dc_id)
            out += data
            if len(data) < chunk or (size is not None and len(out) >= size):
                return bytes(out)
            if len(out) > msg.max_bytes:
                raise InvalidRangeError(f"photo size {size_type} is over {msg.max_bytes} bytes")

    async def _upload_part(self, msg: UploadPart) -> PartUploadedResult:
        self._ensure_working()
        request = _part_request(msg)
        return _part_outcome(msg, request, await self._raw(request))

    async def _upload_parts(self, msg: UploadParts) -> PartsUploadedResult:
        """Every part at once, in one Telethon call; errors are per part, in the reply."""
        self._ensure_working()
        requests = [_part_request(p) for p in msg.parts]
        kinds = {request_kind(r) for r in requests}
        if len(kinds) == 1:
            answers = await self._request_many(kinds.pop(), requests)
        else:   # small and big parts mixed: one call per part
            answers = await asyncio.gather(*(self._raw(r) for r in requests), return_exceptions=True)
        outcomes = []
        for part, request, answer in zip(msg.parts, requests, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # cancellation and the like are not a part's outcome
            try:
                outcome = answer if isinstance(answer, Exception) else _part_outcome(part, request, answer)
            except RpcError as exc:
                outcome = exc
            # the tracebacks would keep this loop's frames alive in the other thread
            outcomes.append(outcome.with_traceback(None) if isinstance(outcome, Exception) else outcome)
        return PartsUploadedResult(tuple(outcomes))

    async def _send_document(self, msg: SendDocument) -> DocumentSentResult:
        self._ensure_working()
        entity = await self._entity(msg.channel)
        if msg.big:
            file = types.InputFileBig(id=msg.file_id, parts=msg.total_parts, name=msg.file_name)
        else:
            file = types.InputFile(
                id=msg.file_id, parts=msg.total_parts, name=msg.file_name, md5_checksum=msg.md5 or ""
            )
        mime = msg.mime_type or mimetypes.guess_type(msg.file_name)[0] or "application/octet-stream"
        media = types.InputMediaUploadedDocument(
            file=file,
            mime_type=mime,
            attributes=[types.DocumentAttributeFilename(file_name=msg.file_name)],
            force_file=True,
        )
        reply_to = types.InputReplyToMessage(reply_to_msg_id=msg.topic_id) if msg.topic_id else None
        request = functions.messages.SendMediaRequest(
            peer=entity, media=media, message=msg.caption, random_id=msg.random_id, reply_to=reply_to
        )
        updates = await self._raw(request)
        msg_id, message = sent_message(updates, msg.random_id)
        if msg_id is None:
            raise RpcError("SendMediaRequest", None, "no message id in the reply")
        info = message_info(message) if message is not None else None
        return DocumentSentResult(
            message_id=msg_id,
            document_id=info.document.id if info and info.document else None,
            date=info.date if info else self._clock(),
        )

    async def _get_messages(self, msg: GetMessages) -> MessagesResult:
        self._ensure_working()
        ids = check_ids(msg.ids)
        entity = await self._entity(msg.channel)
        found = await self._request(
            "GetMessagesRequest", lambda: self._client.get_messages(entity, ids=ids)
        )
        return MessagesResult(tuple(message_info(m) for m in found))

    async def _delete_messages(self, msg: DeleteMessages) -> DeletedResult:
        self._ensure_working()
        ids = check_ids(msg.ids)
        entity = await self._entity(msg.channel)
        affected = await self._request(
            "DeleteMessagesRequest", lambda: self._client.delete_messages(entity, ids, revoke=True)
        )
        return DeletedResult(sum(getattr(a, "pts_count", 0) for a in affected))

    async def _search(self, msg: SearchMessages) -> HistoryResult:
        """One page of messages.search (raw: Telethon's iterator ignores ``search`` in topics)."""
        self._ensure_working()
        if not 1 <= msg.limit <= 100:
            raise ValueError(f"limit {msg.limit}: 1..100 messages per page")
        if msg.max_id < 0:
            raise ValueError(f"max_id {msg.max_id} must be >= 0")
        entity = await self._entity(msg.channel)
        request = functions.messages.SearchRequest(
            peer=entity, q=msg.query,
            filter=types.InputMessagesFilterDocument() if msg.documents_only
            else types.InputMessagesFilterEmpty(),
            min_date=None, max_date=None, offset_id=msg.max_id, add_offset=0, limit=msg.limit,
            max_id=0, min_id=0, hash=0, top_msg_id=msg.topic_id)
        res = await self._raw(request)
        found = [m for m in getattr(res, "messages", ())
                 if isinstance(m, types.Message) and (not msg.max_id or m.id < msg.max_id)]
        infos = sorted((message_info(m, msg.topic_id) for m in found), key=lambda i: i.id)
        oldest = min((m.id for m in found), default=0)
        more = len(getattr(res, "messages", ())) >= msg.limit and oldest > 1
        return HistoryResult(tuple(infos), oldest if more else 0)
