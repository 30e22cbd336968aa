"""The scheduler's readiness check beyond its gRPC health: its database answers
(core/health_http.py serves /livez and /readyz)."""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from thaw.core.health_http import Check


def database_check(engine: Engine) -> Check:
    """A check that runs `SELECT 1` in a worker thread: None when the database
    answers, else why not (never the URL, which may hold a password)."""

    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def check() -> str | None:
        try:
            await asyncio.to_thread(ping)
        except SQLAlchemyError as exc:
            return f"the database does not answer ({type(exc).__name__})"
        return None

    return check
