"""`stashd demo` ends with every transfer verified and cleaned per policy, and says so: the
uploaded samples keep their originals (upload.delete_original = false) and so their manifests
(a message lost later is sent again from them), the ingested archives' staged copies are
deleted with their manifests, and every part is still in the channel."""
from __future__ import annotations

import io

import pytest

from actors.demo import SAMPLE_FILES, SimServerProcess, run_demo
from actors.telegram.sim.remote import SimControl
from storage import open_storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def test_demo_ends_with_every_transfer_verified_and_cleaned(tmp_path):
    demo_dir = tmp_path / "demo"
    out = io.StringIO()
    assert run_demo(demo_dir, out=out) == 0, out.getvalue()
    text = out.getvalue()
    section = text.split("\nVerification and cleanup", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    *rows, verdict = section
    storage = open_storage(f"sqlite:///{demo_dir / 'stashd.db'}")
    try:
        records = storage.list_transfers(limit=1000)
        parts = {r.id: storage.list_parts(r.id) for r in records}
    finally:
        storage.close()
    assert records and {r.state for r in records} == {"cleaned"}
    assert verdict == f"  every transfer verified and cleaned: {len(records)} of {len(records)} cleaned, 0 failed"
    assert len(rows) == len(records)
    samples = {name.split("/")[-1] for name, _, _ in SAMPLE_FILES}
    for name, _, _ in SAMPLE_FILES:
        [row] = [r for r in rows if r.split()[0] == name]
        assert "verified, cleaned: manifest kept, original kept" in row, row
        assert (demo_dir / "files" / name).exists()             # policy: originals kept
    for r in records:
        if r.source_path.rsplit("/", 1)[-1] not in samples:     # an ingested archive's staged copy
            assert r.delete_original and not (demo_dir / r.source_path).exists()
            assert not (demo_dir / r.manifest_path).exists()    # nothing left to send again
        else:
            assert (demo_dir / r.manifest_path).exists()        # kept with the original
        assert all(p.verified_at is not None and p.message_id for p in parts[r.id])

    server = SimServerProcess(demo_dir / "sim", demo_dir / "sim" / "sim.sock").start()
    try:
        messages = SimControl(server.socket_path).inspect("stash_archive")["messages"]
    finally:
        server.stop()
    live = {m["id"] for m in messages if m.get("document") and not m.get("deleted")}
    assert {p.message_id for ps in parts.values() for p in ps} <= live   # nothing lost by the cleanup
