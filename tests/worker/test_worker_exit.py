"""The worker process's exit codes: a failure that a restart cannot fix (a package missing, a
library that refuses the installed version of another) exits with code 2, which tells the
daemon not to restart it; the reason is the worker's last error line. A failure that may pass
(a busy GPU) exits with code 1, which the daemon retries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dandelion_p2p.worker.cli import EXIT_CONFIG
from tests.worker.runconfigs import tiny_run

# Broken or mismatched environments: a package missing, or one whose entry point refuses the
# installed release of another (as transformers 5 refuses peft 0.21).
BROKEN_ENVIRONMENTS = {
    "missing_package": (
        "diffusers/__init__.py",
        "raise ImportError(\"No module named 'diffusers'\")\n",
        "diffusers",
    ),
    "incompatible_release": (
        "sitecustomize.py",
        "import peft\n"
        "def refuse(*args, **kwargs):\n"
        "    raise ValueError('The version of PEFT you are using is not compatible, please use"
        " a version >= 9.0')\n"
        "peft.inject_adapter_in_model = refuse\n",
        "not compatible",
    ),
    "api_missing": (
        "sitecustomize.py",
        "import peft\n"
        "class LoraConfig:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise AttributeError(\"module 'torch' has no attribute 'float8_e4m3fn'\")\n"
        "peft.LoraConfig = LoraConfig\n",
        "float8_e4m3fn",
    ),
}
TRANSIENT_FAILURE = (
    "sitecustomize.py",
    "import peft\n"
    "def busy(*args, **kwargs):\n"
    "    raise RuntimeError('CUDA error: all CUDA-capable devices are busy or unavailable')\n"
    "peft.inject_adapter_in_model = busy\n",
)


def start_worker_in(tmp_path: Path, model: Path, images: Path, file: str,
                    source: str) -> subprocess.Popen[bytes]:
    """A worker with ``source`` shadowing ``file``; its stderr goes to ``tmp_path/stderr``."""
    shadow = tmp_path / "shadow" / file
    shadow.parent.mkdir(parents=True)
    shadow.write_text(source)
    run_config = tmp_path / "run.toml"
    run_config.write_text(tiny_run(model, training={"method": "lora", "lora_rank": 2,
                                                    "max_steps": 1}).to_toml())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"),
                                                        str(Path.cwd())])}
    with (tmp_path / "stderr").open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "dandelion_p2p.worker", "--run-config", str(run_config),
             "--data", str(images), "--work-dir", str(tmp_path / "work")],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )


@pytest.fixture(scope="module")
def worker_runs(tiny_sd1: Path, images: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Exit code and stderr of a worker in every environment, by case name (``transient``:
    ``TRANSIENT_FAILURE``). The workers run at once: each spends its time importing."""
    cases = {**{name: (file, source) for name, (file, source, _) in BROKEN_ENVIRONMENTS.items()},
             "transient": TRANSIENT_FAILURE}
    folders = {name: tmp_path_factory.mktemp(name) for name in cases}
    started = {name: start_worker_in(folders[name], tiny_sd1, images, *case)
               for name, case in cases.items()}
    deadline = time.monotonic() + 240
    try:
        return {name: (proc.wait(timeout=max(0.0, deadline - time.monotonic())),
                       (folders[name] / "stderr").read_text())
                for name, proc in started.items()}
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("case", sorted(BROKEN_ENVIRONMENTS))
def test_an_environment_that_cannot_train_exits_with_code_2(
    case: str, worker_runs: dict[str, tuple[int, str]]
) -> None:
    _, _, reason = BROKEN_ENVIRONMENTS[case]
    returncode, stderr = worker_runs[case]
    assert returncode == EXIT_CONFIG, stderr[-3000:]
    last_error = [line for line in stderr.splitlines() if "ERROR" in line][-1]
    assert "cannot train" in last_error
    assert reason in last_error
    assert "Traceback" not in stderr, "an expected failure is explained, not dumped"


def test_a_failure_that_may_pass_is_left_to_restarts(
    worker_runs: dict[str, tuple[int, str]]
) -> None:
    returncode, stderr = worker_runs["transient"]
    assert returncode == 1, stderr[-3000:]
    assert "devices are busy" in stderr
