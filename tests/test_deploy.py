"""The deployment files: the two Dockerfiles and the relay's systemd unit.

No container engine runs on the test machines, so the images are never built here. The
Dockerfiles are linted by hadolint when it is installed (the dev lock has it) and otherwise
parsed; what they install, copy and run is checked against the repository itself.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dandelion_p2p.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"relay": DEPLOY / "relay.Dockerfile", "worker": DEPLOY / "worker.Dockerfile"}
UNIT = DEPLOY / "dandelion-relay.service"
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments
    dropped, as Docker's parser reads them; raises ValueError on what it would refuse."""
    out: list[tuple[str, str]] = []
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        if word.upper() not in INSTRUCTIONS or word != word.upper():
            raise ValueError(f"{path.name}:{number}: unknown instruction {word!r}")
        if not rest.strip():
            raise ValueError(f"{path.name}:{number}: {word} without arguments")
        out.append((word, rest.strip()))
    if pending:
        raise ValueError(f"{path.name}: ends inside a continued line")
    if not out or out[0][0] not in {"FROM", "ARG"}:
        raise ValueError(f"{path.name}: does not start with FROM")
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_lints_clean(name: str) -> None:
    path = DOCKERFILES[name]
    instructions(path)  # parses either way
    linter = hadolint()
    if linter is None:
        return  # the parse above is the check where hadolint is not installed
    done = subprocess.run([linter, "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_parser_refuses_what_docker_would(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim\nRUN echo a \\\n")
    with pytest.raises(ValueError, match="continued line"):
        instructions(broken)
    broken.write_text("FROM python:3.11-slim\nCOPPY . /src\n")
    with pytest.raises(ValueError, match="unknown instruction"):
        instructions(broken)
    broken.write_text("RUN true\n")
    with pytest.raises(ValueError, match="FROM"):
        instructions(broken)


def dockerignored(relative: str) -> bool:
    """Whether the build context leaves ``relative`` out (``.dockerignore``, last match wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative.split("/")[0], pattern):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_what_exists_and_runs_real_commands(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not dockerignored(source.rstrip("/")), f"{source} is in .dockerignore"
    entry = exec_form(next(a for w, a in steps if w == "ENTRYPOINT"))
    cmd = exec_form([a for w, a in steps if w == "CMD"][-1])
    assert entry == ["dandelion-p2p"]
    result = CliRunner().invoke(cli, [*cmd, "--help"] if cmd != ["--help"] else cmd)
    assert result.exit_code == 0, result.output
    health = next(a for w, a in steps if w == "HEALTHCHECK")
    assert exec_form(health.split(" CMD ", 1)[1]) == ["dandelion-p2p", "status"]
    user = [a for w, a in steps if w == "USER"]
    assert user and user[-1] not in {"0", "root"}


def test_relay_image_has_no_torch_and_the_worker_image_has_the_pinned_one() -> None:
    relay = DOCKERFILES["relay"].read_text()
    runs = " ".join(a for w, a in instructions(DOCKERFILES["relay"]) if w in {"RUN", "COPY"})
    assert "requirements-core.lock" in runs
    assert "torch" not in runs and "requirements-train.lock" not in relay
    core = (ROOT / "requirements-core.lock").read_text()
    assert not re.search(r"^(torch|diffusers|transformers)==", core, re.MULTILINE)
    worker = " ".join(a for w, a in instructions(DOCKERFILES["worker"]) if w == "RUN")
    assert "requirements-train.lock" in worker and '"$TORCH_PIN"' in worker
    # The pin the worker image reads out of the Makefile with sed is the one there.
    assert re.search(r"^TORCH_PIN \?= torch==\S+$", (ROOT / "Makefile").read_text(),
                     re.MULTILINE)


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = re.sub(r"\\\n\s*", " ", UNIT.read_text())  # systemd's continuation lines
    parser.read_string(text)
    return parser


def test_systemd_unit_runs_a_relay_with_flags_the_cli_knows() -> None:
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/dandelion/bin/dandelion-p2p"
    assert argv[1] == "daemon" and "--relay" in argv
    result = CliRunner().invoke(cli, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
    # Environment= repeats (the parser keeps the last): the data dir is the state directory.
    assert f"Environment=DANDELION_DATA_DIR=/var/lib/{service['StateDirectory']}\n" in \
        UNIT.read_text()
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own check; the binary path points at this checkout's command, since
    /opt/dandelion is where the unit expects an install, not where the tests run."""
    command = Path(sys.executable).parent / "dandelion-p2p"
    if not command.is_file():
        pytest.skip("the dandelion-p2p command is not installed beside this Python")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/dandelion/bin/dandelion-p2p", str(command)))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
