"""Dial-back reachability checks (spec: protocol/dialback.md): ``protocol`` is the sans-IO
core, ``service`` runs it over libp2p streams and TCP probes."""
