"""IPsec ESP for a fast part's links (weft.fastdp.vxlan_part.VxlanPart; the OVS part can
use it the same way).

With a password every fast path runs over ESP (weft.fastdp.esp): per connection each side lets
its kernel pick its inbound SPI, the link (weft.fastdp.link.FastPathLink, ``encrypted=True``)
sends it to the peer, and once both SPIs are known the SAs and policies are installed; only then
does the link start heartbeats, so a path can become healthy -- and carry -- only through ESP.

:class:`EspLinks` turns the link's events into kernel work and feeds the results back:

* ``SpiRequested`` -> ``xfrm.alloc_spi(local_ip, remote_ip)`` -> ``link.spi_allocated(spi)``;
* ``EspReady(in_spi, out_spi)`` -> ``xfrm.install(EspPair(...), esp_key(data_send_key),
  esp_key(data_recv_key))`` -> the part's ``publish`` hook (vxlan: the peer's FDB entries) ->
  ``link.esp_installed(now)``;
* the link stops -> the part's ``withdraw`` hook (vxlan: the peer's FDB entries go) ->
  ``xfrm.remove(pair)`` -> ``guard.forget(remote_ip)`` when no other link needs it;
* at the part's start ``xfrm.remove_stale()`` and ``guard.start()`` (before any tunnel device
  exists), at its close every pair is removed and the guard table deleted.

The invariant that keeps plaintext off the wire: *a datapath has forwarding state towards a peer
only while an outbound policy for that peer exists.* The outbound policy is the first thing
``install`` adds and requires ESP (without an SA the kernel drops, never sends in the clear);
``publish`` runs after ``install`` and ``withdraw`` before any removal, all on the part's one
worker thread, in order with the part's own datapath jobs. Heartbeat probes are sent only after
``esp_installed``. Inbound, ``guard.require_esp_from(remote_ip)`` is in place from the moment the
link starts (before the SPI exchange): plain VXLAN from that peer is dropped.

A new SPI from the peer on the same link (re-announce) re-keys: the peer's forwarding entries are
withdrawn, the outbound SA and both policies replaced (our inbound SA stays: its SPI is still the
one the peer sends to), then published again and the link re-proves the path.

Errors are not retried: the link's ESP fails once with the reason (``failed(reason)``: the
switch keeps that connection on sleeve and shows why); an error saying the kernel lacks ESP
(ENOSYS, EPROTONOSUPPORT, EAFNOSUPPORT, EOPNOTSUPP) also sets :attr:`EspLinks.fatal`, and the part
stops offering the fast path to new connections.

Threads: methods marked *worker* run on the part's worker thread (through ``submit``), the rest
on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from weft.errors import LocalError
from weft.fastdp.esp import (
    GUARD_TABLE,
    VXLAN_PORT,
    EspPair,
    InboundGuard,
    XfrmClient,
    esp_key,
)
from weft.fastdp.link import EspReady, FastPathLink, LinkEvent, SpiRequested
from weft.gossip.peer import PeerName

__all__ = [
    "EspLink",
    "EspLinks",
    "GuardLike",
    "StrictInboundGuard",
    "XfrmLike",
    "make_esp",
]

log = logging.getLogger("weft.fastdp")

_NO_KERNEL_ESP = {errno.ENOSYS, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP}


class XfrmLike(Protocol):
    """What we use of ``weft.fastdp.esp.XfrmClient``."""

    def alloc_spi(self, local_ip: str, remote_ip: str) -> int: ...

    def install(self, pair: EspPair, send_key: bytes, recv_key: bytes) -> None: ...

    def remove(self, pair: EspPair) -> None: ...

    def remove_stale(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


class GuardLike(Protocol):
    """What we use of ``weft.fastdp.esp.InboundGuard``."""

    def start(self) -> None: ...

    def require_esp_from(self, ip: str) -> None: ...

    def forget(self, ip: str) -> None: ...

    def stop(self) -> None: ...


class StrictInboundGuard(InboundGuard):
    """The inbound guard of a router with a password: *every* UDP 6784 packet without ESP is
    dropped, whatever its source.

    ``weft.fastdp.esp.InboundGuard`` drops plain VXLAN only from the IPs of encrypted peers, so
    a host that is not a peer could still inject frames through the vxlan device. With a
    password every legitimate tunnel packet is ESP, so this guard needs no per-peer state: same
    table (``inet weft-esp``, so either guard's leftovers are stale to the other), one rule
    ``udp dport 6784 meta ipsec missing counter drop`` in the input hook. ``require_esp_from`` and
    ``forget`` only keep the set of peers for status.
    """

    def __init__(self, nft: tuple[str, ...] = ("nft",), port: int = VXLAN_PORT) -> None:
        super().__init__(nft, port)
        self.peers: set[str] = set()

    def start(self) -> None:
        self._run(
            f"create nftables table inet {GUARD_TABLE}",
            f"table inet {GUARD_TABLE} {{}}\n"
            f"delete table inet {GUARD_TABLE}\n"
            f"table inet {GUARD_TABLE} {{\n"
            "  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            f"    udp dport {self.port} meta ipsec missing counter drop\n"
            "  }\n"
            "}\n",
        )

    def require_esp_from(self, ip: str) -> None:
        self.peers.add(ip)

    def forget(self, ip: str) -> None:
        self.peers.discard(ip)


Submit = Callable[[Callable[[], Any]], "Future[Any]"]
Hook = Callable[[], None]


@dataclass(eq=False)
class EspLink:
    """One link's ESP (loop side; the part keeps it with its handle)."""

    remote: PeerName
    local_ip: str
    remote_ip: str
    send_key: bytes  # esp_key(data_send_key): our outbound SA
    recv_key: bytes  # esp_key(data_recv_key): our inbound SA
    in_spi: int | None = None
    pair: EspPair | None = None  # installed (as the loop last heard)
    installs: int = 0
    stopped: bool = False
    failed: str = ""


class EspLinks:
    """ESP for the links of one fast part.

    ``xfrm_factory()`` opens the NETLINK_XFRM client on the worker thread at :meth:`start`;
    ``guard`` is the inbound nftables guard. :meth:`bind` gives the loop and the part's
    ``submit`` (one worker thread, jobs in order). ``name`` prefixes reasons ("vxlan: ESP: ...").
    """

    def __init__(
        self, xfrm_factory: Callable[[], XfrmLike], guard: GuardLike, name: str = "vxlan"
    ) -> None:
        self.name = name
        self._factory = xfrm_factory
        self._guard = guard
        self._loop: asyncio.AbstractEventLoop | None = None
        self._submit: Submit | None = None
        self.fatal = ""  # the kernel cannot do ESP after all (why); set once
        self.error = ""  # the last ESP error of any link
        self.stale: tuple[int, int] = (0, 0)  # SAs and policies a crashed router left
        self.links: set[EspLink] = set()  # loop side
        # worker side
        self._lock = threading.Lock()
        self._xfrm: XfrmLike | None = None
        self._started = False
        self._installed: dict[str, tuple[EspLink, EspPair]] = {}  # by remote IP
        self._larval: dict[EspLink, EspPair] = {}  # SPI allocated, nothing installed yet
        self._guard_refs: Counter[str] = Counter()
        self._guarded: set[EspLink] = set()  # links holding a guard reference

    def bind(self, loop: asyncio.AbstractEventLoop, submit: Submit) -> None:
        self._loop = loop
        self._submit = submit

    # -- worker: part lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """*Worker*, before the part creates its tunnel device: stale SAs/policies go, the
        inbound guard table is (re)created empty."""
        with self._lock:
            if self._started:
                return
            self._xfrm = self._factory()
            self.stale = self._xfrm.remove_stale()
            if self.stale != (0, 0):
                log.info("removed stale ESP: %d SAs, %d policies", *self.stale)
            self._guard.start()
            self._started = True

    def stop(self) -> None:
        """*Worker*, after the part removed its tunnel device: every pair and the guard go."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            xfrm = self._xfrm
            assert xfrm is not None
            for _, pair in list(self._installed.values()):
                self._quietly(f"remove ESP to {pair.remote_ip}", xfrm.remove, pair)
            for pair in list(self._larval.values()):
                self._quietly(f"remove ESP SPI {pair.in_spi:#x}", xfrm.remove, pair)
            self._installed.clear()
            self._larval.clear()
            self._guard_refs.clear()
            self._guarded.clear()
            self._quietly("remove the ESP inbound guard", self._guard.stop)
            xfrm.close()
            self._xfrm = None

    # -- loop: per link -------------------------------------------------------------------------

    def link_started(
        self,
        remote: PeerName,
        local_ip: str,
        remote_ip: str,
        data_send_key: bytes | None,
        data_recv_key: bytes | None,
    ) -> EspLink:
        """A link starts (its first event is ``SpiRequested``, whose job first makes the guard
        drop plaintext from ``remote_ip``)."""
        if data_send_key is None or data_recv_key is None:
            raise LocalError("an ESP fast path needs the connection's data keys")
        el = EspLink(remote, local_ip, remote_ip, esp_key(data_send_key), esp_key(data_recv_key))
        self.links.add(el)
        return el

    def handle_event(
        self,
        el: EspLink,
        link: FastPathLink,
        event: LinkEvent,
        *,
        resume: Hook,
        failed: Callable[[str], None],
        publish: Hook,
        withdraw: Hook,
    ) -> bool:
        """Act on ``SpiRequested`` / ``EspReady`` (True), anything else is not ours (False).

        ``resume()`` (loop): the link has new output, process it. ``failed(reason)`` (loop):
        once, this link's ESP cannot work. ``publish()`` / ``withdraw()`` (worker): give / take
        away the datapath's forwarding state towards this peer (see the module docstring)."""
        if isinstance(event, SpiRequested):

            def allocated(spi: Any) -> None:
                el.in_spi = int(spi)
                link.spi_allocated(int(spi))
                resume()

            self._run(el, lambda: self._alloc(el), allocated, failed)
            return True
        if isinstance(event, EspReady):
            pair = EspPair(el.local_ip, el.remote_ip, event.in_spi, event.out_spi)

            def installed(_: Any) -> None:
                el.pair = pair
                el.installs += 1
                assert self._loop is not None
                link.esp_installed(self._loop.time())
                resume()

            self._run(el, lambda: self._install(el, pair, publish, withdraw), installed, failed)
            return True
        return False

    def link_stopped(self, el: EspLink, withdraw: Hook) -> None:
        """The link is gone (idempotent): forwarding withdrawn, SAs/policies removed, the guard
        forgets the peer's IP when no other link needs it."""
        if el.stopped:
            return
        el.stopped = True
        self.links.discard(el)
        submit = self._submit
        if submit is None:
            return
        with contextlib.suppress(RuntimeError):  # a shut-down worker: stop() removed it all
            submit(lambda: self._remove(el, withdraw)).add_done_callback(self._logged)

    def status(self) -> dict[str, Any]:
        return {
            "fatal": self.fatal,
            "error": self.error,
            "stale_removed": {"sas": self.stale[0], "policies": self.stale[1]},
            "links": {
                str(el.remote): {
                    "ip": el.remote_ip,
                    "in_spi": el.pair.in_spi if el.pair else el.in_spi,
                    "out_spi": el.pair.out_spi if el.pair else None,
                    "installs": el.installs,
                    "failed": el.failed,
                }
                for el in self.links
            },
        }

    # -- loop internals -------------------------------------------------------------------------

    def _run(
        self,
        el: EspLink,
        job: Callable[[], Any],
        ok: Callable[[Any], None],
        failed: Callable[[str], None],
    ) -> None:
        loop, submit = self._loop, self._submit
        if loop is None or submit is None:
            raise LocalError("EspLinks used before bind()")

        def done(future: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nothing left to tell
                loop.call_soon_threadsafe(self._done, el, future, ok, failed)

        try:
            submit(job).add_done_callback(done)
        except RuntimeError as err:  # the worker is shut down (the part closes)
            self._fail(el, f"{self.name}: ESP: {err}", None, failed)

    def _done(
        self,
        el: EspLink,
        future: Future[Any],
        ok: Callable[[Any], None],
        failed: Callable[[str], None],
    ) -> None:
        if el.stopped or el.failed:
            return
        err = future.exception()
        if err is None:
            ok(future.result())
            return
        self._fail(el, f"{self.name}: ESP: {err}", err, failed)

    def _fail(
        self,
        el: EspLink,
        reason: str,
        err: BaseException | None,
        failed: Callable[[str], None],
    ) -> None:
        el.failed = reason
        self.error = reason
        if getattr(err, "errno", None) in _NO_KERNEL_ESP and not self.fatal:
            self.fatal = reason
        log.warning("ESP fast path to %s: %s", el.remote, reason)
        try:
            failed(reason)
        except Exception:
            log.exception("ESP failure callback for %s failed", el.remote)

    def _logged(self, future: Future[Any]) -> None:
        err = future.exception()
        if err is not None:
            log.error("ESP teardown failed: %s", err)
            if self._loop is not None:
                text = f"{self.name}: ESP: {err}"
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(setattr, self, "error", text)

    # -- worker internals -----------------------------------------------------------------------

    def _client(self) -> XfrmLike:
        if not self._started or self._xfrm is None:
            raise LocalError("ESP is not started")
        return self._xfrm

    def _alloc(self, el: EspLink) -> int:
        """Inbound plaintext from the peer dropped first, then our SPI."""
        with self._lock:
            xfrm = self._client()
            if el not in self._guarded:
                if self._guard_refs[el.remote_ip] == 0:
                    self._guard.require_esp_from(el.remote_ip)
                self._guard_refs[el.remote_ip] += 1
                self._guarded.add(el)
            spi = xfrm.alloc_spi(el.local_ip, el.remote_ip)
            self._larval[el] = EspPair(el.local_ip, el.remote_ip, spi, 0)
            return spi

    def _install(self, el: EspLink, pair: EspPair, publish: Hook, withdraw: Hook) -> None:
        with self._lock:
            xfrm = self._client()
            current = self._installed.pop(pair.remote_ip, None)
            if current is not None:
                owner, old = current
                withdraw()  # nothing forwards to the peer while its policy is replaced
                if owner is el and old.in_spi == pair.in_spi:
                    # a re-key: keep our inbound SA (the peer still sends to its SPI)
                    xfrm.remove(EspPair(old.local_ip, old.remote_ip, 0, old.out_spi, old.port))
                else:  # a replaced connection's pair
                    xfrm.remove(old)
            try:
                xfrm.install(pair, el.send_key, el.recv_key)
            except BaseException:
                self._quietly("undo a partial ESP install", xfrm.remove, pair)
                self._larval.pop(el, None)
                raise
            self._larval.pop(el, None)
            self._installed[pair.remote_ip] = (el, pair)
            publish()

    def _remove(self, el: EspLink, withdraw: Hook) -> None:
        with self._lock:
            if not self._started or self._xfrm is None:
                return  # stop() removed everything
            xfrm = self._xfrm
            current = self._installed.get(el.remote_ip)
            try:
                if current is not None and current[0] is el:
                    withdraw()  # forwarding goes before the policy that keeps it encrypted
                    del self._installed[el.remote_ip]
                    xfrm.remove(current[1])
                larval = self._larval.pop(el, None)
                if larval is not None:
                    xfrm.remove(larval)
            finally:
                refs = self._guard_refs
                if el in self._guarded:
                    self._guarded.discard(el)
                    refs[el.remote_ip] -= 1
                    if refs[el.remote_ip] == 0:
                        del refs[el.remote_ip]
                        self._guard.forget(el.remote_ip)

    @staticmethod
    def _quietly(what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:
            log.error("%s failed: %s", what, err)


def make_esp(name: str) -> EspLinks:
    """An ESP driver for one fast part's links on the kernel's xfrm and the nftables inbound guard
    (strict: with a password no plain UDP 6784 from anyone); the part binds it to its worker
    thread. The switch makes one per encrypted fast part (vxlan, ovs)."""
    return EspLinks(XfrmClient, StrictInboundGuard(), name)
