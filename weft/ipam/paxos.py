"""Single-decree Paxos over gossip, to agree once on the peers that split the range.

Every peer keeps one :class:`Claim` per peer it has heard of. Only peer ``n`` changes claim ``n``,
and each change makes ``(promise, accepted)`` larger, so merging two views (keep the larger per
peer) is a CRDT: the claims travel on the ordinary ipam gossip as deltas and any peer can see
when a quorum has accepted.

The classic roles, read off the merged claims after every input (:meth:`Paxos.think`):

* acceptor: promise the highest proposal id seen anywhere; accept a value when the proposer of
  the proposal we promised has itself accepted it (the proposer accepts first, carrying the value);
* proposer: once a quorum promised our proposal, accept the value with the highest accepted id
  among them (or our own value if none) - that is the safety rule of Paxos;
* learner: a value is chosen when a quorum accepted the same proposal id.

Fast in practice: normally only the lowest-named peer proposes (the allocator decides who and
when), so there is one round: proposal -> promises -> accept -> accepts -> chosen. The allocator
floods only the proposer's claim, the value and the "chosen" notice (:meth:`Paxos.learn`);
acceptors answer the proposer by unicast, so a round costs three floods and O(n) unicasts, not
a flood per peer. Competing proposals only cost retries, never safety.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from weft.errors import RemoteProtocolError
from weft.gossip.peer import PeerName

__all__ = ["NO_PROPOSAL", "Claim", "Paxos", "ProposalId"]

ProposalId = tuple[int, int]  # (round, proposer's name); compared as tuples
NO_PROPOSAL: ProposalId = (0, 0)
_MAX_CLAIMS = 100_000
_MAX_VALUE = 100_000
_ID_BOUND = 1 << 63


@dataclass(frozen=True)
class Claim:
    """What one peer has promised and accepted (the value lives in ``Paxos.values``)."""

    promise: ProposalId = NO_PROPOSAL
    accepted: ProposalId = NO_PROPOSAL

    def key(self) -> tuple[ProposalId, ProposalId]:
        return (self.promise, self.accepted)


class Paxos:
    """The local view of everyone's claims; ``quorum`` is fixed by configuration."""

    def __init__(self, local: PeerName, quorum: int) -> None:
        if quorum < 1:
            raise ValueError("quorum must be at least 1")
        self.local = local
        self.quorum = quorum
        self.claims: dict[PeerName, Claim] = {}
        # Kept incrementally so each input costs O(claims in it), not O(peers).
        self._top: ProposalId = NO_PROPOSAL
        self._promised: dict[ProposalId, int] = {}
        self._accepted: dict[ProposalId, int] = {}
        self._set(local, Claim())
        # A proposal's value is set once, by its proposer, when it accepts its own proposal; it
        # travels once per proposal instead of with every acceptor's claim (grow-only map).
        self.values: dict[ProposalId, tuple[PeerName, ...]] = {}
        self._my_value: tuple[PeerName, ...] = ()
        self._chosen: tuple[PeerName, ...] | None = None
        self.chosen_id: ProposalId | None = None

    def restore(self, claim: Claim) -> None:
        """Our own claim as persisted before a restart (promises must survive a crash)."""
        self._set(self.local, claim)

    @property
    def mine(self) -> Claim:
        return self.claims[self.local]

    def highest_round(self) -> int:
        return self._top[0]

    def _set(self, name: PeerName, claim: Claim) -> None:
        old = self.claims.get(name)
        if old is not None:
            self._promised[old.promise] -= 1
            self._accepted[old.accepted] -= 1
        self.claims[name] = claim
        self._promised[claim.promise] = self._promised.get(claim.promise, 0) + 1
        self._accepted[claim.accepted] = self._accepted.get(claim.accepted, 0) + 1
        self._top = max(self._top, claim.promise)

    def propose(self, value: tuple[PeerName, ...] = ()) -> None:
        """Start a new proposal with a round above anything seen.

        Its value, unless Paxos forces an earlier one, is ``value`` or (empty) every peer whose
        claim we know when a quorum has promised.
        """
        pid = (self.highest_round() + 1, int(self.local))
        self._my_value = tuple(sorted(value))
        c = self.mine
        self._set(self.local, Claim(pid, c.accepted))
        self.think()

    def merge_values(
        self, values: Mapping[ProposalId, tuple[PeerName, ...]]
    ) -> dict[ProposalId, tuple[PeerName, ...]]:
        """Merge proposal values; returns the ones that were new."""
        new = {}
        for pid, value in values.items():
            if pid not in self.values and value:
                self.values[pid] = value
                new[pid] = value
        return new

    def merge(self, claims: Mapping[PeerName, Claim]) -> dict[PeerName, Claim]:
        """Merge others' claims; returns those that were new (not including our reaction)."""
        new: dict[PeerName, Claim] = {}
        for name, claim in claims.items():
            if name == self.local:
                # Nobody else may speak for us; an echo of our own (older) claim is harmless.
                continue
            mine = self.claims.get(name)
            if mine is None or claim.key() > mine.key():
                self._set(name, claim)
                new[name] = claim
        return new

    def think(self) -> bool:
        """Play acceptor, proposer and learner on the merged view. True if our claim changed."""
        before = self.mine
        c = before
        top = self._top
        if top > c.promise:
            c = Claim(top, c.accepted)
        proposer = PeerName(c.promise[1]) if c.promise != NO_PROPOSAL else None
        if proposer is not None and proposer != self.local:
            if c.promise in self.values and c.accepted != c.promise:
                c = Claim(c.promise, c.promise)
        elif (
            proposer == self.local
            and c.accepted != c.promise
            and self._promised.get(c.promise, 0) >= self.quorum
        ):
            promised = [x for x in self.claims.values() if x.promise == c.promise]
            prior = max(x.accepted for x in promised)
            # Our own value: every participant we know of (announcements and promises).
            mine = tuple(sorted(self.claims)) if not self._my_value else self._my_value
            value = self.values.get(prior) if prior != NO_PROPOSAL else mine
            # An accepted proposal whose value has not reached us yet: wait for it.
            if value:
                self.values[c.promise] = value
                c = Claim(c.promise, c.promise)
        if c != before:
            self._set(self.local, c)
        return c != before

    def learn(self, pid: ProposalId) -> None:
        """The proposer of ``pid`` saw a quorum accept it (learners trust that, not recount)."""
        if pid != NO_PROPOSAL:
            self.chosen_id = self.chosen_id or pid

    def chosen(self) -> tuple[PeerName, ...] | None:
        """The agreed value, once a quorum accepted the same proposal (or we learnt so)."""
        if self._chosen is not None:
            return self._chosen
        if self.chosen_id is not None and self.chosen_id in self.values:
            self._chosen = self.values[self.chosen_id]
            return self._chosen
        for pid, n in self._accepted.items():
            if pid != NO_PROPOSAL and n >= self.quorum and pid in self.values:
                self._chosen = self.values[pid]
                self.chosen_id = pid
                return self._chosen
        return None

    # ----- wire ----------------------------------------------------------------------------

    @staticmethod
    def to_wire(claims: Mapping[PeerName, Claim]) -> list[list[int]]:
        return [[int(n), *c.promise, *c.accepted] for n, c in claims.items()]

    @staticmethod
    def values_to_wire(values: Mapping[ProposalId, tuple[PeerName, ...]]) -> list[list[Any]]:
        return [[r, p, [int(v) for v in value]] for (r, p), value in values.items()]

    @staticmethod
    def values_from_wire(obj: object) -> dict[ProposalId, tuple[PeerName, ...]]:
        if not isinstance(obj, list) or len(obj) > _MAX_CLAIMS:
            raise RemoteProtocolError("ipam paxos: expected a list of values")
        out: dict[ProposalId, tuple[PeerName, ...]] = {}
        for item in obj:
            if not (isinstance(item, list) and len(item) == 3):
                raise RemoteProtocolError("ipam paxos: bad value entry")
            r, p, value = item
            if not (
                isinstance(r, int)
                and isinstance(p, int)
                and 0 <= r < 1 << 63
                and 0 <= p < 1 << 48
                and isinstance(value, list)
                and 0 < len(value) <= _MAX_VALUE
                and all(isinstance(v, int) and 0 <= v < 1 << 48 for v in value)
            ):
                raise RemoteProtocolError("ipam paxos: bad value")
            out[(r, p)] = tuple(PeerName(v) for v in value)
        return out

    @staticmethod
    def from_wire(obj: object) -> dict[PeerName, Claim]:
        if not isinstance(obj, list) or len(obj) > _MAX_CLAIMS:
            raise RemoteProtocolError("ipam paxos: expected a list of claims")
        out: dict[PeerName, Claim] = {}
        bound = _ID_BOUND
        for item in obj:
            if type(item) is not list or len(item) != 5:
                raise RemoteProtocolError("ipam paxos: bad claim")
            name, pr, pp, ar, ap = item
            if not (
                type(name) is int
                and type(pr) is int
                and type(pp) is int
                and type(ar) is int
                and type(ap) is int
                and 0 <= name < 1 << 48
                and 0 <= pr < bound
                and 0 <= pp < bound
                and 0 <= ar < bound
                and 0 <= ap < bound
            ):
                raise RemoteProtocolError("ipam paxos: bad claim")
            out[PeerName(name)] = Claim((pr, pp), (ar, ap))
        return out
