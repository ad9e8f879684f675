"""Messages an AccountActor receives, its replies (ending in Result) and its events.

All frozen: pykka does not copy messages.  Channels are given as an int id
(bare, or marked -100...) or a username string.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ChannelRef = int | str


# -- values --------------------------------------------------------------------------
@dataclass(frozen=True)
class DocumentInfo:
    id: int
    access_hash: int
    file_reference: bytes = field(repr=False)
    size: int
    file_name: str | None
    mime_type: str
    dc_id: int


@dataclass(frozen=True)
class PhotoInfo:
    """A message's photo: what upload.getFile needs for its largest rendition.

    ``size_type``/``size`` name the largest downloadable size (PhotoSize type
    such as "x" or "y", and its bytes); ``sizes`` lists every downloadable
    (type, bytes), smallest first, to pick one under a cap.
    """

    id: int
    access_hash: int
    file_reference: bytes = field(repr=False)
    dc_id: int
    size_type: str
    size: int
    sizes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class MessageInfo:
    id: int
    date: float  # epoch seconds
    text: str
    document: DocumentInfo | None
    topic_id: int | None = None
    photo: PhotoInfo | None = None     # MessageMediaPhoto
    grouped_id: int | None = None      # album: the messages sharing it were sent together


@dataclass(frozen=True)
class ChannelInfo:
    channel_id: int  # bare (positive) channel id
    title: str
    username: str | None
    is_forum: bool
    is_admin: bool


@dataclass(frozen=True)
class TopicInfo:
    topic_id: int
    title: str


# -- commands --------------------------------------------------------------------------
@dataclass(frozen=True)
class GetAccountInfo:
    pass


@dataclass(frozen=True)
class GetDialogs:
    pass


@dataclass(frozen=True)
class GetHistory:
    channel: ChannelRef
    topic_id: int | None = None
    since_id: int = 0
    limit: int = 100


@dataclass(frozen=True)
class ListTopics:
    channel: ChannelRef


@dataclass(frozen=True)
class DownloadRange:
    """Replied with the bytes (shorter than limit at the end of the file)."""

    document: DocumentInfo
    offset: int
    limit: int


@dataclass(frozen=True)
class DownloadPhoto:
    """Replied with the bytes of one rendition of a photo (``size_type`` None: the
    largest), whole: photos are small, fetched in 1 MiB getFile requests up to
    ``max_bytes`` (a larger rendition raises InvalidRangeError before any request)."""

    photo: PhotoInfo
    size_type: str | None = None
    max_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class UploadPart:
    file_id: int
    index: int
    total: int
    data: bytes = field(repr=False)
    big: bool

    def __str__(self) -> str:
        return f"UploadPart(file_id={self.file_id}, index={self.index}/{self.total}, {len(self.data)} B)"


@dataclass(frozen=True)
class UploadParts:
    """Several parts of one file in one ask, sent concurrently (the uploader's
    per-ask hand-off between threads, paid once for them all).

    Replied with PartsUploadedResult: one outcome per part, in order.
    """

    parts: tuple[UploadPart, ...]

    def __str__(self) -> str:
        indexes = ",".join(str(p.index) for p in self.parts)
        return f"UploadParts({len(self.parts)} parts [{indexes}])"


@dataclass(frozen=True)
class SendDocument:
    channel: ChannelRef
    file_id: int
    total_parts: int
    big: bool
    file_name: str
    size: int
    caption: str
    random_id: int
    md5: str | None = None
    topic_id: int | None = None
    mime_type: str | None = None


@dataclass(frozen=True)
class GetMessages:
    channel: ChannelRef
    ids: tuple[int, ...]


@dataclass(frozen=True)
class DeleteMessages:
    channel: ChannelRef
    ids: tuple[int, ...]


@dataclass(frozen=True)
class SearchMessages:
    """messages.search in one channel (or one forum topic): one page, newest first.

    Replied with a HistoryResult: ``messages`` ascending by id (only messages
    whose id is below ``max_id`` when it is not 0), ``next_since_id`` = the
    ``max_id`` of the next (older) page, 0 when there is none.  ``query`` is
    matched by Telegram against the text/caption; ``documents_only`` adds
    InputMessagesFilterDocument.
    """

    channel: ChannelRef
    query: str
    topic_id: int | None = None
    documents_only: bool = False
    max_id: int = 0
    limit: int = 100


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


# -- replies ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AccountInfoResult:
    name: str
    user_id: int | None
    premium: bool | None
    upload_limit_bytes: int | None
    phone_redacted: str | None
    state: str
    flood_waits: tuple[tuple[str, float], ...]  # (request kind, until), sorted by kind
    error: str | None = None


@dataclass(frozen=True)
class DialogsResult:
    channels: tuple[ChannelInfo, ...]


@dataclass(frozen=True)
class HistoryResult:
    messages: tuple[MessageInfo, ...]  # ascending by id
    next_since_id: int


@dataclass(frozen=True)
class TopicsResult:
    topics: tuple[TopicInfo, ...]


@dataclass(frozen=True)
class PartUploadedResult:
    file_id: int
    index: int
    size: int


@dataclass(frozen=True)
class PartsUploadedResult:
    """Per part of an UploadParts, in order: its PartUploadedResult, or the
    error that part met (a TelegramError: FloodWait, FILE_PART_X_MISSING, ...)."""

    outcomes: tuple[PartUploadedResult | BaseException, ...]


@dataclass(frozen=True)
class DocumentSentResult:
    message_id: int
    document_id: int | None
    date: float


@dataclass(frozen=True)
class MessagesResult:
    messages: tuple[MessageInfo | None, ...]  # in request order, None = missing/deleted


@dataclass(frozen=True)
class DeletedResult:
    count: int


# -- events (told to the optional listener) --------------------------------------------
@dataclass(frozen=True)
class FloodWaitHit:
    account: str
    kind: str
    seconds: float
    until: float


@dataclass(frozen=True)
class AccountStateChanged:
    account: str
    state: str
