"""A real `stashd run` SIGKILLed at each stage of an ingest (SQLite; two stages on
PostgreSQL too), restarted on the same state:
every archive of Source A ends up in the destination exactly once (nothing lost,
nothing duplicated), and no document was sent twice."""
from __future__ import annotations

import signal

import pytest

from tests.supervisor import ingest_helpers as h
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MAPPINGS = ({"account": "alice", "channel": "sim_source_a"},)

# fault point -> the hit it fires on (STASHD_FAULT=NAME@N); a later hit than the
# first leaves some archives done and others half-way.
STAGES = {
    "ingest_after_download_chunk": 4,   # a chunk written and journaled, the download not finished
    "ingest_after_claim": 2,            # a set leased to this process, nothing done with it yet
    "ingest_after_manifest": 2,         # the transfer's manifest on disk, its row not yet
    "after_send_before_record": 3,      # a part in the channel, its message id not recorded
    "ingest_before_index": 2,           # uploaded (package row), phase-2 index not written
}


# every stage on SQLite; on PostgreSQL the two where another claim could race the restart
CASES = [(fault, "sqlite") for fault in sorted(STAGES)] + [
    ("ingest_after_claim", "postgres"), ("after_send_before_record", "postgres")]


@pytest.mark.parametrize("fault, db", CASES)
def test_crash_at_each_stage_loses_and_duplicates_nothing(tmp_path, request, fault, db):
    db_url = (f"sqlite:///{tmp_path / 'state' / 'stashd.db'}" if db == "sqlite"
              else request.getfixturevalue("pg_url"))
    with h.seeded_sim(tmp_path) as sim:
        server, _ = sim
        config = h.ingest_config(tmp_path / "state", sim, MAPPINGS, db_url=db_url)
        sock = tmp_path / "state" / "stashd.sock"
        wanted = h.expected(["sim_source_a"])
        proc = stashd("run", "--config", str(config), env=env(STASHD_FAULT=f"{fault}@{STAGES[fault]}"))
        try:
            assert proc.wait(60) == -signal.SIGKILL, f"{fault} was never reached"
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate()
        assert f"fault point '{fault}'" in err
        before = h.destination_ledger(server)
        store = h.open_store(db_url)
        try:
            unindexed = store.index_states().get("pending", 0)
        finally:
            store.close()
        assert len(before) < len(wanted) or unindexed  # the crash came mid-run

        proc = stashd("run", "--config", str(config), env=env())
        try:
            wait_for(lambda: all_ready(sock), what="accounts ready after restart")
            h.wait_until(lambda: h.all_in_destination(server, wanted), 60, "every archive after restart",
                         proc=proc)
            store = h.open_store(db_url)
            try:
                h.wait_until(lambda: h.all_indexed(store, wanted), 30, "every package indexed after restart", proc=proc)
            finally:
                store.close()
            assert stop(proc) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        h.assert_exactly_once(server, wanted)
