"""Request dispatch: TL bytes in, TL bytes out; account/help/updates/auth handlers."""

from __future__ import annotations

import hashlib
import hmac
import struct

from telethon.extensions import BinaryReader
from telethon.tl import functions, types
from telethon.tl.tlobject import TLObject

from . import handlers_messages, handlers_upload
from .errors import SimRpcError, bad_request, unauthorized
from .handlers_build import Ctx, tl_date, tl_user

VECTOR = 0x1CB5C415
BOOL_TRUE = 0x997275B5
BOOL_FALSE = 0xBC799737

# Requests a key with no signed-in user may make (everything else: AUTH_KEY_UNREGISTERED).
ANONYMOUS_OK = {
    "GetConfigRequest", "GetAppConfigRequest", "SendCodeRequest", "SignInRequest",
    "ImportAuthorizationRequest", "PingRequest", "PingDelayDisconnectRequest",
    "GetNearestDcRequest",
}

WRAPPERS = (
    functions.InvokeWithLayerRequest, functions.InitConnectionRequest,
    functions.InvokeWithoutUpdatesRequest, functions.InvokeAfterMsgRequest,
    functions.InvokeAfterMsgsRequest, functions.InvokeWithTakeoutRequest,
    functions.InvokeWithMessagesRangeRequest,
)


def unwrap(request):
    while isinstance(request, WRAPPERS):
        request = request.query
    return request


def decode(data: bytes):
    with BinaryReader(data) as reader:
        return reader.tgread_object()


def encode(result) -> bytes:
    if result is True:
        return struct.pack("<I", BOOL_TRUE)
    if result is False:
        return struct.pack("<I", BOOL_FALSE)
    if isinstance(result, list):
        return struct.pack("<Ii", VECTOR, len(result)) + b"".join(encode(x) for x in result)
    if isinstance(result, TLObject):
        return bytes(result)
    raise TypeError(f"cannot encode result {result!r}")


# -- help ---------------------------------------------------------------------------

def get_config(ctx: Ctx, req):
    world = ctx.world
    options = [
        types.DcOption(id=dc, ip_address=world.host, port=world.port) for dc in range(1, 6)
    ]
    return types.Config(
        date=tl_date(ctx.now), expires=tl_date(ctx.now + 3600), test_mode=False,
        this_dc=world.dc_id, dc_options=options, dc_txt_domain_name="sim.invalid",
        chat_size_max=200, megagroup_size_max=200000, forwarded_count_max=100,
        online_update_period_ms=210000, offline_blur_timeout_ms=5000,
        offline_idle_timeout_ms=30000, online_cloud_timeout_ms=300000,
        notify_cloud_delay_ms=30000, notify_default_delay_ms=1500,
        push_chat_period_ms=60000, push_chat_limit=2, edit_time_limit=172800,
        revoke_time_limit=2147483647, revoke_pm_time_limit=2147483647,
        rating_e_decay=2419200, stickers_recent_limit=200,
        channels_read_media_period=604800, call_receive_timeout_ms=20000,
        call_ring_timeout_ms=90000, call_connect_timeout_ms=30000,
        call_packet_timeout_ms=10000, me_url_prefix="https://t.me/",
        caption_length_max=1024, message_length_max=4096, webfile_dc_id=4,
    )


def get_app_config(ctx: Ctx, req):
    def entry(key, value):
        return types.JsonObjectValue(key, types.JsonNumber(float(value)))

    return types.help.AppConfig(hash=1, config=types.JsonObject([
        entry("upload_max_fileparts_default", ctx.world.max_parts_regular),
        entry("upload_max_fileparts_premium", ctx.world.max_parts_premium),
    ]))


def ping(ctx: Ctx, req):
    return types.Pong(msg_id=0, ping_id=req.ping_id)


# -- users / updates ------------------------------------------------------------------

def get_users(ctx: Ctx, req):
    out = []
    for input_user in req.id:
        if isinstance(input_user, types.InputUserSelf):
            out.append(tl_user(ctx, ctx.user_row()))
        elif isinstance(input_user, types.InputUser):
            row = ctx.state.user(input_user.user_id)
            if row is not None and input_user.access_hash == ctx.state.hash_for(
                    ctx.me(), "user", row["id"]):
                out.append(tl_user(ctx, row))
    return out


