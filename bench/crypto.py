"""Crypto throughput on this machine: which data cipher, and what the control path costs.

    python -m bench.crypto [--seconds 0.3] [--repeat 5] [--json]

Measures, single-threaded, medians over ``--repeat`` runs of about ``--seconds`` each:

* raw AEAD seal and open, ChaCha20-Poly1305 vs AES-256-GCM, 1.5 KB and 64 KB units;
* the sleeve's :class:`DataSealer` / :class:`DataOpener` (counter header + replay window);
* the control :class:`FrameCodec` (encode + feed), plaintext and encrypted, 1 KB and 64 KB;
* the once-per-router scrypt password key, and one full encrypted handshake (both sides).

Figures, not assertions: the machine is shared and noisy. The cipher choice is recorded in
weft/gossip/crypto.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from weft.gossip.crypto import (
    DATA_CIPHERS,
    DataOpener,
    DataSealer,
    PasswordKeys,
    derive_password_key,
)
from weft.gossip.handshake import Handshake, Hello
from weft.gossip.peer import PeerName
from weft.gossip.session import FrameCodec

SIZES = (1500, 65536)


def rate(fn: Callable[[], int], seconds: float, repeat: int) -> float:
    """Median bytes per second of ``fn`` (which returns the bytes it processed per call)."""
    results = []
    for _ in range(repeat):
        done = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(16):
                done += fn()
            now = time.perf_counter()
            if now >= deadline:
                break
        results.append(done / (now - start))
    return statistics.median(results)


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_aead(seconds: float, repeat: int) -> dict[str, dict[str, float]]:
    """The bare AEAD calls, as the binding exposes them (no framing, no window)."""
    out: dict[str, dict[str, float]] = {}
    key = os.urandom(32)
    nonce = bytes(12)
    for name, aead in (("chacha20-poly1305", ChaCha20Poly1305(key)), ("aes-256-gcm", AESGCM(key))):
        for size in SIZES:
            data = os.urandom(size)
            sealed = aead.encrypt(nonce, data, None)
            count = max(64, int(seconds * 4e9 / 8 / size))  # about `seconds` at 4 Gbit/s
            seal_rates, open_rates = [], []
            for _ in range(repeat):
                encrypt, decrypt = aead.encrypt, aead.decrypt
                start = time.perf_counter()
                for _ in range(count):
                    encrypt(nonce, data, None)
                seal_rates.append(count * size / (time.perf_counter() - start))
                start = time.perf_counter()
                for _ in range(count):
                    decrypt(nonce, sealed, None)
                open_rates.append(count * size / (time.perf_counter() - start))
            out[f"{name} {size}"] = {
                "seal_gbps": statistics.median(seal_rates) * 8 / 1e9,
                "open_gbps": statistics.median(open_rates) * 8 / 1e9,
            }
    return out


def bench_data(seconds: float, repeat: int) -> dict[str, dict[str, float]]:
    """The sleeve's sealer/opener: each run seals, then opens, a fresh batch of units in order."""
    out: dict[str, dict[str, float]] = {}
    key = os.urandom(32)
    for cipher in DATA_CIPHERS:
        for size in SIZES:
            data = os.urandom(size)
            count = max(64, int(seconds * 2e9 / 8 / size))  # about `seconds` at 2 Gbit/s
            seal_rates, open_rates = [], []
            for _ in range(repeat):
                sealer, opener = DataSealer(key, cipher), DataOpener(key, cipher)
                seal = sealer.seal
                start = time.perf_counter()
                packets = [seal(data) for _ in range(count)]
                seal_rates.append(count * size / (time.perf_counter() - start))
                open_ = opener.open
                start = time.perf_counter()
                for packet in packets:
                    open_(packet)
                open_rates.append(count * size / (time.perf_counter() - start))
            out[f"{cipher} {size}"] = {
                "seal_gbps": statistics.median(seal_rates) * 8 / 1e9,
                "open_gbps": statistics.median(open_rates) * 8 / 1e9,
            }
    return out


def bench_codec(seconds: float, repeat: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    k1, k2 = os.urandom(32), os.urandom(32)
    for mode in ("plain", "chacha20-poly1305"):
        for size in (1024, 65536):
            if mode == "plain":
                a, b = FrameCodec(), FrameCodec()
            else:
                a, b = FrameCodec(k1, k2), FrameCodec(k2, k1)
            msg = os.urandom(size)
            batch = [msg] * 16

            def roundtrip(a: FrameCodec = a, b: FrameCodec = b, batch: list[bytes] = batch) -> int:
                wire = a.encode_many(batch)
                # Deliver in 64 KB reads, as a TCP stream would.
                for i in range(0, len(wire), 65536):
                    b.feed(wire[i : i + 65536])
                return len(batch) * len(batch[0])

            out[f"{mode} {size}"] = {"encode_feed_gbps": rate(roundtrip, seconds, repeat) * 8 / 1e9}
    return out


def bench_setup(repeat: int) -> dict[str, float]:
    salt = bytes(16)
    scrypt_s = per_call(lambda: derive_password_key(b"correct horse", salt), repeat)
    key = PasswordKeys(b"correct horse", salt, settled=True)

    def handshake() -> None:
        a = Handshake(True, Hello(PeerName(1), "a", 1, 1, 1), key, 0.0)
        b = Handshake(False, Hello(PeerName(2), "b", 2, 2, 2), key, 0.0)
        while not (a.done and b.done):
            for src, dst in ((a, b), (b, a)):
                data = src.data_to_send()
                if data and not dst.done:
                    dst.receive(data, 0.0)

    # CPU time, not wall time: what a handshake costs the router (issue #18) on a busy host.
    cpu = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(10):
            handshake()
        cpu.append((time.process_time() - start) / 10)
    return {
        "scrypt_ms": scrypt_s * 1e3,
        "handshake_ms": per_call(handshake, repeat * 4) * 1e3,
        "handshake_cpu_ms": statistics.median(cpu) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.3, help="per measurement (0.3)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure, median (5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    tables = {
        "aead": bench_aead(args.seconds, args.repeat),
        "data": bench_data(args.seconds, args.repeat),
        "codec": bench_codec(args.seconds, args.repeat),
    }
    setup = bench_setup(args.repeat)
    if args.json:
        json.dump({**tables, "setup": setup}, sys.stdout, indent=2)
        print()
        return 0
    for section in ("aead", "data", "codec"):
        print(f"{section}: (Gbit/s, one core, median of {args.repeat})")
        for name, figures in tables[section].items():
            cells = "  ".join(f"{k.removesuffix('_gbps')} {v:6.2f}" for k, v in figures.items())
            print(f"  {name:28} {cells}")
    print(f"setup: scrypt password key {setup['scrypt_ms']:.1f} ms (once per router),")
    print(
        f"       encrypted handshake, both sides {setup['handshake_ms']:.2f} ms"
        f" ({setup['handshake_cpu_ms']:.2f} ms CPU)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
