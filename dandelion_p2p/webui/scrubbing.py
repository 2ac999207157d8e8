"""Strings that must never leave the daemon through the web UI: the access token and every
common spelling of the identity key. Responses and log lines are scrubbed of them."""

from __future__ import annotations

import base64

from dandelion_p2p.identity import Identity

REDACTED = "[redacted]"


class SecretScrubber:
    def __init__(self, token: str, identity: Identity) -> None:
        seed = identity.seed
        pem_body = b"".join(identity.to_pem().splitlines()[1:-1]).decode()
        self.secrets = tuple(
            s
            for s in {
                token,
                seed.hex(),
                base64.b64encode(seed).decode(),
                base64.urlsafe_b64encode(seed).decode().rstrip("="),
                base64.b64encode(seed).decode().rstrip("="),
                pem_body,
                identity.to_pem().decode(),
            }
            if len(s) >= 16
        )

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text
