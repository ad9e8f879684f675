"""VerifierActor: the thread that runs :class:`actors.verifier_core.Verifier` (issue 4).

A ThreadingActor of its own (SupervisedMixin), so its checks never block other
actors; it asks AccountActors (GetMessages, DownloadRange) with timeouts and
is never asked by them.  Messages: actors.verifier_messages -- Tick (the
daemon's ticker), VerifyNow(transfer_id | None) -> VerifyResult,
GetVerifierStatus -> VerifierStatusResult.

    VerifierActor.start(storage, settings.verify, accounts=callable -> {name: ref},
                        node=..., metrics=None, clock=time.time,
                        request_timeout=60.0, adopt=None, on_lost=None)

Lease owner: ``verifier_owner(node)`` = "<node>/verifier#<random>", unique per
process and actor; on start the leases of an earlier verifier of the same node
(``"<node>/verifier#"`` prefix) are released (recovery after a crash).

:class:`AccountsMessagePort` is the MessagePort over AccountActor refs: readers
are the running accounts whose stored state is ready or cooling_down, the part's
sending account first.
"""
