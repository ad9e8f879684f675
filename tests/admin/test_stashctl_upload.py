"""stashctl upload / transfers / transfer / budget against a live AdminServer with a fake daemon."""
from __future__ import annotations

import io
import json
import threading

import pytest
from admin_helpers import NOW

from actors.admin import ctl
from actors.admin.protocol import COMMANDS, AdminCommandError
from actors.budget_core import Budget, Quota

MiB = 1 << 20
UPLOAD_COMMANDS = COMMANDS | {"upload", "transfers", "transfer", "budget"}


class UploadDaemon:
    """dispatch() for the upload commands. Each "transfer" poll advances
    bytes_done by ``step``; a path containing "bad" fails on its second poll."""

    def __init__(self, step: int = 40 * MiB, size: int = 100 * MiB):
        self.step, self.size = step, size
        self.calls: list[tuple[str, dict]] = []
        self.transfers: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, path: str, **kw) -> dict:
        tid = f"{len(self.transfers) + 1:02d}" + "ab" * 15   # 32 hex chars, like a uuid
        t = {"id": tid, "state": "planned", "source_path": path, "size": self.size,
             "destination": "stash_archive", "account": None, "parts_total": 1, "parts_sent": 0,
             "bytes_done": 0, "duplicate_of": None, "reason": None,
             "created_at": NOW - 300, "updated_at": NOW - 300}
        t.update(kw)
        self.transfers[tid] = t
        return t

    def dispatch(self, cmd: str, args: dict):
        with self._lock:
            self.calls.append((cmd, args))
            return getattr(self, "do_" + cmd)(args)

    def do_upload(self, args):
        refused = [p for p in args["paths"] if "outside" in p]
        if refused:
            raise AdminCommandError(
                "not under an upload root (nothing queued):\n" + "\n".join(f"  {p}" for p in refused),
                code="path_refused")
        out = []
        for p in args["paths"]:
            if p.endswith("dup.bin"):
                out.append(self.add(p, state="uploaded", duplicate_of="99" + "cd" * 15))
            else:
                out.append(self.add(p))
        return {"transfers": [dict(t) for t in out]}

    def do_transfer(self, args):
        t = self.transfers.get(args["id"])
        if t is None:
            raise AdminCommandError(f"no transfer {args['id']!r}", code="not_found")
        n = self.polls[t["id"]] = self.polls.get(t["id"], 0) + 1
        if "bad" in t["source_path"] and n >= 2:
            t.update(state="failed", reason="FILE_PARTS_INVALID from Telegram")
        elif t["state"] in ("planned", "uploading"):
            t["bytes_done"] = min(t["size"], t["bytes_done"] + self.step)
            t.update(state="uploaded" if t["bytes_done"] == t["size"] else "uploading", account="alice")
        parts = [{"index": 0, "offset": 0, "length": t["size"], "file_name": "x.bin",
                  "message_id": 77 if t["state"] == "uploaded" else None, "account": "alice",
                  "sent_at": NOW - 5 if t["state"] == "uploaded" else None}]
        return {**t, "parts": parts}

    def do_transfers(self, args):
        rows = [t for t in self.transfers.values() if args.get("state") in (None, t["state"])]
        return {"transfers": rows[: args["limit"]]}

    def do_budget(self, args):
        budget = Budget(64 * MiB, global_slots=8, per_account_slots=4, clock=lambda: NOW,
                        quotas={"alice": Quota(hourly_files=10, daily_bytes=1000 * MiB)})
        budget.reserve("f1", "alice", 300 * MiB, kind="file")
        for i in range(5):
            budget.reserve(f"p{i}", "alice", 8 * MiB)
        budget.cooldown("bob", NOW + 125)
        budget.reserve("b1", "bob", 8 * MiB)
        return budget.snapshot().to_dict()


@pytest.fixture(autouse=True)
def _no_env_socket(monkeypatch):
    monkeypatch.delenv("STASHD_SOCKET", raising=False)


@pytest.fixture
def fixed_now(monkeypatch):
    monkeypatch.setattr(ctl.time, "time", lambda: NOW)


@pytest.fixture
def up():
    return UploadDaemon()


@pytest.fixture
def sock(start_server, up):
    return str(start_server(up.dispatch, commands=UPLOAD_COMMANDS, read_timeout=5.0).path)


class FakeClock:
    def __init__(self, t: float = 5000.0, interrupt_at: int | None = None):
        self.t, self.sleeps, self.interrupt_at = t, [], interrupt_at

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.interrupt_at is not None and len(self.sleeps) >= self.interrupt_at:
            raise KeyboardInterrupt
        self.t += seconds


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(capsys, *argv, clock=None, stdout=None):
    clock = clock or FakeClock()
    rc = ctl.main(list(argv), sleep=clock.sleep, clock=clock, stdout=stdout)
    out, err = capsys.readouterr()
    return rc, (stdout.getvalue() if stdout is not None else out), err


