"""The committed lock matches pyproject: every set pins each package to one exact version,
the versions meet pyproject's ranges, and a dependency edit without `make lock` is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools import lockfile

ROOT = Path(__file__).resolve().parent.parent


def pins(name: str) -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in lockfile.lock_path(name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{name}: {line} is not an exact pin"
        found[canonicalize_name(requirement.name)] = Version(spec.version)
    return found


def wanted(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_the_lock_was_compiled_from_this_pyproject() -> None:
    assert lockfile.check_locks() == []


@pytest.mark.parametrize("name", sorted(lockfile.SETS))
def test_every_set_pins_what_pyproject_asks_for(name: str) -> None:
    pinned = pins(name)
    for requirement in wanted(lockfile.SETS[name]):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{name}: {requirement.name} is not locked"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}: {requirement.name}=={version} is outside {requirement.specifier}"
        )


def test_the_sets_agree_and_torch_is_the_cpu_pin() -> None:
    dev = pins("dev")
    for name in ("core", "train"):
        for package, version in pins(name).items():
            assert dev[package] == version, f"{package}: {name} {version}, dev {dev[package]}"
    assert set(pins("core")) < set(pins("train")) < set(dev)
    assert f"torch=={pins('train')['torch']}" == lockfile.torch_pin()
    assert "torch" not in pins("core"), "relay nodes install no GPU stack"


def test_a_dependency_edit_without_relocking_fails_the_check(tmp_path: Path) -> None:
    for item in ("pyproject.toml", "Makefile", *(f"requirements-{n}.lock" for n in lockfile.SETS)):
        shutil.copy(ROOT / item, tmp_path / item)
    shutil.copytree(ROOT / "tools", tmp_path / "tools")
    check = [sys.executable, str(tmp_path / "tools" / "lockfile.py"), "check"]
    assert subprocess.run(check, capture_output=True).returncode == 0

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"msgpack>=1.0"', '"msgpack>=1.1"'))
    failed = subprocess.run(check, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "make lock" in failed.stderr and "requirements-core.lock" in failed.stderr

    # Settings that do not change what is installed need no new lock.
    pyproject.write_text(pyproject.read_text().replace('"msgpack>=1.1"', '"msgpack>=1.0"')
                         + "\n[tool.example]\nkey = 1\n")
    assert subprocess.run(check, capture_output=True).returncode == 0
