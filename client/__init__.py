"""thaw's Python client: call, stream, submit and deploy functions over the API.

    from thaw.client import Client

    client = Client()                      # THAW_URL / THAW_API_KEY, or `thaw login`
    embed = client.function("embed")
    print(embed.call(text="hello"))

See docs/client.md."""

from thaw.client.aio import AsyncClient, AsyncFunction, AsyncInvocation
from thaw.client.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ResultTimeout,
    ServerError,
    ThawError,
    Unauthorized,
    Unavailable,
)
from thaw.client.retry import NO_RETRY, RetryPolicy
from thaw.client.sync import Client, Function, Invocation

__all__ = [
    "NO_RETRY", "AsyncClient", "AsyncFunction", "AsyncInvocation", "Client", "Conflict",
    "Forbidden", "Function", "InvalidInput", "Invocation", "NotFound", "PayloadTooLarge",
    "RateLimited", "ResultTimeout", "RetryPolicy", "ServerError", "ThawError",
    "Unauthorized", "Unavailable",
]
