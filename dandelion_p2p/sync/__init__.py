"""The daemon's side of training: it supervises the worker process, shares a memory buffer
with it, runs the swarm's averaging rounds on that buffer, and fetches or serves the swarm's
training state (``service`` wires the parts). Nothing here imports torch."""
