"""The `Server-Timing` header of a call's answer: every stage of its way, so that the
stages add up to `total` (docs/data-path.md, "Where a call's time goes").

The gateway measures its own part on one clock (perf_counter) at a few points of the
exchange: the call admitted (`started`), its last lease asked for (`leasing`), the
request sent to the node (`sent`), the answer (its head, and its body when small)
arrived (`opened`), the client's head ready. Between them sit the stages the others
measured and returned: the scheduler's and the agent's with the lease, the instance's
in the answer's own Server-Timing. The gateway's stages are the parts of its intervals
those do not cover:

- `admission`: arrival to dispatch (authentication, rate limits, the body read, the
  input checks), on the event loop's clock where the arrival was taken;
- `retry`: earlier exchanges the node's data plane refused (or whose node was lost)
  before the one that answered; only present when there were any;
- `placement`: the wait for the lease not covered by the stages it carries (the
  scheduler's gRPC round trip and its work around them; for a lease the gateway kept,
  taking it from its pool);
- `hop`: the data plane's round trip not covered by the stages the node sent back (the
  instance's, and `node`, the agent's own share: platform/dataplane.py): the network
  and TLS both ways, the node's HTTP server reading the request and writing the answer;
- `relay`: the answer's arrival to its head being ready for the client.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from thaw.gateway.stats import parse_server_timing

# The stages of the call's way through gateway and node (the agent's data plane reports
# `node`), beside those of the instance's start the lease carries and the instance's own.
PATH_STAGES = frozenset(("admission", "retry", "placement", "node", "hop", "relay"))


def _part(name: str, seconds: float) -> str:
    return f"{name};dur={seconds * 1000:.2f}"


def server_timing(stages: Iterable[tuple[str, float]], upstream: str | None,
                  admission: float, started: float, leasing: float, sent: float,
                  opened: float, total: bool) -> str:
    """The header: `admission`, `retry` (if any), the lease's stages, `placement`,
    the instance's stages as it sent them, `hop`, then with `total` (a complete
    answer) `relay` and `total`. Times are perf_counter seconds but `admission`,
    which is a duration."""
    stages = list(stages)
    parts = [_part("admission", admission)]
    if leasing > started:
        parts.append(_part("retry", leasing - started))
    parts.extend(_part(name, seconds) for name, seconds in stages)
    reported = sum(seconds for _, seconds in stages)
    parts.append(_part("placement", max(sent - leasing - reported, 0.0)))
    instance = 0.0
    if upstream:
        parts.append(upstream)
        instance = sum(parse_server_timing(upstream).values()) / 1000.0
    parts.append(_part("hop", max(opened - sent - instance, 0.0)))
    if total:
        now = time.perf_counter()
        parts.append(_part("relay", now - opened))
        parts.append(_part("total", admission + now - started))
    return ", ".join(parts)
