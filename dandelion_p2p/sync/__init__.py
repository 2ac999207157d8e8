"""The daemon's side of training: it supervises the worker process, shares a memory buffer
with it, and runs the swarm's averaging rounds on that buffer. Nothing here imports torch."""
