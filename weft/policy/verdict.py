"""What one node's ruleset does with a new connection, read from :class:`DesiredState` (pure).

The same decision the fixed chains of weft/policy/nft.py take over the set elements, for the
places that must agree with the kernel without asking it: cutting established flows a change
denies (the reconciler evaluates each conntrack entry's original direction here) and the tests.
"""

from __future__ import annotations

from weft.policy.compiler import AddrRange, DesiredState, DirectionState
from weft.policy.model import IPAddress

__all__ = ["chain_accepts"]


def _hit_all(state: DirectionState, local: IPAddress, peer: IPAddress) -> bool:
    lh = AddrRange.host(local)
    return any(e.local == lh and e.peer.contains(peer) for e in state.allow_all)


def _hit_ports(
    state: DirectionState, local: IPAddress, peer: IPAddress, proto: str, port: int | None
) -> bool:
    if port is None:
        return False
    lh = AddrRange.host(local)
    return any(
        e.local == lh
        and e.peer.contains(peer)
        and e.protocol == proto
        and e.ports.first <= port <= e.ports.last
        for e in state.allow_ports
    )


def chain_accepts(
    state: DesiredState, src: IPAddress, dst: IPAddress, proto: str, port: int | None
) -> bool:
    """Chain ``check`` of one node for a new connection (not established, not ND).

    ``proto`` "TCP"/"UDP"/"SCTP" with ``port``, or e.g. "ICMP" with None: only the
    all-protocol sets match it, as ``meta l4proto . th dport`` never equals a tcp/udp/sctp key.
    """
    s, d = AddrRange.host(src), AddrRange.host(dst)
    if s in state.node_addresses:
        return True
    if src == dst and s in state.local_addresses:
        return True
    if s in state.egress.isolated and not (
        _hit_all(state.egress, src, dst) or _hit_ports(state.egress, src, dst, proto, port)
    ):
        return False
    return not (
        d in state.ingress.isolated
        and not (
            _hit_all(state.ingress, dst, src) or _hit_ports(state.ingress, dst, src, proto, port)
        )
    )
