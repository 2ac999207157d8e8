"""Signed notes between peers (spec: protocol/notes.md): ``protocol`` is the sans-IO core,
``service`` runs it over libp2p streams."""
