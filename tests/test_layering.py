"""The package's shape, checked: dependencies point down, protocol cores import no I/O.

``docs/architecture.md`` explains the layers; this file is their executable form. A failure
here names the import that broke the rule; fix the design (move the shared piece down, or
pass an interface in), not this list, unless the architecture document changes with it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dandelion_p2p"
MAX_MODULE_LINES = 600

# Lowest first. A module may import its own package and anything in a lower layer, never a
# layer at its own level or above. Names are top-level modules or packages of dandelion_p2p.
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer.split())
    for layer in (
        "errors",
        "hashing files networks telemetry local_settings",
        "wire",
        "identity",
        "reputation",
        "config",
        "loghub control netlab",
        "net",
        "dataplane",
        "context",
        "runconfig",
        "dataset",
        "averaging",
        "worker",
        "sync",
        "node_metrics",
        "webui",
        "services",
        "daemon",
        "cli_common",
        "cli",
        "demo_output demo_nat",
        "demo",
    )
)

# Entry points that live beside their feature but belong to the command line: ``cli`` loads
# them, and they may use what a command needs (the config, the control client). They rank
# just below ``cli``, so no feature module may import them.
COMMAND_MODULES = frozenset(
    {
        "dandelion_p2p.dataset.cli",
        "dandelion_p2p.runconfig.cli",
        "dandelion_p2p.worker.cli",
        "dandelion_p2p.worker.__main__",
    }
)

# Protocol cores and pure data structures: importable with neither trio nor libp2p loaded.
CORE_MODULES: tuple[str, ...] = (
    "dandelion_p2p.errors",
    "dandelion_p2p.files",
    "dandelion_p2p.hashing",
    "dandelion_p2p.networks",
    "dandelion_p2p.identity",
    "dandelion_p2p.wire",
    "dandelion_p2p.wire.codec",
    "dandelion_p2p.wire.framing",
    "dandelion_p2p.wire.schema",
    "dandelion_p2p.wire.signed",
    "dandelion_p2p.reputation.book",
    "dandelion_p2p.reputation.store",
    "dandelion_p2p.net.dht.messages",
    "dandelion_p2p.net.dht.records",
    "dandelion_p2p.net.dht.routing",
    "dandelion_p2p.net.dht.lookup",
    "dandelion_p2p.net.ports",
    "dandelion_p2p.net.liveness_core",
    "dandelion_p2p.net.dialback.protocol",
    "dandelion_p2p.net.notes.protocol",
    "dandelion_p2p.dataplane.messages",
    "dandelion_p2p.dataplane.sealing",
    "dandelion_p2p.dataplane.flow",
    "dandelion_p2p.dataplane.errors",
    "dandelion_p2p.runconfig.schema",
    "dandelion_p2p.runconfig.timeline",
    "dandelion_p2p.runconfig.publication",
    "dandelion_p2p.dataset.messages",
    "dandelion_p2p.dataset.leases",
    "dandelion_p2p.dataset.manifest",
    "dandelion_p2p.dataset.ports",
    "dandelion_p2p.averaging.messages",
    "dandelion_p2p.averaging.group",
    "dandelion_p2p.averaging.partition",
    "dandelion_p2p.averaging.aggregation",
    "dandelion_p2p.averaging.compression",
    "dandelion_p2p.averaging.report",
    "dandelion_p2p.averaging.allreduce",
    "dandelion_p2p.averaging.admission",
    "dandelion_p2p.averaging.ledger",
    "dandelion_p2p.averaging.equivocation",
    "dandelion_p2p.averaging.sends",
    "dandelion_p2p.averaging.span_reducer",
    "dandelion_p2p.averaging.result_receiver",
    "dandelion_p2p.worker.protocol",
    "dandelion_p2p.worker.shm",
    "dandelion_p2p.sync.state",
    "dandelion_p2p.sync.statesync_core",
    "dandelion_p2p.sync.checkpoints",
)
IO_LIBRARIES = ("trio", "libp2p")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


_MODULE_NAME = re.compile(r"dandelion_p2p(\.\w+)+")


def _imports(name: str, path: Path) -> set[str]:
    """Every dandelion_p2p module ``name`` names: import statements (type-only ones too,
    wherever they are) and module paths written as strings for importlib."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_NAME.fullmatch(node.value)
        ):
            targets.add(node.value)
    return {t for t in targets if t == "dandelion_p2p" or t.startswith("dandelion_p2p.")}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(module: str) -> float | None:
    if module in COMMAND_MODULES:
        cli = _rank("dandelion_p2p.cli")
        return None if cli is None else cli - 0.5
    top = _top(module)
    for rank, layer in enumerate(LAYERS):
        if top in layer:
            return rank
    return None


def _allowed(importer: str, imported: str) -> bool:
    mine, theirs = _rank(importer), _rank(imported)
    assert mine is not None and theirs is not None
    same_package = _top(importer) == _top(imported)
    if same_package and (importer in COMMAND_MODULES or imported not in COMMAND_MODULES):
        return True
    return theirs < mine


def test_every_module_has_a_layer() -> None:
    missing = sorted({_top(m) for m in _modules() if m != "dandelion_p2p" and _rank(m) is None})
    assert not missing, f"add these to LAYERS and docs/architecture.md: {missing}"


def test_imports_point_down() -> None:
    modules = _modules()
    wrong = [
        f"{name} -> {target}"
        for name, path in modules.items()
        if name != "dandelion_p2p"
        for target in sorted(_imports(name, path))
        # a name that is not a module is a name inside one, already counted as that module
        if target in modules and target != "dandelion_p2p" and not _allowed(name, target)
    ]
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_module_is_over_the_size_limit() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these (over {MAX_MODULE_LINES} lines): {long}"


def test_protocol_cores_import_no_io_library() -> None:
    """Imported together in a fresh interpreter: if neither library is loaded after all of
    them, none of them loads it. On failure each is retried alone to name the culprits."""
    probe = (
        "import importlib, sys\n"
        f"for m in {list(CORE_MODULES)!r}: importlib.import_module(m)\n"
        f"print(sorted(n for n in {IO_LIBRARIES!r} if n in sys.modules))\n"
    )
    loaded = _run(probe)
    if loaded == "[]":
        return
    culprits = []
    for module in CORE_MODULES:
        alone = _run(
            f"import importlib, sys; importlib.import_module({module!r}); "
            f"print(sorted(n for n in {IO_LIBRARIES!r} if n in sys.modules))"
        )
        if alone != "[]":
            culprits.append(f"{module} loads {alone}")
    raise AssertionError("protocol cores that load an I/O library:\n" + "\n".join(culprits))


def test_the_daemon_side_never_loads_torch() -> None:
    loaded = _run(
        "import sys, dandelion_p2p.daemon, dandelion_p2p.services, dandelion_p2p.cli\n"
        "from dandelion_p2p.services import SERVICE_MODULES\n"
        "import importlib\n"
        "for m in SERVICE_MODULES: importlib.import_module(m)\n"
        "print([n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules])"
    )
    assert loaded == "[]"


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
