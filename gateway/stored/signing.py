"""Webhook signatures, per the Standard Webhooks specification
(https://www.standardwebhooks.com, spec/standard-webhooks.md, "Signature scheme"):

- `webhook-id`: the message's id, the same on every retry (the invocation's id), so a
  receiver can drop a delivery it already handled;
- `webhook-timestamp`: integer Unix seconds of the attempt (a receiver refuses old ones);
- `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
  with the base64-decoded part of the tenant's `whsec_...` secret. Several signatures
  are separated by spaces: for a while after a rotation both the new and the previous
  secret sign, so a receiver can switch keys without losing deliveries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
# The spec asks for 24 to 64 random bytes.
SECRET_BYTES = 32
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64>` of one secret."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secrets_: Sequence[str], message_id: str, timestamp: int,
                   body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery attempt, signed with each
    of `secrets_` (the current one first)."""
    if not secrets_:
        raise ValueError("a webhook is signed with at least one secret")
    return {ID_HEADER: message_id, TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: " ".join(signature(s, message_id, timestamp, body)
                                       for s in secrets_)}
