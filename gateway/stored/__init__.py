"""Invocations whose answer outlives the request (DESIGN.md §9).

- `Prefer: respond-async` on a function URL: 202 + id at once; the call is queued in
  the scheduler's DB and run by the worker of whichever gateway replica claims it.
  With `Prefer: respond-async, wait=N` the call runs here for up to N seconds first
  (RFC 7240), then 202.
- A sync (non-streaming) call still running after `sync_wait_seconds` (or the client's
  `Prefer: wait=N`, if shorter) becomes a stored invocation: the client gets 303 to
  its result URL, which waits the same way and answers with the function's answer.
- `Idempotency-Key`: the first request with a key (per tenant, decided by a unique
  constraint in the DB, so across replicas too) runs the function; every other one
  with the key gets the same answer (status and body) until the result expires; the
  same key with a different request is refused with 422.
- `GET /v1/invocations[/{id}[/result]]`, `POST /v1/invocations/{id}/cancel`.
- Webhook (`X-Thaw-Webhook: <url>` or `?webhook=<url>` at submission): the finished
  invocation is POSTed there as JSON, retried with exponential backoff. The delivery
  is claimed like the invocation (the replica that finished it holds a claim it
  renews); if that replica dies, another one takes the delivery over once the claim
  lapsed and the next attempt is due, counting the attempts already made.

A streaming call (`Accept: text/event-stream`) is relayed as it is produced and is
never stored, unless it is submitted async (then its whole output is the result).
A claimed invocation runs at least once: if its replica dies mid-call, another one
runs it again once the claim lapses.

The subpackage sits above the invocation path (gateway/request.py, admit.py,
dispatch.py, relay.py) and runs its calls through it; the path never imports it.
Modules: client (the scheduler's Invocations service), outcome (a call read to a
stored result), result_files (a stored result's output files and their URLs), views
(JSON, 202/303, stored answers), runner (the worker), submit (the function URL's
part), routes (the management routes and OpenAPI paths).
"""
