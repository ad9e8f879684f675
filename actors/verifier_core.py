"""The verifier's logic, without threads: claim due checks, check, act (issue 4).

:class:`Verifier` is driven by the VerifierActor (one call per Tick) and by
tests with fake ports and an injected clock.  One :meth:`Verifier.run_pass`:

1. ``storage.claim_due_transfers(owner, batch, lease_seconds, VERIFY_STATES)``
   (owner unique per process and actor; an expired lease is taken over);
2. duplicates (``duplicate_of``) follow the referenced transfer's state;
3. the others' parts are grouped per destination channel and their message
   ids asked in batches of at most ``batch_size`` (<= 100) per GetMessages,
   through the first account of ``port.readers(channel)`` that answers (the
   part's sending account first); a part is present only when its message
   exists and carries the expected document (:func:`document_mismatch`: size,
   file name, and the document id recorded at send), and, with the deep check
   on, sampled 1 MiB blocks match the manifest's block hashes;
4. an error or timeout is NOT a pass: nothing is recorded, the lease is
   released with ``next_check_at = now + compute_backoff(errors)``;
5. all present -> ``record_check(present=...)``, state -> verified, next check
   on the slow cycle (or at the end of the cleanup grace period), then
   :class:`actors.cleanup.Cleaner` when due;
6. misses -> ``record_check(missing=...)`` (only misses are recorded); a
   cleaned transfer -> failed "lost after cleanup: ..." (loudly; the
   ``on_lost`` hook is where ingest may fetch an archive again); attempts >=
   max_attempts -> failed; re-upload not yet allowed by the backoff ->
   verifying, due when it is; else the original is checked
   (:func:`check_original`: size, mtime, sha256 of the part's range) -- gone
   or changed -> failed with that reason, nothing uploaded -- then, per
   missing part, the optional ``adopt`` hook (caption-marker search) and a
   fresh random_id written into the manifest first
   (``storage.manifest.rewrite_part_random_id``) then
   ``storage.set_part_random_id``; state -> uploading (attempts + 1, account
   cleared): the DispatcherActor resumes the parts without a message.

Functions (pure): ``compute_backoff(attempt, initial, maximum)``,
``batched(ids, size)``, ``document_mismatch(part, info)``,
``reupload_allowed_at(transfer, parts, settings)``, ``check_original(manifest,
part_index=None)`` (reads files), ``sample_blocks(part_plan, samples, rng)``.

Ports: :class:`MessagePort` -- ``readers(channel, preferred)`` -> account
names to try, ``get_messages(account, channel, ids)`` -> tuple of MessageInfo |
None (raises on error/timeout), ``download_range(account, document, offset,
limit)`` -> bytes.  :class:`actors.verifier.AccountsMessagePort` implements it
over AccountActor refs.

Metrics (optional, ``Metrics.add_verify_metrics``): checks by result
(present/missing/error), misses, re-uploads, cleanups, lost, lag.
"""
