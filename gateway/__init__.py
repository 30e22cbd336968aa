"""The HTTP edge: function URLs, the management API, auth, metrics, dashboard."""

from thaw.gateway.app import make_app

__all__ = ["make_app"]
