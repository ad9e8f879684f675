"""``stashd login NAME``: interactive sign-in that writes ``sessions_dir/NAME.session`` (0600).

Phone number, login code, then the 2FA password when the account has one
(``auth.sendCode`` / ``auth.signIn`` / ``SessionPasswordNeededError`` ->
``auth.checkPassword``). Works against real Telegram and against the simulated
one (``telegram.mode = "simulated"``; its login code is ``12345``).

The phone number is only ever shown redacted, api_hash is never shown, and the
session file is created under umask 077 and chmod'ed 0600. A failed sign-in
removes a session file it created, so the daemon does not pick up a half-made
account.
"""
from __future__ import annotations

import asyncio
import getpass as _getpass
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from storage.redact import redact_phone

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_CODE_ATTEMPTS = 3


class LoginError(Exception):
    """Sign-in failed; the message is safe to print."""


def session_path_for(settings, name: str) -> Path:
    if not NAME_RE.match(name) or name.endswith(".session"):
        raise LoginError(f"invalid session name {name!r}: use letters, digits, '_', '-', '.'")
    return Path(settings.daemon.sessions_dir) / f"{name}.session"


async def sign_in(settings, name: str, *, prompt: Callable[[str], str] = input,
                  password_prompt: Callable[[str], str] = _getpass.getpass,
                  out: TextIO | None = None, client_factory: Callable[[Path], Any] | None = None) -> dict:
    """Sign ``name`` in; returns {"name", "user_id", "phone", "premium", "session"} (phone redacted)."""
    from telethon import errors

    out = out or sys.stdout
    path = session_path_for(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    existed = path.exists()
    old_umask = os.umask(0o077)
    try:
        if client_factory is not None:
            client = client_factory(path)
        else:
            from actors.telegram.client import build_client
            client = build_client(settings, path)
    finally:
        os.umask(old_umask)
    ok = False
    try:
        await client.connect()
        if await client.is_user_authorized():
            print(f"{name}: this session is already signed in.", file=out)
        else:
            await _interactive(client, prompt, password_prompt, out, errors)
        me = await client.get_me()
        ok = True
        return {"name": name, "user_id": me.id, "phone": redact_phone(getattr(me, "phone", None)),
                "premium": bool(getattr(me, "premium", False)), "session": str(path)}
    finally:
        try:
            await client.disconnect()
        except Exception:
            pass
        if path.exists():
            os.chmod(path, 0o600)
            if not ok and not existed:
                path.unlink()
                for extra in (path.with_name(path.name + "-journal"),):
                    if extra.exists():
                        extra.unlink()


async def _interactive(client, prompt, password_prompt, out, errors) -> None:
    phone = prompt("Phone number (international format, e.g. +15551234567): ").strip()
    if not phone:
        raise LoginError("no phone number given")
    print(f"Sending a login code to {redact_phone(phone)} ...", file=out)
    try:
        sent = await client.send_code_request(phone)
    except errors.PhoneNumberInvalidError:
        raise LoginError(f"Telegram says {redact_phone(phone)} is not a valid phone number") from None
    except errors.FloodWaitError as exc:
        raise LoginError(f"too many attempts: Telegram asks to wait {exc.seconds} s") from None
    for attempt in range(1, MAX_CODE_ATTEMPTS + 1):
        code = prompt("Login code: ").strip()
        try:
            await client.sign_in(phone=phone, code=code, phone_code_hash=sent.phone_code_hash)
            return
        except errors.SessionPasswordNeededError:
            break
        except (errors.PhoneCodeInvalidError, errors.PhoneCodeEmptyError):
            print(f"That code is not valid ({attempt}/{MAX_CODE_ATTEMPTS}).", file=out)
        except errors.PhoneCodeExpiredError:
            raise LoginError("the login code expired; run stashd login again") from None
        except errors.PhoneNumberUnoccupiedError:
            raise LoginError(f"{redact_phone(phone)} has no Telegram account; sign up in an app first") from None
    else:
        raise LoginError("too many invalid codes")
    for attempt in range(1, MAX_CODE_ATTEMPTS + 1):
        password = password_prompt("Two-step verification password: ")
        try:
            await client.sign_in(password=password)
            return
        except errors.PasswordHashInvalidError:
            print(f"Wrong password ({attempt}/{MAX_CODE_ATTEMPTS}).", file=out)
    raise LoginError("too many wrong passwords")


def login_main(name: str, config_path: Path, *, prompt: Callable[[str], str] = input,
               password_prompt: Callable[[str], str] = _getpass.getpass,
               out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``stashd login`` command: 0 signed in, 1 sign-in failed, 2 bad config or name."""
    from config import load_or_report

    out, err = out or sys.stdout, err or sys.stderr
    settings = load_or_report(config_path, err=err)
    if settings is None:
        return 2
    try:
        session_path_for(settings, name)
    except LoginError as exc:
        print(f"stashd login: {exc}", file=err)
        return 2
    try:
        result = asyncio.run(sign_in(settings, name, prompt=prompt, password_prompt=password_prompt, out=out))
    except LoginError as exc:
        print(f"stashd login: {exc}", file=err)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("\nstashd login: cancelled", file=err)
        return 1
    except (ConnectionError, OSError) as exc:
        print(f"stashd login: cannot reach Telegram: {exc}", file=err)
        return 1
    except Exception as exc:  # an RPC error we did not expect: show its class and message, no secrets
        print(f"stashd login: {type(exc).__name__}: {exc}", file=err)
        return 1
    premium = " (Premium)" if result["premium"] else ""
    print(f"Signed in as user {result['user_id']} {result['phone'] or ''}{premium}; "
          f"session written to {result['session']} (mode 0600).", file=out)
    return 0
