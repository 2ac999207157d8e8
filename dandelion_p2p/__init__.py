"""Dandelion: train Stable Diffusion together over a peer-to-peer swarm."""

__version__ = "0.1.0"
