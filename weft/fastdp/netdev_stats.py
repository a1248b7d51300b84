"""Traffic counters of a network device, from ``/proc/net/dev``.

``/proc/net`` is the reading process's network namespace (unlike ``/sys/class/net``, which is
the namespace sysfs was mounted in), so a router in its own namespace reads its own devices. One
small file read, cheap enough for every ``/status``. The counters are the kernel's, of the
frames a device carried: for a vxlan device (the vxlan part's ``vxlan-weft``, the OVS part's
vxlan vport) transmit = container frames sent into the tunnel, receive = frames that came out.
"""

from __future__ import annotations

__all__ = ["PROC_NET_DEV", "device_traffic", "parse_net_dev"]

PROC_NET_DEV = "/proc/net/dev"


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """``{device: {bytes_in, frames_in, bytes_out, frames_out}}`` from ``/proc/net/dev`` text.

    Lines that do not parse are skipped (the two header lines among them).
    """
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if len(fields) < 10 or not all(f.isdigit() for f in fields[:10]):
            continue
        out[name.strip()] = {
            "bytes_in": int(fields[0]),
            "frames_in": int(fields[1]),
            "bytes_out": int(fields[8]),
            "frames_out": int(fields[9]),
        }
    return out


def device_traffic(name: str, path: str = PROC_NET_DEV) -> dict[str, int] | None:
    """The counters of device ``name`` in this namespace, or None (no such device, no file)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return parse_net_dev(text).get(name)
