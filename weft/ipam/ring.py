"""The IPAM ring: the allocation range split into spans owned by peers, merged as a CRDT.

The range ``[start, end)`` (IPv4 addresses as ints) is cut by *tokens*. Token ``t`` owns the span
from ``t`` to the next token (or ``end``). Every token carries an :class:`Entry`: its owner, a
version and the owner's advisory count of free addresses in the span. The first token is always
``start`` once the ring has been created; tokens are never deleted (a deletion could not be told
apart from "not heard of yet"), so the union of two rings' tokens is always a valid ring.

Rules that make the merge a CRDT and keep ownership exclusive:

* Only the owner of a span changes it: it may hand part of it to another peer (donation),
  hand all of it away (reset), or update its free counts; each change bumps the entry's version.
  The single exception is ``transfer`` (``rmpeer``), run by an operator on one peer for a peer that
  is gone for good; it bumps versions by :data:`TRANSFER_VERSION_BUMP` (as Weave, which used
  100), so the takeover wins over anything the dead peer may have gossiped just before dying.
  Run it once the mesh has settled: spans the dead peer gave away that we never heard of would
  be taken too, and show up as a conflict when that news arrives.
* Merge takes, token by token, the entry with the higher version. Equal versions with different
  contents, or anyone else changing or cutting a span that *we* own, is a conflict error.
* A ring is born from a list of seeds (by ``seed=`` or by consensus); rings with different seeds
  or different ranges never merge: that is a :class:`RingConflictError` too, reported to the user
  instead of silently joining two address spaces that may hand out the same address twice.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from weft.errors import ConfigError, ProtocolError, RemoteProtocolError
from weft.gossip.peer import PeerName

__all__ = [
    "TRANSFER_VERSION_BUMP",
    "Entry",
    "Ring",
    "RingConflictError",
    "RingData",
    "Span",
    "allocatable",
]

# rmpeer/transfer jumps versions by this much so the takeover wins over anything the dead peer
# may have said that we have not heard yet. Weave used 100; ours is larger because free-count
# updates bump versions too (at most about once a second per span) and travel lazily.
TRANSFER_VERSION_BUMP = 1 << 20
_MAX_ENTRIES = 1 << 20  # decoder bound: far more tokens than any real ring has

_names: dict[int, PeerName] = {}  # decoded owners, interned (bounded)
_seed_cache: tuple[list[int], tuple[PeerName, ...]] = ([], ())

FreeCounter = Callable[[int, int], int]
"""``free_of(lo, hi)``: how many addresses of ``[lo, hi)`` the owner has free."""


class RingConflictError(ProtocolError):
    """Two rings cannot be merged without risking one address owned twice.

    Raised for rings made by different seeds or over different ranges, for equal versions with
    different contents, and for anyone else changing a span we own. Never merged silently.
    """


@dataclass(frozen=True)
class Entry:
    """What a token says about its span: who owns it, how fresh this is, how much is free."""

    owner: PeerName
    version: int
    free: int


@dataclass(frozen=True)
class Span:
    """A contiguous piece of the ring ``[start, end)`` and its owner."""

    start: int
    end: int
    owner: PeerName
    version: int
    free: int

    @property
    def size(self) -> int:
        return self.end - self.start


def allocatable(start: int, end: int, range_start: int, range_end: int) -> int:
    """How many addresses of ``[start, end)`` may ever be handed out in the range.

    The range's own network and broadcast addresses (first and last) are never allocatable.
    """
    n = end - start
    if start <= range_start < end:
        n -= 1
    if start <= range_end - 1 < end and range_end - 1 != range_start:
        n -= 1
    return max(n, 0)


@dataclass
class RingData:
    """A set of ring entries in flight: a whole ring or a delta, plus the ring's identity.

    Implements :class:`weft.gossip.channel.GossipData` shape through :class:`IpamData`
    (see allocator); kept separate so the ring has no dependency on the channel layer.
    """

    start: int
    end: int
    seeds: tuple[PeerName, ...]
    entries: dict[int, Entry]

    def merge_in(self, other: RingData) -> None:
        """Coalesce ``other`` into self, keeping the higher version per token."""
        for token, entry in other.entries.items():
            mine = self.entries.get(token)
            if mine is None or entry.version > mine.version:
                self.entries[token] = entry
        if not self.seeds and other.seeds:
            self.seeds = other.seeds

    def to_wire(self) -> dict[str, Any]:
        return {
            "r": [self.start, self.end],
            "s": [int(s) for s in self.seeds],
            "e": [[t, int(e.owner), e.version, e.free] for t, e in sorted(self.entries.items())],
        }

    @classmethod
    def from_wire(cls, obj: object) -> RingData:
        """Decode and validate; anything malformed is a :class:`RemoteProtocolError`."""
        if not isinstance(obj, Mapping):
            raise RemoteProtocolError("ipam ring: expected a map")
        rng = obj.get("r")
        seeds = obj.get("s")
        entries = obj.get("e")
        if not (
            isinstance(rng, list)
            and len(rng) == 2
            and all(isinstance(x, int) and 0 <= x <= 1 << 32 for x in rng)
            and rng[0] < rng[1]
        ):
            raise RemoteProtocolError("ipam ring: bad range")
        if not isinstance(seeds, list) or len(seeds) > _MAX_ENTRIES:
            raise RemoteProtocolError("ipam ring: bad seeds")
        if not isinstance(entries, list) or len(entries) > _MAX_ENTRIES:
            raise RemoteProtocolError("ipam ring: bad entries")
        start, end = rng
        global _seed_cache
        if seeds == _seed_cache[0]:
            seed_names = _seed_cache[1]  # the same seeds arrive with every delta: decode once
        else:
            try:
                seed_names = tuple(PeerName(s) for s in seeds if isinstance(s, int))
            except ConfigError as err:
                raise RemoteProtocolError(f"ipam ring: {err}") from None
            if len(seed_names) != len(seeds):
                raise RemoteProtocolError("ipam ring: bad seed name")
            _seed_cache = (list(seeds), seed_names)
        out: dict[int, Entry] = {}
        size = end - start
        for item in entries:
            if type(item) is not list or len(item) != 4:
                raise RemoteProtocolError("ipam ring: bad entry")
            token, owner, version, free = item
            if not (
                type(token) is int
                and type(owner) is int
                and type(version) is int
                and type(free) is int
                and start <= token < end
                and version >= 0
                and 0 <= free <= size
            ):
                raise RemoteProtocolError("ipam ring: bad entry")
            name = _names.get(owner)
            if name is None:
                if not 0 <= owner < 1 << 48:
                    raise RemoteProtocolError("ipam ring: bad owner")
                name = PeerName(owner)
                if len(_names) < 1 << 16:
                    _names[owner] = name
            out[token] = Entry(name, version, free)
        return cls(start, end, seed_names, out)


class Ring:
    """One peer's view of the ring. ``local`` is the peer whose spans only it may change."""

    def __init__(self, start: int, end: int, local: PeerName) -> None:
        if not 0 <= start < end <= 1 << 32:
            raise ConfigError(f"invalid ring range [{start}, {end})")
        self.start = start
        self.end = end
        self.local = local
        self.seeds: tuple[PeerName, ...] = ()
        self._tokens: list[int] = []
        self._entries: dict[int, Entry] = {}
        self._owned: dict[PeerName, list[tuple[int, int]]] | None = None  # owned_ranges cache

    # ----- queries -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the ring has been created (by seeds, consensus or gossip)."""
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def entries(self) -> dict[int, Entry]:
        return dict(self._entries)

    def entry(self, token: int) -> Entry | None:
        return self._entries.get(token)

    def spans(self) -> Iterator[Span]:
        for i, token in enumerate(self._tokens):
            nxt = self._tokens[i + 1] if i + 1 < len(self._tokens) else self.end
            e = self._entries[token]
            yield Span(token, nxt, e.owner, e.version, e.free)

    def span_of(self, token: int) -> Span:
        i = bisect.bisect_left(self._tokens, token)
        if i == len(self._tokens) or self._tokens[i] != token:
            raise KeyError(token)
        nxt = self._tokens[i + 1] if i + 1 < len(self._tokens) else self.end
        e = self._entries[token]
        return Span(token, nxt, e.owner, e.version, e.free)

    def owner(self, addr: int) -> PeerName | None:
        """The owner of ``addr``, or None when the ring is not ready or addr is outside it."""
        if not self._tokens or not self.start <= addr < self.end:
            return None
        i = bisect.bisect_right(self._tokens, addr) - 1
        if i < 0:
            return None
        return self._entries[self._tokens[i]].owner

    def owned_ranges(self, peer: PeerName) -> list[tuple[int, int]]:
        """``[start, end)`` ranges owned by ``peer``, adjacent spans joined, lowest first.

        Cached: the cache only changes when a token is added or changes owner.
        """
        if self._owned is None:
            owned: dict[PeerName, list[tuple[int, int]]] = {}
            tokens = self._tokens
            bounds = [*tokens[1:], self.end]
            for token, nxt in zip(tokens, bounds, strict=True):
                out = owned.setdefault(self._entries[token].owner, [])
                if out and out[-1][1] == token:
                    out[-1] = (out[-1][0], nxt)
                else:
                    out.append((token, nxt))
            self._owned = owned
        return list(self._owned.get(peer, ()))

    def owners(self) -> set[PeerName]:
        return {e.owner for e in self._entries.values()}

    def owned_and_free(self) -> dict[PeerName, tuple[int, int]]:
        """Per owner: (addresses owned, free as advertised by the owner)."""
        out: dict[PeerName, tuple[int, int]] = {}
        for s in self.spans():
            owned, free = out.get(s.owner, (0, 0))
            out[s.owner] = (owned + s.size, free + s.free)
        return out

    def data(self, tokens: Iterable[int] | None = None) -> RingData:
        """The whole ring (or just ``tokens``) as :class:`RingData`."""
        if tokens is None:
            picked = dict(self._entries)
        else:
            picked = {t: self._entries[t] for t in tokens if t in self._entries}
        return RingData(self.start, self.end, self.seeds, picked)

    def check_invariants(self) -> None:
        """Assert the structural invariants (used by tests after every step)."""
        tokens = self._tokens
        assert all(a < b for a, b in itertools.pairwise(tokens))
        assert len(tokens) == len(self._entries)
        if self._tokens:
            assert self._tokens[0] == self.start, "first token must be the range start"
            assert self._tokens[-1] < self.end
            assert self.seeds, "a created ring has seeds"
        # Free counts are the owner's advice; a view may hold a count from before a cut it
        # has heard of, so only our own spans must be exact (the allocator checks those).
        assert all(e.free >= 0 for e in self._entries.values())

    # ----- creation ------------------------------------------------------------------------

    def create(self, seeds: Iterable[PeerName]) -> list[int]:
        """Split the whole range evenly between ``seeds`` (sorted). Returns the tokens made.

        Every peer computes the same ring from the same seeds, so two peers that agreed on the
        seeds (by configuration or by consensus) can each create it without talking.
        """
        names = tuple(sorted(set(seeds)))
        if not names:
            raise ConfigError("a ring needs at least one seed")
        if self._tokens:
            if names != self.seeds:
                raise RingConflictError(self._seed_conflict_message(names))
            return []
        size = self.end - self.start
        if len(names) > size:
            raise ConfigError(f"{len(names)} seeds cannot share a range of {size} addresses")
        self.seeds = names
        made = []
        for i, name in enumerate(names):
            lo = self.start + size * i // len(names)
            hi = self.start + size * (i + 1) // len(names)
            self._insert(lo, Entry(name, 0, allocatable(lo, hi, self.start, self.end)))
            made.append(lo)
        return made

    def _seed_conflict_message(self, theirs: tuple[PeerName, ...]) -> str:
        def show(names: tuple[PeerName, ...]) -> str:
            shown = ", ".join(str(n) for n in names[:5])
            return shown + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

        return (
            f"IPAM ring conflict: our ring was created by seeds [{show(self.seeds)}] but a peer's "
            f"ring by [{show(theirs)}]; these are different address spaces and will not be "
            "merged. Reset IPAM (`weft reset`) on the peers of one of them."
        )

    # ----- merge ---------------------------------------------------------------------------

    def check_compatible(self, other: RingData) -> None:
        """Raise :class:`RingConflictError` if ``other`` belongs to a different ring."""
        if (other.start, other.end) != (self.start, self.end):
            raise RingConflictError(
                f"IPAM range conflict: ours is {_cidr(self.start, self.end)}, a peer's is "
                f"{_cidr(other.start, other.end)}; set the same --ipalloc-range everywhere"
            )
        if other.entries and not other.seeds:
            raise RingConflictError("IPAM ring from a peer has entries but no seeds")
        if self._tokens and other.seeds and other.seeds != self.seeds:
            raise RingConflictError(self._seed_conflict_message(other.seeds))

    def merge(self, other: RingData, moved: set[int] | None = None) -> RingData | None:
        """Merge ``other`` in; return the entries that were new to us (None if nothing was).

        All-or-nothing: on :class:`RingConflictError` the ring is unchanged. If ``moved`` is
        given, the tokens that are new or changed owner are added to it (the rest of the
        news are free counts, which are only advice).
        """
        self.check_compatible(other)
        if not other.entries:
            return None
        if not self._tokens and other.start not in other.entries:
            # A fragment of a ring we have never seen: we cannot place it without its start.
            # Wait for a full ring (snapshot) instead of building a ring with a hole.
            return None
        changed: dict[int, Entry] = {}
        for token, theirs in sorted(other.entries.items()):
            mine = self._entries.get(token)
            if mine is None:
                owner_here = self.owner(token)
                if owner_here == self.local:
                    raise RingConflictError(
                        f"IPAM ring conflict: peer {theirs.owner} cut our span at "
                        f"{_ip(token)}; only the owner may change its ranges"
                    )
                changed[token] = theirs
            elif theirs.version > mine.version:
                if mine.owner == self.local and theirs != mine:
                    raise RingConflictError(
                        f"IPAM ring conflict: a peer claims our span at {_ip(token)} for "
                        f"{theirs.owner} (version {theirs.version} > ours {mine.version}); was "
                        "this peer removed with rmpeer while it was still running?"
                    )
                changed[token] = theirs
            elif theirs.version == mine.version and theirs != mine:
                raise RingConflictError(
                    f"IPAM ring conflict at {_ip(token)}: version {mine.version} is owned by "
                    f"{mine.owner} here and by {theirs.owner} at a peer (rmpeer run on two peers?)"
                )
        if not changed:
            return None
        if not self._tokens:
            self.seeds = other.seeds
        for token, entry in changed.items():
            if moved is not None:
                old = self._entries.get(token)
                if old is None or old.owner != entry.owner:
                    moved.add(token)
            self._insert(token, entry)
        return RingData(self.start, self.end, self.seeds, changed)

    # ----- changes by the local owner ------------------------------------------------------

    def _insert(self, token: int, entry: Entry) -> None:
        old = self._entries.get(token)
        if old is None:
            bisect.insort(self._tokens, token)
            self._owned = None
        elif old.owner != entry.owner:
            self._owned = None
        self._entries[token] = entry

    def _require_local(self, start: int, end: int) -> None:
        if not self.start <= start < end <= self.end:
            raise ConfigError(f"span [{_ip(start)}, {_ip(end)}) is outside the range")
        i = bisect.bisect_right(self._tokens, start) - 1
        if i < 0:
            raise ConfigError("ring not ready")
        while i < len(self._tokens) and self._tokens[i] < end:
            if self._entries[self._tokens[i]].owner != self.local:
                raise ConfigError(f"span at {_ip(self._tokens[i])} is not ours")
            i += 1

    def _split_at(self, point: int) -> list[int]:
        """Make sure a token exists at ``point`` (same owner as before). Returns new tokens."""
        if point >= self.end or point in self._entries:
            return []
        i = bisect.bisect_right(self._tokens, point) - 1
        prev = self._entries[self._tokens[i]]
        # The new token starts at version 0 (nobody has ever seen a token here: tokens are never
        # deleted and only the owner of the span can cut it); the free counts are fixed by the
        # caller via set_free.
        self._insert(point, Entry(prev.owner, 0, 0))
        return [point]

    def set_free(self, token: int, free: int) -> bool:
        """The owner updates its free count of a span; bumps the version. True if it changed."""
        e = self._entries[token]
        if e.owner != self.local:
            raise ConfigError(f"span at {_ip(token)} is not ours")
        if e.free == free:
            return False
        self._insert(token, Entry(e.owner, e.version + 1, free))
        return True

    def give(self, start: int, end: int, to: PeerName, free_of: FreeCounter) -> list[int]:
        """Hand ``[start, end)`` (ours) to ``to``; return the tokens to send.

        ``free_of(lo, hi)`` tells how many addresses are free in a span (the allocator knows).
        The tokens to send include the one at ``end`` even when unchanged: a peer that learns
        it owns a span must also learn where the span ends, or it could believe it owns
        whatever lies up to the next token it happens to know (see :meth:`with_boundaries`).
        """
        self._require_local(start, end)
        touched = self._split_at(start) + self._split_at(end)
        i = bisect.bisect_left(self._tokens, start)
        while i < len(self._tokens) and self._tokens[i] < end:
            token = self._tokens[i]
            span = self.span_of(token)
            e = self._entries[token]
            self._insert(token, Entry(to, e.version + 1, free_of(span.start, span.end)))
            touched.append(token)
            i += 1
        # Our own span before ``start`` (if we cut it) and after ``end`` need fresh free counts.
        for point in (start, end):
            if point in self._entries:
                j = bisect.bisect_left(self._tokens, point)
                for k in (j - 1, j):
                    if 0 <= k < len(self._tokens):
                        t = self._tokens[k]
                        if self._entries[t].owner == self.local:
                            span = self.span_of(t)
                            new_free = free_of(span.start, span.end)
                            e = self._entries[t]
                            if e.free != new_free or t in touched:
                                self._insert(t, Entry(e.owner, e.version + 1, new_free))
                                touched.append(t)
        return self.with_boundaries(touched)

    def with_boundaries(self, tokens: Iterable[int]) -> list[int]:
        """``tokens`` plus, for each, the next token (where its span ends), sorted."""
        out = set(tokens)
        for t in list(out):
            i = bisect.bisect_right(self._tokens, t)
            if i < len(self._tokens):
                out.add(self._tokens[i])
        return sorted(out)

    def give_all(self, to: PeerName) -> list[int]:
        """Hand every span we own to ``to`` (``reset``); free counts become whole spans."""
        touched = []
        for s in list(self.spans()):
            if s.owner == self.local:
                e = self._entries[s.start]
                self._insert(
                    s.start,
                    Entry(to, e.version + 1, allocatable(s.start, s.end, self.start, self.end)),
                )
                touched.append(s.start)
        return self.with_boundaries(touched)

    def transfer(self, dead: PeerName) -> tuple[list[int], int]:
        """``rmpeer``: take every span of ``dead``. Returns (tokens changed, addresses taken).

        The caller must be sure ``dead`` is gone for good; its versions jump by
        :data:`TRANSFER_VERSION_BUMP` so the takeover wins over its last words.
        """
        if dead == self.local:
            raise ConfigError("cannot rmpeer ourselves; use reset")
        touched: list[int] = []
        taken = 0
        for s in list(self.spans()):
            if s.owner == dead:
                e = self._entries[s.start]
                self._insert(
                    s.start,
                    Entry(
                        self.local,
                        e.version + TRANSFER_VERSION_BUMP,
                        allocatable(s.start, s.end, self.start, self.end),
                    ),
                )
                touched.append(s.start)
                taken += s.size
        return self.with_boundaries(touched), taken


def _ip(addr: int) -> str:
    return ".".join(str((addr >> s) & 0xFF) for s in (24, 16, 8, 0))


def _cidr(start: int, end: int) -> str:
    size = end - start
    if size & (size - 1) == 0 and start % size == 0:
        return f"{_ip(start)}/{32 - size.bit_length() + 1}"
    return f"[{_ip(start)}, {_ip(end)})"
