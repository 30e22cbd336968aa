"""Progress bars of long transfers (uploads, prewarm, verify): bytes and speed, drawn
on stderr so stdout keeps only the result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from thaw.core.errors import ThawError
from thaw.ops.client import Client

# Upload pieces: small enough for a smooth bar, large enough to cost nothing.
UPLOAD_PIECE_BYTES = 256 * 1024

err_console = Console(stderr=True)


def transfer_progress(transient: bool = False) -> Progress:
    """`transient`: the bar is wiped when done (the caller prints its own summary, and
    a refusal leaves only its one error line)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeElapsedColumn(), console=err_console,
                    transient=transient,
                    # Not a terminal: a transient bar has nothing to leave behind.
                    disable=transient and not err_console.is_terminal)


def upload_pieces(data: bytes, progress: Progress, task: TaskID) -> Iterator[bytes]:
    for start in range(0, len(data), UPLOAD_PIECE_BYTES):
        piece = data[start:start + UPLOAD_PIECE_BYTES]
        yield piece
        progress.advance(task, len(piece))


def run_pass(client: Client, name: str, kind: str, node: str = "") -> dict[str, Any]:
    """POST /v1/functions/NAME/{prewarm|verify} with NDJSON progress: one bar per
    node (bytes, GB/s); returns the final summary line."""
    summary: dict[str, Any] | None = None
    tasks: dict[str, TaskID] = {}
    # The request first: a refusal is then one error line, with no empty bar drawn.
    with client.stream(
            "POST", f"/v1/functions/{name}/{kind}", params={"node": node} if node else None,
            headers={"Accept": "application/x-ndjson"}) as resp, \
            transfer_progress() as progress:
        for raw in resp.iter_lines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            if "error" in line and isinstance(line["error"], dict):
                raise ThawError(line["error"].get("message", "the pass failed"))
            if line.get("done"):
                summary = line
                continue
            node_id = line["node"]
            if node_id not in tasks:
                tasks[node_id] = progress.add_task(f"{kind} {name} on {node_id}",
                                                   total=line["total_bytes"] or None)
            progress.update(tasks[node_id], completed=line["done_bytes"],
                            total=line["total_bytes"] or None)
            if line["finished"]:
                # Chunks already in the tier are not read again: the bar ends full.
                progress.update(tasks[node_id], completed=line["total_bytes"])
    if summary is None:
        raise ThawError(f"the {kind} stream ended without a summary")
    return summary


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0
