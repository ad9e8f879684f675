"""Two `stashd run` processes on different session sets, one PostgreSQL, one standalone
simulated Telegram, both reading the shared Source A: each archive is uploaded exactly
once; when one is SIGKILLed mid-run, the other does the rest but what the dead one held,
and the dead one's restart finishes that."""
from __future__ import annotations

import signal

import pytest

from tests.supervisor import ingest_helpers as h
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(120)]

FIRST = ({"account": "alice", "channel": "sim_source_a"},
         {"account": "alice", "channel": "sim_forum", "topics": ["Games", "Software"]})
SECOND = ({"account": "bob", "channel": "sim_source_a"},
          {"account": "bob", "channel": "sim_source_b"},
          {"account": "carol", "channel": "sim_forum", "topics": ["Games", "Software"]})


def start(tmp_path, sim, name, mappings, sessions, pg_url, ingest="", **fault):
    config = h.ingest_config(tmp_path / name, sim, mappings, db_url=pg_url, sessions=sessions,
                             ingest=ingest)
    return stashd("run", "--config", str(config), env=env(**fault)), tmp_path / name / "stashd.sock"


def finish_all(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_two_processes_upload_each_shared_archive_once(tmp_path, pg_url):
    with h.seeded_sim(tmp_path) as sim:
        server, _ = sim
        wanted = h.expected()
        one, sock1 = start(tmp_path, sim, "one", FIRST, ["alice"], pg_url)
        two, sock2 = start(tmp_path, sim, "two", SECOND, ["bob", "carol"], pg_url)
        try:
            wait_for(lambda: all_ready(sock1) and all_ready(sock2), what="both daemons ready")
            h.wait_until(lambda: h.all_in_destination(server, wanted), 90, "every archive uploaded")
            assert one.poll() is None and two.poll() is None
            store = h.open_store(pg_url)
            try:  # both processes did read the shared channel
                scanned = {r.mapping for r in store.list_runs(limit=200) if r.state == "finished"}
            finally:
                store.close()
            assert {"alice:sim_source_a", "bob:sim_source_a"} <= scanned, scanned
            assert stop(one) == 0 and stop(two) == 0
        finally:
            finish_all([one, two])
        h.assert_exactly_once(server, wanted)


def test_a_killed_process_leaves_work_the_other_and_its_restart_finish(tmp_path, pg_url):
    with h.seeded_sim(tmp_path) as sim:
        server, _ = sim
        wanted = h.expected()
        # the first process dies right after its second set claim: that set is leased to a
        # dead process; whatever it had not claimed yet is left to the second one
        one, sock1 = start(tmp_path, sim, "one", FIRST, ["alice"], pg_url,
                           STASHD_FAULT="ingest_after_claim@2")
        two, sock2 = start(tmp_path, sim, "two", SECOND, ["bob", "carol"], pg_url)
        try:
            assert one.wait(60) == -signal.SIGKILL
            one.communicate()
            wait_for(lambda: all_ready(sock2), what="the survivor ready")
            # everything but what the dead process held (its first set, queued for its own
            # uploaders, and the one it had just claimed) is done by the survivor ...
            h.wait_until(lambda: len(h.destination_ledger(server)) >= len(wanted) - 2, 60,
                         "the survivor's share", proc=two)
            # ... and the restarted process frees its earlier life's lease and finishes
            one = stashd("run", "--config", str(tmp_path / "one" / "stashd.toml"), env=env())
            h.wait_until(lambda: h.all_in_destination(server, wanted), 60, "every archive", proc=one)
            assert stop(one) == 0 and stop(two) == 0
        finally:
            finish_all([one, two])
        h.assert_exactly_once(server, wanted)