# ---------------------------------------------------------------- upload


def test_upload_sends_absolute_paths_and_prints_one_line_each(sock, up, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "--socket", sock, "upload", "a.bin", "sub/../dup.bin",
                       "--dest", "@stash", "--caption", "hello", "--delete-original")
    assert rc == 0, err
    assert up.calls == [("upload", {"paths": [str(tmp_path / "a.bin"), str(tmp_path / "dup.bin")],
                                    "dest": "@stash", "caption": "hello", "delete_original": True})]
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].split() == ["01ababababab", "planned", "100", "MiB", str(tmp_path / "a.bin")]
    assert lines[1].split()[:2] == ["02ababababab", "uploaded"]
    assert lines[1].endswith("duplicate of 99cdcdcdcdcd")
    assert lines[0].index("planned") == lines[1].index("uploaded")  # aligned


def test_upload_defaults_and_json(sock, up, capsys):
    rc, out, _ = run(capsys, "--socket", sock, "upload", "/data/a.bin", "--json")
    assert rc == 0
    assert up.calls[0][1] == {"paths": ["/data/a.bin"], "dest": None, "caption": None,
                              "delete_original": False}
    result = json.loads(out)
    assert [t["source_path"] for t in result["transfers"]] == ["/data/a.bin"]
    assert up.polls == {}  # no --wait: nothing polled


def test_upload_refused_paths_print_the_daemons_message(sock, up, capsys):
    rc, out, err = run(capsys, "--socket", sock, "upload", "/data/a.bin", "/outside/x", "/outside/y")
    assert rc == 1 and out == ""
    assert "upload refused" in err and "  /outside/x\n  /outside/y" in err
    assert up.transfers == {}


def test_upload_needs_a_path(capsys):
    assert ctl.main(["--socket", "/x", "upload"]) == 2


# ---------------------------------------------------------------- upload --wait


def test_wait_polls_on_one_connection_until_uploaded(sock, up, capsys, monkeypatch):
    connects = []
    real_connect = ctl.AdminClient.connect
    monkeypatch.setattr(ctl.AdminClient, "connect", lambda self: connects.append(1) or real_connect(self))
    up.step = 2 * MiB  # 50 polls of half a second: 25 s of fake time
    clock = FakeClock()
    rc, out, err = run(capsys, "--socket", sock, "upload", "/d/a.bin", "/d/b.bin", "--wait", clock=clock)
    assert rc == 0, err
    assert len(connects) == 1
    assert up.polls == {"01" + "ab" * 15: 50, "02" + "ab" * 15: 50}
    assert clock.sleeps == [0.5] * 50
    assert "\x1b" not in out  # not a terminal: plain lines
    lines = out.splitlines()
    # on each state change, and every 10 s while uploading (at 40% and 80%)
    running = [line for line in lines if "uploading" in line]
    assert [line.split()[0][:2] for line in running] == ["01", "02"] * 3
    assert " 2%" in running[0] and "40%" in running[2] and "80%" in running[4]
    assert "80 MiB/100 MiB  4 MiB/s  ETA 5s  /d/a.bin" in running[4]
    final = [line for line in lines if "uploaded" in line]
    assert len(final) == 2 and all("100%" in line for line in final)


def test_wait_on_a_terminal_redraws_in_place(sock, up, capsys):
    tty = TTY()
    rc, out, _ = run(capsys, "--socket", sock, "upload", "/d/a.bin", "--wait", stdout=tty)
    assert rc == 0
    assert out.count("\x1b[1A") == 3       # one initial frame, three redraws over it
    assert out.rstrip().endswith("done  /d/a.bin")


def test_wait_json_prints_the_final_transfers(sock, up, capsys):
    rc, out, _ = run(capsys, "--socket", sock, "upload", "/d/a.bin", "/d/dup.bin", "--wait", "--json")
    assert rc == 0
    final = json.loads(out)["transfers"]  # nothing but JSON on stdout
    assert [t["state"] for t in final] == ["uploaded", "uploaded"]
    assert final[0]["bytes_done"] == 100 * MiB and final[1]["duplicate_of"]
    assert list(up.polls) == ["01" + "ab" * 15]  # the duplicate was finished already


def test_wait_failed_transfer_exits_1_with_its_reason(sock, up, capsys):
    rc, out, err = run(capsys, "--socket", sock, "upload", "/d/bad.bin", "/d/a.bin", "--wait")
    assert rc == 1
    assert "failed: FILE_PARTS_INVALID from Telegram" in out
    assert "transfer 01" in err and "/d/bad.bin" in err and "FILE_PARTS_INVALID from Telegram" in err
    assert "/d/a.bin" not in err  # the other one still ran to the end
    assert up.transfers["02" + "ab" * 15]["state"] == "uploaded"


