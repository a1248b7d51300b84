"""The kernel fast datapaths: Linux VXLAN, Open vSwitch, ESP — mechanisms and overlay parts.

Kernel mechanisms: :mod:`~weft.fastdp.vxlan`, :mod:`~weft.fastdp.ovs` / ``ovs_datapath`` (OVS over
generic netlink), :mod:`~weft.fastdp.esp` (xfrm), :mod:`~weft.fastdp.capabilities` (probing).
Their parts of the overlay switch: :mod:`~weft.fastdp.part` (what the switch needs),
``part_base`` (shared), ``vxlan_part``, ``ovs_part``, ``esp_links`` (per-link ESP).

Pure cores (fdb, heartbeat, link, ovs_flows, the message classes in ovs and esp) do no I/O; the
kernel-facing classes wrap every failure in :class:`weft.fastdp.errors.DatapathError` naming
the operation. May import ``weft.overlay``, ``weft.gossip``, ``weft.errors``; never the switch
(it hosts the parts) or the daemon. docs/FASTDP.md has the details.
"""
