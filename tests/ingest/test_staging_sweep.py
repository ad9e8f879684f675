"""Empty staging folders (the verifier's cleanup removed the staged files) are swept."""
from __future__ import annotations

import os

from actors.ingest.actor import IngestActor
from actors.transfers import TransferPlanner
from config.loader import settings_from_dict
from storage.database import open_storage


def test_only_old_empty_folders_of_sets_not_in_progress_are_removed(tmp_path):
    settings = settings_from_dict({"daemon": {"state_dir": str(tmp_path)}, "telegram": {"mode": "simulated"},
                                   "upload": {"destination": "stash_archive"}},
                                  base_dir=tmp_path, env={})
    storage = open_storage(f"sqlite:///{tmp_path / 'stashd.db'}")
    try:
        actor = IngestActor(storage, settings, lambda name: None,
                            planner=TransferPlanner(storage, settings, node="n"), node="n")
        staging = settings.ingest.staging_dir
        cleaned = actor.worker.staged_dir("chan:1:cleaned")      # verified, files removed
        waiting = actor.worker.staged_dir("chan:1:waiting")      # files still there
        working = actor.worker.staged_dir("chan:1:working")      # being downloaded here
        fresh = actor.worker.staged_dir("chan:1:fresh")          # just made, nothing written yet
        for folder in (cleaned, waiting, working, fresh):
            folder.mkdir(parents=True)
        (waiting / "pack.zip").write_bytes(b"PK")
        (staging / "stray.txt").write_bytes(b"a file, not a folder")
        now = os.stat(cleaned).st_mtime + 3600
        for folder in (cleaned, waiting, working):
            os.utime(folder, (now - 3600, now - 3600))
        os.utime(fresh, (now - 5, now - 5))
        actor.worker.active.add("chan:1:working")

        assert actor.sweep_staging(older_than=60, now=now) == 1
        assert not cleaned.exists()
        assert waiting.is_dir() and working.is_dir() and fresh.is_dir() and (staging / "stray.txt").exists()
        actor.worker.active.clear()
        assert actor.sweep_staging(older_than=60, now=now + 60) == 2   # working and fresh, now idle
        assert sorted(p.name for p in staging.iterdir()) == sorted([waiting.name, "stray.txt"])
    finally:
        storage.close()


def test_a_missing_staging_dir_is_no_error(tmp_path):
    from actors.ingest.pipeline import remove_empty_staging_dirs
    assert remove_empty_staging_dirs(tmp_path / "nope") == 0
