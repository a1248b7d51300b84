"""What signed topology records cost per record (issue #14 item 4; the CPU of issue #18).

    python -m bench.records [--records 200] [--repeat 5] [--conns 0,10,99,1000]
                            [--no-attributes] [--json]

For records listing ``conns`` connections, medians over ``--repeat`` runs of ``--records``
distinct records each, microseconds per record (each connection carries its link attributes,
datapath, encryption, MTU and data state, as routers gossip them; ``--no-attributes`` leaves them
out, as records were before issue #17 item 2):

* ``sign_us``: building and signing one (what a peer pays per version of its own record);
* ``verify_us``: the Ed25519 verification alone;
* ``decode_us``: a first decode of a blob - header, verification, body - as a receiver does it
  for a record that beats the one it holds;
* ``cached_us``: decoding a blob seen before (verification is cached with the decoded record);
* ``skip_us``: a record that does not beat the held version, dropped from its fixed header
  (``peek_record`` + ``Topology.beats_held``): no decode, no verification.

Figures, not assertions: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weft.gossip import topology
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.topology import (
    ConnectionSummary,
    LinkAttributes,
    PeerRecord,
    Topology,
    decode_record,
    make_record,
    peek_record,
)

_NAME = PeerName(0x02AA00000001)


_ATTRIBUTES: list[LinkAttributes | None] = [
    LinkAttributes("vxlan", True, 1376, "established"),
    LinkAttributes("sleeve", True, 1414, "established"),
]


def _conns(n: int) -> list[ConnectionSummary]:
    return [
        ConnectionSummary(
            PeerName(0x020000000000 + i),
            f"10.{i >> 8 & 255}.{i & 255}.1:6783",
            i % 2 == 0,
            True,
            _ATTRIBUTES[i % len(_ATTRIBUTES)],
        )
        for i in range(n)
    ]


def _median_us(fn: Callable[[], int], repeat: int) -> float:
    """Median over ``repeat`` runs of microseconds per item (``fn`` returns the items done)."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        n = fn()
        runs.append((time.perf_counter() - start) * 1e6 / n)
    return statistics.median(runs)


def bench(conns: int, count: int, repeat: int) -> dict[str, float]:
    key = Ed25519PrivateKey.generate()
    summaries = _conns(conns)
    version = iter(range(1, 1 << 40))

    def records() -> list[PeerRecord]:
        return [
            make_record(_NAME, "bench", 7, next(version), 1, summaries, key) for _ in range(count)
        ]

    def sign() -> int:
        records()
        return count

    def fresh_blobs() -> list[bytes]:
        blobs = [r.blob for r in records()]
        for b in blobs:
            topology._INTERN.pop(b, None)  # as if received from the wire: not yet verified
        return blobs

    def verify() -> int:
        blobs = fresh_blobs()
        pub = key.public_key()
        start = time.perf_counter()
        for b in blobs:
            pub.verify(b[55:119], b"weft-record-v2\0" + b[:55] + b[119:])
        return _timed(start, count)

    def decode() -> int:
        blobs = fresh_blobs()
        start = time.perf_counter()
        for b in blobs:
            decode_record(b)
        return _timed(start, count)

    held = records()
    held_blobs = [r.blob for r in held]

    def cached() -> int:
        for b in held_blobs:
            decode_record(b)
        return count

    topo = Topology(
        PeerIdentity(PeerName(0x02BB00000001), "me", 1, 1),
        random.Random(1),
        Ed25519PrivateKey.generate(),
    )
    topo.merge([held[-1]])  # holds the newest: every other version is stale

    def skip() -> int:
        beats = topo.beats_held
        for b in held_blobs[:-1]:
            name, uid, ver = peek_record(b)
            if beats(name, uid, ver, b):
                raise AssertionError("a stale record beat the held one")
        return count - 1

    # sign/skip/cached time the whole call; verify/decode exclude building their inputs
    return {
        "bytes": float(len(held_blobs[0])),
        "sign_us": _median_us(sign, repeat),
        "verify_us": _excl(verify, repeat),
        "decode_us": _excl(decode, repeat),
        "cached_us": _median_us(cached, repeat),
        "skip_us": _median_us(skip, repeat),
    }


_LAST: list[float] = []


def _timed(start: float, n: int) -> int:
    _LAST.append((time.perf_counter() - start) * 1e6 / n)
    return n


def _excl(fn: Callable[[], int], repeat: int) -> float:
    """Median of the per-item times ``fn`` recorded itself (its setup excluded)."""
    _LAST.clear()
    for _ in range(repeat):
        fn()
    return statistics.median(_LAST)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.records", description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200, help="distinct records per run (200)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure, median (5)")
    ap.add_argument("--conns", default="0,10,99,1000", help="connections per record (0,10,99,1000)")
    ap.add_argument("--no-attributes", action="store_true", help="records without link attributes")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    if args.no_attributes:
        _ATTRIBUTES[:] = [None]
    sizes = [int(x) for x in args.conns.split(",") if x]
    table = {str(n): bench(n, max(2, args.records), max(1, args.repeat)) for n in sizes}
    if args.json:
        json.dump({"per_record_us": table}, sys.stdout, indent=2)
        print()
        return 0
    print(f"signed topology records, microseconds per record (median of {args.repeat}):")
    heads = ("sign", "verify", "decode", "cached", "skip")
    print(f"  {'conns':>5} {'bytes':>7} " + " ".join(f"{h:>8}" for h in heads))
    for n, f in table.items():
        print(
            f"  {n:>5} {f['bytes']:7.0f} {f['sign_us']:8.1f} {f['verify_us']:8.1f}"
            f" {f['decode_us']:8.1f} {f['cached_us']:8.2f} {f['skip_us']:8.2f}"
        )
    print("  decode = header + Ed25519 verification + body, for a record newer than the held one;")
    print("  skip = a record no newer than the held one, dropped from its header undecoded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
