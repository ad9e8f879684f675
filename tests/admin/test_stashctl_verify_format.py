"""stashctl's verify/retry/transfer rendering and argument checks, pure (no socket, no daemon)."""
from __future__ import annotations

import pytest
from admin_helpers import NOW

from actors.admin import ctl


def transfer(**kw) -> dict:
    t = {"id": "ab" * 16, "state": "verified", "source_path": "/d/a.bin", "size": 1000,
         "destination": "stash_archive", "account": "alice", "parts_total": 2, "parts_sent": 2,
         "bytes_done": 1000, "duplicate_of": None, "reason": None, "created_at": NOW - 600,
         "updated_at": NOW - 60, "attempts": 1, "last_check_at": NOW - 30, "next_check_at": NOW + 3600,
         "lease_owner": None, "lease_until": None, "cleaned": False, "misses": 1,
         "parts": [{"index": i, "offset": i * 500, "length": 500, "file_name": f"a.bin.00{i + 1}",
                    "message_id": 10 + i, "account": "alice", "sent_at": NOW - 100,
                    "verified_at": NOW - 30, "misses": i, "document_id": 99} for i in range(2)]}
    t.update(kw)
    return t


def fields(text: str) -> dict[str, str]:
    head = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in head.splitlines())}


def test_transfer_view_shows_checks_lease_misses_and_cleanup():
    f = fields(ctl.format_transfer(transfer(), NOW))
    assert f["attempts"] == "1" and f["misses"] == "1" and f["verified"] == "2 of 2 parts"
    assert f["last check"].endswith("(30s ago)") and f["next check"].endswith("(in 1h00m00s)")
    assert f["cleaned"] == "no" and "checking" not in f
    text = ctl.format_transfer(transfer(lease_owner="host#1/verifier#x", lease_until=NOW + 20,
                                        next_check_at=NOW - 5), NOW)
    f = fields(text)
    assert f["checking"] == "host#1/verifier#x (lease in 20s)" and f["next check"] == "due now"
    rows = text.split("PARTS\n", 1)[1].splitlines()
    assert rows[0].split() == list(ctl.CHECKED_PART_HEADERS)
    assert rows[2].split() == ["1", "500", "B", "500", "B", "a.bin.002", "11", "alice", "1m40s", "ago",
                               "30s", "ago", "1"]


@pytest.mark.parametrize("state, expected", [("uploading", "after the upload"),
                                             ("failed", "none (failed: stashctl retry)")])
def test_next_check_in_words_when_no_check_is_coming(state, expected):
    assert fields(ctl.format_transfer(transfer(state=state), NOW))["next check"] == expected


def test_cleaned_and_never_checked():
    f = fields(ctl.format_transfer(transfer(state="cleaned", cleaned=True), NOW))
    assert f["cleaned"] == "yes"
    f = fields(ctl.format_transfer(transfer(state="uploaded", last_check_at=None), NOW))
    assert f["last check"] == "never"


def test_parts_without_verification_fields_keep_the_old_table():
    t = transfer()
    for p in t["parts"]:
        del p["verified_at"], p["misses"]
    rows = ctl.format_transfer(t, NOW).split("PARTS\n", 1)[1].splitlines()
    assert rows[0].split() == list(ctl.PART_HEADERS)


def test_check_outcome_and_exit_status():
    ok = {"outcomes": [{"transfer_id": "t", "result": "verified", "missing": [], "detail": ""}],
          "transfer": transfer()}
    assert ctl.check_ok(ok) and ctl.format_check(ok, NOW).endswith("check: verified")
    miss = {"outcomes": [{"transfer_id": "t", "result": "reuploading", "missing": [0, 1],
                          "detail": "message 10 is gone"}], "transfer": transfer(state="uploading")}
    assert not ctl.check_ok(miss)
    assert ctl.format_check(miss, NOW).endswith("check: reuploading, part(s) 0, 1 missing: message 10 is gone")
    assert not ctl.check_ok({"outcomes": [], "transfer": transfer()})
    assert "nothing checked" in ctl.format_check({"outcomes": [], "transfer": transfer()}, NOW)
    for result in ("failed", "lost", "error", "waiting"):
        assert not ctl.check_ok({"outcomes": [{"result": result}]})


def test_verify_summary_and_retry_line():
    assert ctl.format_verify({"scheduled": 0, "transfers": []}, NOW).startswith("nothing to check")
    rows = [{"id": f"{i:02d}" + "cd" * 15, "state": "uploaded", "source_path": f"/d/{i}.bin",
             "last_check_at": None, "misses": 0} for i in range(2)]
    text = ctl.format_verify({"scheduled": 5, "all": True, "transfers": rows}, NOW)
    lines = text.splitlines()
    assert lines[0] == "5 transfer(s) made due: being checked now"
    assert lines[1].split() == ["ID", "STATE", "LAST", "CHECK", "MISSES", "PATH"]
    assert lines[2].split() == ["00cdcdcdcdcd", "uploaded", "never", "0", "/d/0.bin"]
    assert lines[-1] == "... and 3 more"
    assert "on its next pass" in ctl.format_verify({"scheduled": 1, "transfers": rows[:1]}, NOW)
    t = transfer(state="verifying")
    assert ctl.format_retry({"transfer": t, "previous_reason": "original changed: x"}, NOW) == \
        f"transfer {t['id']}: failed -> verifying (it had failed: original changed: x)"


def test_retry_line_of_a_refetch():
    t = transfer(state="failed")
    text = ctl.format_retry({"transfer": t, "previous_reason": "lost after cleanup: x",
                             "refetch": {"sets": ["k"], "channels": [1234]}}, NOW)
    assert text == (f"transfer {t['id']}: to be fetched again from source channel 1234 (stays "
                    f"failed until the re-fetch has the content) (it had failed: lost after cleanup: x)")


@pytest.mark.parametrize("argv, message", [
    (["transfers", "--state", "faild"], "did you mean 'failed'"),
    (["transfers", "--state", "lost"], "one of planned, uploading, uploaded, verifying, verified, "
                                       "cleaned, failed"),
    (["verify", "abc", "--all"], "not both"),
    (["retry"], "required"),
])
def test_usage_errors(argv, message, capsys):
    assert ctl.main(["--socket", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err


def test_arguments_sent():
    assert ctl.command_args(ctl.parse_args(["verify"])) == {"id": None, "all": False}
    assert ctl.command_args(ctl.parse_args(["verify", "--all"])) == {"id": None, "all": True}
    assert ctl.command_args(ctl.parse_args(["verify", "t1"])) == {"id": "t1", "all": False}
    assert ctl.command_args(ctl.parse_args(["retry", "t1"])) == {"id": "t1"}