def test_ctrl_c_stops_waiting_without_cancelling(sock, up, capsys):
    clock = FakeClock(interrupt_at=2)
    rc, _, err = run(capsys, "--socket", sock, "upload", "/d/a.bin", "--wait", clock=clock)
    assert rc == 130 and "stopped waiting" in err
    assert {cmd for cmd, _ in up.calls} == {"upload", "transfer"}
    assert up.transfers["01" + "ab" * 15]["state"] == "uploading"


# ---------------------------------------------------------------- transfers / transfer


def test_transfers_table_state_filter_and_json(sock, up, capsys, fixed_now):
    up.add("/srv/inbox/" + "deep/" * 12 + "movie.mkv", state="uploading", bytes_done=25 * MiB, account="bob")
    up.add("/d/small.bin", state="uploaded", bytes_done=100 * MiB, account="alice")
    up.add("/d/dup.bin", state="uploaded", duplicate_of="01" + "ab" * 15)
    rc, out, err = run(capsys, "--socket", sock, "transfers")
    assert rc == 0, err
    assert up.calls[-1] == ("transfers", {"state": None, "limit": 100})
    lines = out.splitlines()
    assert lines[0].split() == list(ctl.TRANSFER_HEADERS)
    first = lines[1].split()
    assert first[:7] == ["01ababababab", "uploading", "100", "MiB", "25%", "bob", "stash_archive"]
    assert first[7].startswith("...") and first[7].endswith("/deep/movie.mkv") and len(first[7]) == 50
    assert lines[3].split()[4] == "dup"
    rc, out, _ = run(capsys, "--socket", sock, "transfers", "--state", "uploaded", "--limit", "1", "--json")
    assert rc == 0 and up.calls[-1] == ("transfers", {"state": "uploaded", "limit": 1})
    assert [t["source_path"] for t in json.loads(out)["transfers"]] == ["/d/small.bin"]
    rc, out, _ = run(capsys, "--socket", sock, "transfers", "--state", "failed")
    assert rc == 0 and out.strip() == "no transfers"


@pytest.mark.parametrize("limit", ["0", "-3", "many"])
def test_transfers_bad_limit_is_a_usage_error(limit, capsys):
    assert ctl.main(["--socket", "/x", "transfers", "--limit", limit]) == 2


def test_transfer_detail_with_parts(sock, up, capsys, fixed_now):
    t = up.add("/d/a.bin", state="uploading", bytes_done=60 * MiB)
    rc, out, err = run(capsys, "--socket", sock, "transfer", t["id"])
    assert rc == 0, err
    assert up.calls[-1] == ("transfer", {"id": t["id"]})
    lines = out.splitlines()
    assert lines[0].split() == ["id:", t["id"]]
    assert "state:        uploaded" in lines and "path:         /d/a.bin" in lines
    assert "done:         100 MiB of 100 MiB (100%)" in lines
    assert any(line.startswith("created:") and line.endswith("(5m00s ago)") for line in lines)
    assert "reason:" not in out  # only shown when there is one
    parts = lines[lines.index("PARTS") + 1:]
    assert parts[0].split() == list(ctl.PART_HEADERS)
    assert parts[1].split() == ["0", "0", "B", "100", "MiB", "x.bin", "77", "alice", "5s", "ago"]
    rc, out, _ = run(capsys, "--socket", sock, "transfer", t["id"], "--json")
    assert rc == 0 and json.loads(out)["parts"][0]["message_id"] == 77


def test_transfer_not_found_exits_1(sock, capsys):
    rc, out, err = run(capsys, "--socket", sock, "transfer", "nope")
    assert rc == 1 and out == ""
    assert "no transfer 'nope'" in err and "[not_found]" in err


# ---------------------------------------------------------------- budget


def test_budget_header_and_accounts(sock, capsys, fixed_now):
    rc, out, err = run(capsys, "--socket", sock, "budget")
    assert rc == 0, err
    lines = out.splitlines()
    assert "reserved:  32 MiB of 64 MiB (50%)" in lines
    assert "slots:     4 of 8 in use, 4 per account" in lines
    assert "waiting:   2" in lines
    table = lines[lines.index("ACCOUNTS") + 1:]
    assert table[0].split() == list(ctl.BUDGET_HEADERS)
    alice, bob = table[1], table[2]
    assert alice.split()[:7] == ["alice", "4", "32", "MiB", "1", "parts,", "0"]
    assert "1/10 files, 300 MiB" in alice and "1 files, 300 MiB/1000 MiB" in alice
    assert bob.split()[:4] == ["bob", "0", "0", "B"] and "2m05s" in bob
    rc, out, _ = run(capsys, "--socket", sock, "budget", "--json")
    snapshot = json.loads(out)
    assert snapshot["limit_bytes"] == 64 * MiB and snapshot["accounts"][0]["quota"]["hourly_files"] == 10


def test_help_lists_the_upload_commands(capsys):
    assert ctl.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("upload", "transfers", "transfer", "budget"):
        assert f"    {cmd} " in out
