"""Kernel fast datapaths: OVS over generic netlink, Linux VXLAN, ESP, capability probing.

Pure cores (fdb, heartbeat, ovs_flows, the message classes in ovs and esp) do no I/O; the
kernel-facing classes wrap every failure in :class:`weft.fastdp.errors.DatapathError` naming
the operation. See docs/FASTDP.md for the layout and the overlay switch's integration points.
"""
