"""Docker integration: the libnetwork remote network driver and IPAM driver served by the router.

``setup_docker_plugin(router, ipam, config)`` (weft/docker/server.py) is the composition entry.
"""
