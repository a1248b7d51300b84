"""The overlay switch: the sleeve and the kernel fast datapaths behind one ``Overlay``.

* :mod:`weft.switch.core` — the pure per-connection decision: which healthy datapath carries it,
  and the envelope of the overlay-control messages.
* :mod:`weft.switch.pump` — ``make_overlay``: builds the sleeve and the fast parts, and drives
  the core for every connection.

May import ``weft.sleeve``, ``weft.fastdp``, ``weft.overlay``, ``weft.gossip``; the daemon loads
it by name (``weft.router.daemon.OVERLAY_FACTORIES``), nothing below imports it.
"""
