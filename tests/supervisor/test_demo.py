"""`stashd demo` in-process (its sim server is a real subprocess): the upload step splits the
large sample, prints what landed where, and a second demo on the same directory completes
every sample by reference; the ingest step puts every seeded archive in the destination
once (twice scanned) and says what was ingested, skipped and why, waiting and verified;
a taken metrics port falls back to a free one."""
from __future__ import annotations

import io
import re
import socket
from pathlib import Path

import pytest

from actors.demo import (
    DEMO_STEPS, SAMPLE_FILES, DemoSection, SimServerProcess, format_summary, run_demo,
)
from actors.telegram.sim.remote import SimControl
from actors.telegram.sim.samples import expected_ingested

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def demo(demo_dir) -> str:
    out = io.StringIO()
    assert run_demo(demo_dir, out=out) == 0, out.getvalue()
    return out.getvalue()


def uploads(text: str) -> dict[str, str]:
    """sample name -> its line in the Uploads section."""
    section = text.split("\nUploads from ", 1)[1].split("\n\n", 1)[0]
    return {line.split()[0]: line for line in section.splitlines()[1:]}


def test_demo_uploads_samples_then_completes_them_by_reference(tmp_path):
    demo_dir = tmp_path / "demo"
    first = demo(demo_dir)
    lines = uploads(first)
    assert sorted(lines) == sorted(name for name, _, _ in SAMPLE_FILES)
    big = lines["backup.tar"]
    assert "2.5 MiB" in big and "3 documents in Stash Archive (@stash_archive)" in big
    assert re.search(r"-> (alice|bob|carol):", big)
    ids = {name: int(m) for name, m in re.findall(r"(\S+) \(message (\d+)\)", first)}
    assert sorted(ids) == ["backup.tar.001", "backup.tar.002", "backup.tar.003", "holiday.jpg",
                           "notes.txt"]
    assert "1 document in" in lines["notes.txt"]
    port = int(re.search(r"Metrics: http://127\.0\.0\.1:(\d+)/metrics", first).group(1))
    assert port > 0          # 9464, or a free one when another suite held 9464 at that moment

    with socket.socket() as taken:   # 9464 busy (another suite's daemon): a free port instead
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 9464))
            taken.listen()
        except OSError:
            pass                     # someone else holds it already: the same situation
        second = demo(demo_dir)      # the same bytes again: nothing is uploaded twice
    served = int(re.search(r"Metrics: http://127\.0\.0\.1:(\d+)/metrics", second).group(1))
    assert served not in (0, 9464)
    again = uploads(second)
    assert all("stored already" in line and "nothing uploaded" in line for line in again.values())
    assert {name: int(m) for name, m in re.findall(r"(\S+) \(message (\d+)\)", second)} == ids

    server = SimServerProcess(demo_dir / "sim", demo_dir / "sim" / "sim.sock").start()
    try:
        messages = SimControl(server.socket_path).inspect("stash_archive")["messages"]
    finally:
        server.stop()
    docs = sorted((m["document"]["file_name"], m["id"]) for m in messages
                  if m.get("document") and not m.get("deleted"))
    uploaded = [d for d in docs if d[0] in ids]
    assert uploaded == sorted(ids.items())  # each sample part exactly once, where the demo said
    # the rest are the ingested archives' volumes, each once, although two demos scanned
    ingested = sorted(name for name, _ in docs if name not in ids)
    volumes = sorted(n for x in expected_ingested().values() for n in x.file_names)
    assert ingested == volumes
    for text in (first, second):
        section = text.split("\nIngest from the source channels", 1)[1].split("\n\n", 1)[0]
        assert f"ingested {len(expected_ingested())} archive(s)" in section
        assert "skipped message(s): duplicate 2, incomplete_set 2" in section
        assert "waiting for missing parts: partial-set (2 of 3 parts)" in section
        assert "corrupt: " in section and "encrypted: " in section
        assert "preview holiday-photos/cover.png" in section
        assert re.search(r"wallpapers\.zip .* preview album photo of message \d+", section)
        assert re.search(r"verified \d+ of \d+", section)


def test_summary_sections_are_printed_in_order_and_steps_are_extensible():
    assert DEMO_STEPS and all(callable(step) for step in DEMO_STEPS)
    tmp = Path("/d")
    text = format_summary({}, {}, tmp,
                          [DemoSection("First:", ["  a"]), DemoSection("Second:", ["  b"], ok=False)],
                          "http://127.0.0.1:1/metrics")
    assert text.index("First:\n  a") < text.index("Second:\n  b") < text.index("Metrics:")
    assert text.endswith(f"Config: {tmp / 'stashd.toml'}  (stashd run --config {tmp / 'stashd.toml'})")
