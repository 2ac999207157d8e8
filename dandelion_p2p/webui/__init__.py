"""The trainer manager web UI the daemon serves on 127.0.0.1: a single page over a JSON API,
live logs over a WebSocket, and Prometheus metrics, all behind an access token."""
