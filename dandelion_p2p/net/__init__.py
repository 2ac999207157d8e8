"""Networking: the libp2p host, stream helpers, our DHT, relay and NAT handling."""
