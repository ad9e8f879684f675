"""download_document through a real AccountActor on the simulated Telegram, each
chunk under a real BudgetActor lease."""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from actors.account_messages import GetHistory
from actors.budget_messages import GetBudgetSnapshot
from actors.ingest.download import AccountRangePort, SizeMismatchError, download_document
from actors.uploader import BudgetActorPort
from ingest_sim import MIB, SimEnv

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(tmp_path):
    e = SimEnv(tmp_path, budget_bytes=2 * MIB)
    yield e
    e.close()


def history(env, account="alice", channel="sim_source_a"):
    return env.refs[account].ask(GetHistory(channel), timeout=20).messages


def test_download_through_the_account_and_the_budget(env):
    blob = os.urandom(6 * MIB + 4321)
    env.post("big.zip", blob)
    document = [m.document for m in history(env) if m.document][0]
    assert document.size == len(blob)
    port = AccountRangePort(env.refs["alice"], timeout=20)
    budget = BudgetActorPort(env.budget, "alice")
    result = asyncio.run(download_document(port, document, env.tmp / "staging" / "big.zip",
                                           budget=budget, window=8))
    budget.close()
    assert result.sha256 == hashlib.sha256(blob).hexdigest()
    assert (env.tmp / "staging" / "big.zip").read_bytes() == blob
    assert env.count("alice", "GetFileRequest") == 7
    snap = env.budget.ask(GetBudgetSnapshot(), timeout=5)
    assert snap.reserved_bytes == 0 and snap.slots_in_use == 0  # every lease went back


def test_resume_after_a_failed_chunk_requests_only_the_rest(env):
    from actors.telegram.sim.world import Fault
    blob = os.urandom(4 * MIB)
    env.post("a.zip", blob)
    document = [m.document for m in history(env) if m.document][0]
    port = AccountRangePort(env.refs["alice"], timeout=20)
    path = env.tmp / "staging" / "a.zip"

    class FailThird:
        def __init__(self):
            self.n = 0

        async def read(self, doc, offset, limit):
            self.n += 1
            if self.n == 3:
                env.world.set_fault(Fault("error", request="GetFileRequest", error="FILE_ID_INVALID"))
            return await port.read(doc, offset, limit)

    with pytest.raises(Exception):
        asyncio.run(download_document(FailThird(), document, path, window=1))
    done_before = env.count("alice", "GetFileRequest")
    env.world.clear_faults()
    result = asyncio.run(download_document(port, document, path, window=4))
    assert result.resumed_chunks == 2
    assert env.count("alice", "GetFileRequest") - done_before == 2
    assert result.sha256 == hashlib.sha256(blob).hexdigest() and path.read_bytes() == blob


def test_a_document_smaller_than_announced_is_a_size_mismatch(env):
    import dataclasses
    blob = os.urandom(MIB + 10)
    env.post("a.zip", blob)
    document = [m.document for m in history(env) if m.document][0]
    lying = dataclasses.replace(document, size=2 * MIB + 10)
    with pytest.raises(SizeMismatchError):
        asyncio.run(download_document(AccountRangePort(env.refs["alice"], timeout=20), lying,
                                      env.tmp / "a.zip"))
