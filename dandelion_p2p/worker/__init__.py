"""The training worker: a separate process that fine-tunes a Stable Diffusion model with
torch and diffusers and stays in step with the swarm through its local daemon.

Only the modules that need it import torch (``train``, ``model``, ``checkpoint``, ...): the
daemon imports nothing from here but the protocol constants in ``protocol``.
"""
