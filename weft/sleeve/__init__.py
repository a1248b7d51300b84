"""The sleeve: weft's userspace datapath, UDP encapsulation of the bridge's frames.

* :mod:`weft.sleeve.core` — the sans-I/O core: framing, fragmentation, session crypto,
  heartbeats, PMTU discovery, forwarding decisions.
* :mod:`weft.sleeve.gro` — batching of frames into and out of the TAP (pure).
* :mod:`weft.sleeve.maccache` — which peer a MAC lives behind (pure).
* :mod:`weft.sleeve.tap` — the router's TAP device.
* :mod:`weft.sleeve.pump` — the asyncio pump: one UDP socket, the TAP, one timer.

Every connection's fallback, so it owns the bridge (through ``weft.host``). May import
``weft.overlay``, ``weft.gossip``, ``weft.host``, ``weft.errors``; never the switch or the daemon.
"""
