"""`stashd login`: against the simulated Telegram (code 12345) and a fake client for 2FA."""
from __future__ import annotations

import asyncio
import io
import stat
from types import SimpleNamespace

import pytest
from telethon import errors

from actors.login import LoginError, login_main, sign_in
from config import settings_from_dict


def write_config(tmp_path, sim):
    server, _ = sim
    config = tmp_path / "stashd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[telegram]\nmode = "simulated"\n'
                      f'sim_socket = "{server.socket_path}"\n')
    return config


def answers(*values):
    it = iter(values)
    return lambda _prompt: next(it)


def test_login_against_the_sim_writes_a_0600_session(tmp_path, sim):
    config = write_config(tmp_path, sim)
    out, err = io.StringIO(), io.StringIO()
    code = login_main("alice2", config, prompt=answers("+15550000001", "00000", "12345"),
                      password_prompt=answers(), out=out, err=err)
    assert code == 0, err.getvalue()
    session = tmp_path / "sessions" / "alice2.session"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    text = out.getvalue()
    assert "not valid (1/3)" in text and "Signed in as user" in text
    assert "+15550000001" not in text and "+155*****01" in text
    # signing in again finds the session already authorised
    out = io.StringIO()
    assert login_main("alice2", config, prompt=answers(), out=out, err=err) == 0
    assert "already signed in" in out.getvalue()


def test_failed_login_leaves_no_session_file(tmp_path, sim):
    config = write_config(tmp_path, sim)
    err = io.StringIO()
    code = login_main("nobody", config, prompt=answers("+19990000000", "12345"), out=io.StringIO(), err=err)
    assert code == 1
    assert "no Telegram account" in err.getvalue() and "+19990000000" not in err.getvalue()
    assert not (tmp_path / "sessions" / "nobody.session").exists()


def test_bad_name_and_bad_config_exit_2(tmp_path):
    config = tmp_path / "stashd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[telegram]\nmode = "simulated"\n')
    err = io.StringIO()
    assert login_main("../evil", config, out=io.StringIO(), err=err) == 2
    assert login_main("ok", tmp_path / "missing.toml", out=io.StringIO(), err=io.StringIO()) == 2


class FakeClient:
    """Telethon-shaped client that demands a 2FA password."""

    def __init__(self, path):
        path.write_bytes(b"session")
        self.signed_in = False

    async def connect(self):
        pass

    async def disconnect(self):
        pass

    async def is_user_authorized(self):
        return False

    async def send_code_request(self, phone):
        return SimpleNamespace(phone_code_hash="h")

    async def sign_in(self, phone=None, code=None, password=None, phone_code_hash=None):
        if password is None:
            raise errors.SessionPasswordNeededError(request=None)
        if password != "secret":
            raise errors.PasswordHashInvalidError(request=None)
        self.signed_in = True

    async def get_me(self):
        assert self.signed_in
        return SimpleNamespace(id=7, phone="15551234567", premium=True)


def test_two_step_password_flow(tmp_path):
    settings = settings_from_dict({"daemon": {"state_dir": str(tmp_path)}, "telegram": {"mode": "simulated"}},
                                  base_dir=tmp_path, env={})
    out = io.StringIO()
    result = asyncio.run(sign_in(settings, "dave", prompt=answers("+15551234567", "12345"),
                                 password_prompt=answers("wrong", "secret"), out=out,
                                 client_factory=FakeClient))
    assert result["premium"] and result["phone"] == "+155*****67"
    assert "Wrong password (1/3)" in out.getvalue()
    assert stat.S_IMODE((tmp_path / "sessions" / "dave.session").stat().st_mode) == 0o600

    with pytest.raises(LoginError, match="too many wrong passwords"):
        asyncio.run(sign_in(settings, "erin", prompt=answers("+15551234567", "12345"),
                            password_prompt=answers("a", "b", "c"), out=io.StringIO(),
                            client_factory=FakeClient))
    assert not (tmp_path / "sessions" / "erin.session").exists()
