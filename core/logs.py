"""structlog set-up shared by every service: console lines, or JSON with THAW_LOG_JSON."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(component: str, level: str = "info", as_json: bool = False) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json
        else structlog.dev.ConsoleRenderer(colors=False))
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    # Records of the standard library's loggers (aiohttp, grpc, asyncio) go out in the
    # same format, with the same context (component, request_id), not as bare text.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Module-level loggers are lazy proxies; without caching each log call on the
        # invocation path re-binds one (a measurable share of a warm call).
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)
