"""The gateway's settings: GatewayConfig (core/config.py), protection and alerting
included, under the name the gateway's code uses.

Every limit it sets is held in one gateway process's memory: with several gateway
replicas behind a load balancer each replica enforces it on its own share of the
traffic (a key limited to 600 requests a minute can make up to 600 per replica).
"""

from __future__ import annotations

from thaw.core.config import GatewayConfig

GatewaySettings = GatewayConfig

__all__ = ["GatewaySettings"]
