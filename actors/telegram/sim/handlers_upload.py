"""upload.saveFilePart / saveBigFilePart / getFile, and turning parts into documents."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import struct

from telethon.tl import functions, types

from .errors import bad_request
from .handlers_build import Ctx

MAX_PART = 512 * 1024
SMALL_FILE_MAX = 10 * 1024 * 1024
MAX_SMALL_PARTS = 4000
FILE_CHUNK = 1024 * 1024


# saveBigFilePart / saveFilePart on the wire: constructor, file_id, file_part
# (, file_total_parts), then the part as TL bytes (a 1- or 4-byte length, the
# bytes, zero padding to a multiple of 4).  Both sides handle these two by hand
# so the part is never copied: the client sends it as a chunk of its own, the
# server takes it as a view of the frame it arrived in.
_BIG_HEAD = struct.Struct("<Iqii")
_SMALL_HEAD = struct.Struct("<Iqi")
_BIG_ID = functions.upload.SaveBigFilePartRequest.CONSTRUCTOR_ID
_SMALL_ID = functions.upload.SaveFilePartRequest.CONSTRUCTOR_ID


def _tl_bytes_prefix(size: int) -> tuple[bytes, bytes]:
    """TL bytes framing of ``size`` bytes: (length prefix, padding)."""
    if size < 254:
        return bytes((size,)), bytes(-(size + 1) % 4)
    return bytes((254,)) + size.to_bytes(3, "little"), bytes(-size % 4)


def part_request_chunks(request) -> tuple | None:
    """``bytes(request)`` of a save-part request as (head, part, padding), the part
    itself not copied; None for any other request."""
    kind = type(request)
    if kind is functions.upload.SaveBigFilePartRequest:
        head = _BIG_HEAD.pack(_BIG_ID, request.file_id, request.file_part, request.file_total_parts)
    elif kind is functions.upload.SaveFilePartRequest:
        head = _SMALL_HEAD.pack(_SMALL_ID, request.file_id, request.file_part)
    else:
        return None
    data = request.bytes
    if not isinstance(data, bytes):
        return None   # str or a mutable buffer: Telethon's own serialization decides
    prefix, padding = _tl_bytes_prefix(len(data))
    return (head + prefix, data, padding) if padding else (head + prefix, data)


def decode_part_request(data):
    """A save-part request read straight off ``data`` with ``bytes`` a memoryview into
    it (no copy); None for any other request, or anything irregular (the general
    decoder then judges it)."""
    view = memoryview(data)
    if len(view) < _SMALL_HEAD.size + 4:   # the shortest: saveFilePart of 1 byte
        return None
    (constructor,) = struct.unpack_from("<I", view)
    if constructor == _BIG_ID and len(view) >= _BIG_HEAD.size + 4:
        _, file_id, part, total = _BIG_HEAD.unpack_from(view)
        offset = _BIG_HEAD.size
    elif constructor == _SMALL_ID:
        _, file_id, part = _SMALL_HEAD.unpack_from(view)
        offset = _SMALL_HEAD.size
    else:
        return None
    size = view[offset]
    if size < 254:
        start = offset + 1
    else:
        size = int.from_bytes(view[offset + 1:offset + 4], "little")
        start = offset + 4
    if start + size + len(_tl_bytes_prefix(size)[1]) > len(view):
        return None
    part_bytes = view[start:start + size]
    if constructor == _BIG_ID:
        return functions.upload.SaveBigFilePartRequest(file_id, part, total, part_bytes)
    return functions.upload.SaveFilePartRequest(file_id, part, part_bytes)


def valid_part_size(size: int) -> bool:
    return 0 < size <= MAX_PART and size % 1024 == 0 and MAX_PART % size == 0


def _check_bytes(data: bytes) -> None:
    if not data:
        raise bad_request("FILE_PART_EMPTY")
    if len(data) > MAX_PART:
        raise bad_request("FILE_PART_TOO_BIG")


def max_parts(ctx: Ctx) -> int:
    return ctx.world.max_parts_premium if ctx.state.premium(ctx.me()) else ctx.world.max_parts_regular


def save_file_part(ctx: Ctx, req):
    _check_bytes(req.bytes)
    if not 0 <= req.file_part < MAX_SMALL_PARTS:
        raise bad_request("FILE_PART_INVALID")
    ctx.state.save_part(ctx.me(), req.file_id, req.file_part, -1, req.bytes, ctx.now, defer=ctx.world.part_rows_deferred)
    ctx.world.maybe_prune_parts()
    return True


def save_big_file_part(ctx: Ctx, req):
    _check_bytes(req.bytes)
    total = req.file_total_parts
    if total <= 0 or total > max_parts(ctx):
        raise bad_request("FILE_PARTS_INVALID")
    if not 0 <= req.file_part < total:
        raise bad_request("FILE_PART_INVALID")
    if req.file_part != total - 1 and not valid_part_size(len(req.bytes)):
        raise bad_request("FILE_PART_SIZE_INVALID")
    ctx.state.save_part(ctx.me(), req.file_id, req.file_part, total, req.bytes, ctx.now, defer=ctx.world.part_rows_deferred)
    ctx.world.maybe_prune_parts()
    return True


def _assemble(ctx: Ctx, input_file) -> tuple[int, str]:
    """Check the uploaded parts of an InputFile/InputFileBig; returns (doc_id, md5 hex)."""
    me = ctx.me()
    big = isinstance(input_file, types.InputFileBig)
    if not isinstance(input_file, (types.InputFile, types.InputFileBig)):
        raise bad_request("MEDIA_INVALID")
    count = input_file.parts
    if count <= 0 or count > (max_parts(ctx) if big else MAX_SMALL_PARTS):
        raise bad_request("FILE_PARTS_INVALID")
    parts = ctx.state.parts(me, input_file.id, ctx.now - ctx.world.part_ttl_seconds)
    for index in range(count):
        if index not in parts:
            raise bad_request(f"FILE_PART_{index}_MISSING")
        if big and parts[index][0] != count:
            raise bad_request("FILE_PARTS_INVALID")
    sizes = [parts[i][1] for i in range(count)]
    if count > 1 and (not valid_part_size(sizes[0]) or any(s != sizes[0] for s in sizes[:-1])
                      or sizes[-1] > sizes[0]):
        raise bad_request("FILE_PART_SIZE_CHANGED")
    total = sum(sizes)
    if not big and total > SMALL_FILE_MAX:
        raise bad_request("FILE_PARTS_INVALID")
    doc_id = ctx.world.new_document_id()
    path = ctx.state.doc_path(doc_id)
    upload = ctx.state.upload_path(me, input_file.id)
    slot = ctx.state.PART_SLOT
    tmp = path.with_suffix(".tmp")
    if all(s == slot for s in sizes[:-1]):
        # the parts already lie end to end in the upload file: the document is that file
        # (a hard link; drop_parts unlinks the upload's name after the commit)
        if upload.stat().st_size != total:
            os.truncate(upload, total)
        tmp.unlink(missing_ok=True)
        os.link(upload, tmp)
    else:  # smaller parts (Telethon's 128/256 KiB): gather them, in the kernel
        with open(upload, "rb", buffering=0) as src, open(tmp, "wb", buffering=0) as out:
            pos = 0
            for index, size in enumerate(sizes):
                done = 0
                while done < size:
                    n = os.copy_file_range(src.fileno(), out.fileno(), size - done,
                                           index * slot + done, pos + done)
                    if n <= 0:
                        raise OSError(f"short copy of part {index}")
                    done += n
                pos += size
    if not big:
        md5 = hashlib.md5()
        with open(tmp, "rb") as f:
            while block := f.read(FILE_CHUNK):
                md5.update(block)
        if input_file.md5_checksum and input_file.md5_checksum != md5.hexdigest():
            tmp.unlink(missing_ok=True)
            raise bad_request("MD5_CHECKSUM_INVALID")
    os.replace(tmp, path)
    ctx.world.on_rollback(lambda: path.unlink(missing_ok=True))
    return doc_id, total


def document_from_media(ctx: Ctx, media) -> int:
    if isinstance(media, types.InputMediaDocument):
        doc = media.id
        row = ctx.state.document(doc.id) if isinstance(doc, types.InputDocument) else None
        if row is None or doc.access_hash != ctx.state.hash_for(0, "document", doc.id):
            raise bad_request("MEDIA_INVALID")
        return row["id"]
    if not isinstance(media, types.InputMediaUploadedDocument):
        raise bad_request("MEDIA_INVALID")
    input_file = media.file
    doc_id, size = _assemble(ctx, input_file)
    name = input_file.name
    for attr in media.attributes or ():
        if isinstance(attr, types.DocumentAttributeFilename):
            name = attr.file_name
    mime = media.mime_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    ctx.state.run("INSERT INTO documents(id, size, mime_type, file_name, date) VALUES(?,?,?,?,?)",
                  doc_id, size, mime, name or "file", ctx.now)
    ctx.world.after_commit(lambda: ctx.state.drop_parts(ctx.me(), input_file.id))
    return doc_id


def _located_file(ctx: Ctx, loc) -> tuple[object, int, float]:
    """(path, size, mtime) of what an input file location names."""
    if isinstance(loc, types.InputDocumentFileLocation):
        row = ctx.state.document(loc.id)
        if row is None or loc.access_hash != ctx.state.hash_for(0, "document", loc.id):
            raise bad_request("FILE_ID_INVALID")
        return ctx.state.doc_path(row["id"]), row["size"], row["date"]
    if isinstance(loc, types.InputPhotoFileLocation):  # one file per size type, as on Telegram
        row = ctx.state.photo(loc.id)
        if row is None or loc.access_hash != ctx.state.hash_for(0, "photo", loc.id):
            raise bad_request("FILE_ID_INVALID")
        size = ctx.state.one("SELECT size FROM photo_sizes WHERE photo_id=? AND type=?",
                             loc.id, loc.thumb_size)
        if size is None:
            raise bad_request("LOCATION_INVALID")
        return ctx.state.photo_path(loc.id, loc.thumb_size), size[0], row["date"]
    raise bad_request("LOCATION_INVALID")


def get_file(ctx: Ctx, req):
    ctx.me()
    path, file_size, mtime = _located_file(ctx, req.location)
    offset, limit = req.offset, req.limit
    unit = 1024 if req.precise else 4096
    if offset < 0 or offset % unit:
        raise bad_request("OFFSET_INVALID")
    if limit <= 0 or limit % unit or limit > FILE_CHUNK or (not req.precise and FILE_CHUNK % limit):
        raise bad_request("LIMIT_INVALID")
    if offset // FILE_CHUNK != (offset + limit - 1) // FILE_CHUNK:
        raise bad_request("LIMIT_INVALID")
    data = b""
    if offset < file_size:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    return types.upload.File(type=types.storage.FilePartial(), mtime=int(mtime), bytes=data)


HANDLERS = {
    functions.upload.SaveFilePartRequest: save_file_part,
    functions.upload.SaveBigFilePartRequest: save_big_file_part,
    functions.upload.GetFileRequest: get_file,
}
