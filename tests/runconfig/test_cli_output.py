"""What `dandelion-p2p runs` prints of DHT text cannot drive the terminal."""

from __future__ import annotations

import time

from dandelion_p2p.runconfig.cli import printable, run_line, shown_config

HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\r\x9b31m\u202emodel"


def _no_controls(text: str, allowed: str = "") -> bool:
    return not any((ord(c) < 32 and c not in allowed) or 0x7f <= ord(c) <= 0x9f
                   or c == "\u202e" for c in text)


def test_runs_lines_show_no_control_characters() -> None:
    line = run_line({"run": "tiny-" + "0" * 24, "version": 3, "model": HOSTILE,
                     "owner": "12D3Koo\x1b[1mW", "updated_at": time.time()})
    assert _no_controls(line)
    assert "evil" in line and "\ufffd" in line and "pwned" in line


def test_a_shown_config_keeps_its_lines_and_loses_its_escapes() -> None:
    toml = f'name = "tiny"\n\t# {HOSTILE}\n[model]\nbase = "m"\n'
    shown = shown_config({"run": "tiny-" + "0" * 24, "version": 1, "owner": "o\x1bx",
                          "toml": toml})
    assert _no_controls(shown, allowed="\n\t")
    assert shown.count("\n") == toml.count("\n") + 1 and "\t# evil" in shown
    assert printable("a\nb") == "a\ufffdb"