def get_state(ctx: Ctx, req):
    ctx.me()
    return types.updates.State(pts=1, qts=0, date=tl_date(ctx.now), seq=0, unread_count=0)


def get_difference(ctx: Ctx, req):
    ctx.me()
    return types.updates.DifferenceEmpty(date=tl_date(ctx.now), seq=0)


def get_channel_difference(ctx: Ctx, req):
    from .handlers_build import readable_channel
    channel_id = readable_channel(ctx, req.channel)
    pts = ctx.state.channel(channel_id)["pts"]
    return types.updates.ChannelDifferenceEmpty(pts=pts, final=True)


# -- auth ---------------------------------------------------------------------------------

def _code_hash(ctx: Ctx, phone: str) -> str:
    digits = "".join(c for c in phone if c.isdigit())
    return hmac.new(ctx.state.secret, f"code:{digits}".encode(), hashlib.sha256).hexdigest()[:16]


def send_code(ctx: Ctx, req):
    return types.auth.SentCode(
        type=types.auth.SentCodeTypeApp(length=5), phone_code_hash=_code_hash(ctx, req.phone_number)
    )


def sign_in(ctx: Ctx, req):
    if req.phone_code_hash != _code_hash(ctx, req.phone_number):
        raise bad_request("PHONE_CODE_EXPIRED")
    if req.phone_code != ctx.world.login_code:
        raise bad_request("PHONE_CODE_INVALID")
    row = ctx.state.user_by_phone(req.phone_number)
    if row is None:
        raise bad_request("PHONE_NUMBER_UNOCCUPIED")
    ctx.state.bind_key(ctx.auth_key_id, row["id"])
    ctx.user_id = row["id"]
    return types.auth.Authorization(user=tl_user(ctx, row))


def export_authorization(ctx: Ctx, req):
    me = ctx.me()
    token = hmac.new(ctx.state.secret, f"export:{me}".encode(), hashlib.sha256).digest()
    return types.auth.ExportedAuthorization(id=me, bytes=token)


def import_authorization(ctx: Ctx, req):
    token = hmac.new(ctx.state.secret, f"export:{req.id}".encode(), hashlib.sha256).digest()
    row = ctx.state.user(req.id)
    if row is None or not hmac.compare_digest(token, req.bytes):
        raise bad_request("AUTH_BYTES_INVALID")
    ctx.state.bind_key(ctx.auth_key_id, row["id"])
    ctx.user_id = row["id"]
    return types.auth.Authorization(user=tl_user(ctx, row))


def log_out(ctx: Ctx, req):
    ctx.me()
    ctx.state.bind_key(ctx.auth_key_id, None)
    return types.auth.LoggedOut()


HANDLERS = {
    functions.help.GetConfigRequest: get_config,
    functions.help.GetAppConfigRequest: get_app_config,
    functions.PingRequest: ping,
    functions.PingDelayDisconnectRequest: ping,
    functions.users.GetUsersRequest: get_users,
    functions.updates.GetStateRequest: get_state,
    functions.updates.GetDifferenceRequest: get_difference,
    functions.updates.GetChannelDifferenceRequest: get_channel_difference,
    functions.auth.SendCodeRequest: send_code,
    functions.auth.SignInRequest: sign_in,
    functions.auth.ExportAuthorizationRequest: export_authorization,
    functions.auth.ImportAuthorizationRequest: import_authorization,
    functions.auth.LogOutRequest: log_out,
    **handlers_messages.HANDLERS,
    **handlers_upload.HANDLERS,
}


def handle(ctx: Ctx, request):
    """Run one (already unwrapped) request; returns a TL result or raises SimRpcError."""
    handler = HANDLERS.get(type(request))
    if handler is None:
        raise bad_request(f"METHOD_NOT_SIMULATED_{type(request).__name__.upper()}")
    if ctx.user_id is None and type(request).__name__ not in ANONYMOUS_OK:
        raise unauthorized()
    return handler(ctx, request)


__all__ = ["SimRpcError", "Ctx", "decode", "encode", "handle", "unwrap"]
