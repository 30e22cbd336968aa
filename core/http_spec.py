"""thaw.toml's `[http]` table: cross-origin access to a function's URL (CORS), which
the gateway answers for the function (gateway/cors.py, docs/thaw-toml.md).

Without `cors_origins` a function has no CORS: no CORS headers, and an OPTIONS call
reaches its handler like any other method.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CORS_ORIGINS = 64
MAX_CORS_ENTRIES = 64
MAX_CORS_MAX_AGE = 86400
DEFAULT_CORS_METHODS = ("GET", "POST")
DEFAULT_CORS_HEADERS = ("Authorization", "Content-Type")
DEFAULT_CORS_MAX_AGE = 600
# scheme://host[:port], as a browser sends it in Origin (no path, no trailing slash).
ORIGIN_PATTERN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
TOKEN_PATTERN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Http:
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call the function from a browser; ("*",) = any; () = no CORS."""
    cors_methods: tuple[str, ...] = DEFAULT_CORS_METHODS
    cors_headers: tuple[str, ...] = DEFAULT_CORS_HEADERS
    """Request headers a cross-origin call may send; ("*",) = whichever it asks for."""
    cors_max_age: int = DEFAULT_CORS_MAX_AGE
    """Seconds a browser may cache a preflight's answer."""
    cors_credentials: bool = False
    """Browsers may send cookies and read the answer (Access-Control-Allow-Credentials)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Http:
        return cls(cors_origins=tuple(data.get("cors_origins", ())),
                   cors_methods=tuple(data.get("cors_methods", DEFAULT_CORS_METHODS)),
                   cors_headers=tuple(data.get("cors_headers", DEFAULT_CORS_HEADERS)),
                   cors_max_age=int(data.get("cors_max_age", DEFAULT_CORS_MAX_AGE)),
                   cors_credentials=bool(data.get("cors_credentials", False)))


class HttpDoc(BaseModel):
    """Cross-origin access (CORS) to the function's URL, answered by the gateway."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              title="http")

    cors_origins: list[str] = Field(
        default_factory=list, max_length=MAX_CORS_ORIGINS,
        description='Origins allowed to call from a browser ("https://app.example.com"), '
                    'or ["*"] for any; none = no CORS headers and OPTIONS reaches the '
                    "handler")
    cors_methods: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CORS_METHODS), max_length=len(CORS_METHODS),
        description="Methods a cross-origin call may use")
    cors_headers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CORS_HEADERS), max_length=MAX_CORS_ENTRIES,
        description='Request headers a cross-origin call may send; ["*"] = any it asks for')
    cors_max_age: int = Field(default=DEFAULT_CORS_MAX_AGE, ge=0, le=MAX_CORS_MAX_AGE,
                              description="Seconds a browser may cache a preflight's answer")
    cors_credentials: bool = Field(
        default=False, description="Allow cookies and HTTP authentication from the "
                                   "browser (not with cors_origins = [\"*\"])")

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        if "*" in value and len(value) > 1:
            raise ValueError('"*" allows every origin: list it alone')
        for origin in value:
            if origin != "*" and not ORIGIN_PATTERN.match(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], "
                                 "no path)")
        return [o.lower() for o in value]

    @field_validator("cors_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        upper = [m.upper() for m in value]
        for method in upper:
            if method not in CORS_METHODS:
                raise ValueError(f"{method!r} is not one of {', '.join(CORS_METHODS)}")
        return list(dict.fromkeys(upper))

    @field_validator("cors_headers")
    @classmethod
    def _headers(cls, value: list[str]) -> list[str]:
        if "*" in value and len(value) > 1:
            raise ValueError('"*" allows every header: list it alone')
        for name in value:
            if name != "*" and not TOKEN_PATTERN.match(name):
                raise ValueError(f"{name!r} is not a header name")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> HttpDoc:
        if self.cors_credentials and "*" in self.cors_origins:
            # Any site could then make calls with the user's cookies and read them.
            raise ValueError('cors_credentials needs the origins listed, not "*"')
        return self

    def spec(self) -> Http:
        return Http(cors_origins=tuple(self.cors_origins),
                    cors_methods=tuple(self.cors_methods),
                    cors_headers=tuple(self.cors_headers), cors_max_age=self.cors_max_age,
                    cors_credentials=self.cors_credentials)


def policy_of(config_json: str) -> Http | None:
    """A function's CORS policy from its configuration document; None = no CORS
    (also for a document this reader cannot read)."""
    try:
        document = json.loads(config_json or "{}")
        table = document.get("http") if isinstance(document, dict) else None
        policy = Http.from_dict(table) if isinstance(table, dict) else None
    except (ValueError, TypeError):
        return None
    return policy if policy is not None and policy.cors_origins else None
