"""Our Kademlia DHT over libp2p streams: signed, expiring, multi-publisher records."""
