"""``dandelion-p2p worker``: run the trainer, against a daemon or alone.

Exit codes tell the supervising daemon what happened: 0 finished or stopped, 2 a problem with
the configuration, the model or the data (restarting will not help), 3 out of memory, 1 any
other failure.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

EXIT_CONFIG = 2
EXIT_OOM = 3

log = logging.getLogger("dandelion_p2p.worker")
T = TypeVar("T")


def _shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("must look like INDEX/COUNT, e.g. 0/2") from None
    if not 0 <= index < count:
        raise click.BadParameter("INDEX must be in 0..COUNT-1")
    return index, count


@click.command("worker")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="The daemon's control socket (default: DATA_DIR/control.sock).")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="The daemon's data directory (local settings, socket, work folder); "
                   "default: $DANDELION_DATA_DIR or the daemon's default.")
@click.option("--run-config", type=click.Path(path_type=Path),
              help="Train alone from this run config, with no daemon.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Folder of images with captions, or of .tar shards (default, with a "
                   "daemon: chunks leased from the run's dataset servers).")
@click.option("--work-dir", type=click.Path(path_type=Path),
              help="Checkpoints, cache, samples, exports (default: DATA_DIR/worker/RUN).")
@click.option("--shard", help="Train only this share of the data: INDEX/COUNT.")
@click.option("--stop-at", type=int, default=0, help="Stop at this global step.")
@click.option("--device", default=None, help="auto, cpu or cuda (default: local settings).")
@click.option("--no-export", is_flag=True, help="Do not export the model at the end.")
@click.option("--devices", type=click.IntRange(1, 64), default=None,
              help="Train as one peer on this many devices (GPUs, or CPU processes): data "
                   "parallel inside the peer; needs --data (default: local settings).")
@click.option("--log-level", default="info")
def worker_command(socket_path: Path | None, data_dir: Path | None, run_config: Path | None,
                   data: Path | None, work_dir: Path | None, shard: str | None,
                   stop_at: int, device: str | None, no_export: bool, devices: int | None,
                   log_level: str) -> None:
    """Train: with the swarm through the local daemon, or alone with --run-config."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        stream=sys.stderr)
    sys.exit(run_worker(socket_path=socket_path, data_dir=data_dir, run_config=run_config,
                        data=data, work_dir=work_dir, shard=_shard(shard), stop_at=stop_at,
                        device=device, export=not no_export, devices=devices))


def run_worker(**kwargs: Any) -> int:
    from dandelion_p2p.control.protocol import CommandFailed
    from dandelion_p2p.errors import ConfigError, PeerUnavailable

    try:
        return _run(**kwargs)
    except ConfigError as exc:
        log.error("cannot train: %s", exc)
        return EXIT_CONFIG
    except (PeerUnavailable, CommandFailed) as exc:
        log.error("lost the daemon: %s", exc)
        return 1
    except ImportError as exc:
        log.error("cannot train: this Python environment lacks a package the trainer needs "
                  "(%s); install dandelion-p2p[train] from the project's lock", exc)
        return EXIT_CONFIG
    except Exception as exc:
        if _out_of_memory(exc):
            log.error("out of memory: %s; lower the batch size or resolution, or turn on "
                      "gradient checkpointing and 8-bit AdamW in the local settings", exc)
            return EXIT_OOM
        log.exception("the trainer failed")
        return 1


def _out_of_memory(exc: BaseException) -> bool:
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "out of memory" in str(exc).lower())


def _environment_mismatch(exc: BaseException) -> bool:
    """Whether ``exc`` says that the installed packages do not fit together: one library
    refusing the release of another, or calling an API the other does not have. Such a
    failure recurs on every restart; anything else while setting up (a busy GPU, a bug in
    one image's handling) may not, and is left to the daemon's restarts."""
    if isinstance(exc, ImportError | NotImplementedError | AttributeError):
        return True
    text = str(exc).lower()
    return "version" in text and any(word in text for word in (
        "compatible", "requires", "please use", "upgrade", "install"))


def _set_up(make: Callable[[], T]) -> T:
    """``make()``, with an environment whose packages do not fit together turned into
    ``ConfigError`` (exit code 2: the daemon does not restart a worker that would fail the
    same way again)."""
    from dandelion_p2p.errors import ConfigError, DandelionError

    try:
        return make()
    except Exception as exc:
        if isinstance(exc, DandelionError) or not _environment_mismatch(exc):
            raise
        log.debug("setting up the trainer failed", exc_info=True)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"this Python environment cannot set up training ({type(exc).__name__}: "
            f"{first_line}); install the versions in the project's lock "
            "(requirements-train.lock)"
        ) from exc


def _run(*, socket_path: Path | None, data_dir: Path | None, run_config: Path | None,
         data: Path | None, work_dir: Path | None, shard: tuple[int, int] | None, stop_at: int,
         device: str | None, export: bool, devices: int | None = None) -> int:
    from dandelion_p2p.config import default_data_dir
    from dandelion_p2p.errors import ConfigError
    from dandelion_p2p.local_settings import LocalSettings, load_local_settings
    from dandelion_p2p.runconfig.schema import loads
    from dandelion_p2p.worker import protocol
    from dandelion_p2p.worker.quiet import quiet_third_party

    quiet_third_party()  # before anything that may import bitsandbytes
    from dandelion_p2p.worker.link import DaemonLink, Link, SoloLink
    from dandelion_p2p.worker.train import Trainer, WorkerOptions, run_until_stopped

    if data_dir is None and socket_path is None and run_config is None:
        env = os.environ.get("DANDELION_DATA_DIR", "").strip()
        data_dir = Path(env) if env else default_data_dir()
    settings = load_local_settings(data_dir) if data_dir is not None else LocalSettings()
    link: Link
    peer = ""
    if run_config is not None:
        if data is None:
            raise ConfigError("training alone (--run-config) needs a folder of images: --data")
        link = SoloLink(run_config)
    else:
        if socket_path is None:
            if data_dir is None:
                raise ConfigError("give --socket or --data-dir (a daemon), or --run-config")
            socket_path = data_dir / "control.sock"
        daemon = DaemonLink(socket_path)
        link, peer = daemon, daemon.peer
    config = loads(link.run_config_toml)
    if work_dir is None:
        if data_dir is None:
            raise ConfigError("give --work-dir (or --data-dir)")
        run = link.run or config.name
        work_dir = protocol.work_dir_for(data_dir / "worker", config.name, run)
        if work_dir.name != config.name:
            log.warning("%s holds another run of the name %s; this run (%s) trains in %s",
                        data_dir / "worker" / config.name, config.name, run, work_dir)
        protocol.claim_work_dir(work_dir, run)
    options = WorkerOptions(
        data=data,
        work_dir=work_dir,
        device=device or settings.device,
        mixed_precision=settings.mixed_precision,
        attention=settings.attention,
        gradient_checkpointing=settings.gradient_checkpointing,
        eight_bit_adam=settings.eight_bit_adam,
        micro_batch=settings.micro_batch,
        follow_symlinks=settings.follow_symlinks,
        shard=shard,
        stop_at=stop_at,
        export=export,
    )
    devices = devices or settings.devices
    if devices > 1:
        from dandelion_p2p.worker.distributed import run_ranks

        stopped = run_ranks(devices, link, options, peer).position.global_step
        log.info("the worker stopped at global step %d", stopped)
        return 0

    def set_up() -> Trainer:
        trainer = Trainer(config, options, link, peer=peer)
        trainer.resume()
        return trainer

    trainer = _set_up(set_up)
    run_until_stopped(trainer)
    log.info("the worker stopped at global step %d", trainer.position.global_step)
    return 0
