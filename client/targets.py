"""Where a client's calls go: one server, every address a name resolves to, or a list of servers.

gRPC keeps one HTTP/2 connection per target and sends every call of a channel over it, so
behind a Kubernetes ClusterIP Service all of a client's calls reach one pod. Two ways to spread
them over every replica:

- a resolver target, ``dns:///NAME:PORT`` (a headless Service: one address per ready pod) or
  ``ipv4:ADDR:PORT,ADDR:PORT``: the channel connects to every address and sends round-robin
  (``ROUND_ROBIN``); gRPC resolves the name again when a connection drops, so a pod that goes
  away is left out, but a new pod is found only at such a re-resolution;
- a comma-separated list of ``HOST:PORT``: one channel per server, and the calls take turns.
"""

from __future__ import annotations

from typing import Any

#: Target prefixes that name a gRPC resolver (every address it yields is a server of the target).
RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")
#: The channel option that sends a resolver target's calls round-robin over all its addresses
#: (gRPC's default, pick_first, would send them all to the first).
ROUND_ROBIN: tuple[str, Any] = ("grpc.lb_policy_name", "round_robin")


def is_resolver_target(target: str) -> bool:
    return target.startswith(RESOLVER_SCHEMES)


def split_targets(target: str) -> list[str]:
    """The servers of ``target``: a resolver target is one (its resolver finds the addresses), a
    comma-separated list is several. ``ValueError`` for an empty one."""
    parts = [target.strip()] if is_resolver_target(target) else [part.strip() for part in target.split(",")]
    if not all(parts):
        raise ValueError(f"target {target!r}: expected HOST:PORT, HOST:PORT,... or dns:///NAME:PORT")
    return parts


def balancing_options(target: str) -> list[tuple[str, Any]]:
    """Channel options for one target of ``split_targets``: round-robin over a resolver's addresses."""
    return [ROUND_ROBIN] if is_resolver_target(target) else []
