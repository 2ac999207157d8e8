"""``dandelion-p2p runs``: the runs of the swarm, and publishing a run's config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

CONTROL = [
    click.option("--data-dir", type=click.Path(path_type=Path), help="The daemon's data dir."),
    click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML file."),
]


def _control_options(func: Any) -> Any:
    for option in reversed(CONTROL):
        func = option(func)
    return func


def _call(data_dir: Path | None, config_file: Path | None, method: str,
          params: dict[str, Any]) -> dict[str, Any]:
    from dandelion_p2p.cli import _control

    return _control(data_dir, config_file, method, params)


def _age(updated_at: float) -> str:
    seconds = max(0, int(time.time() - updated_at))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


@click.group(invoke_without_command=True)
@_control_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def runs(ctx: click.Context, data_dir: Path | None, config_file: Path | None,
         as_json: bool) -> None:
    """List the runs of the swarm (as their owners list them in the DHT)."""
    if ctx.invoked_subcommand is not None:
        return
    result = _call(data_dir, config_file, "runs.list", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if not result["runs"]:
        click.echo("no runs found")
        return
    for r in result["runs"]:
        click.echo(f"{r['run']}  v{r['version']}  {r['model']}  owner {r['owner']}  "
                   f"updated {_age(r['updated_at'])}")


@runs.command()
@click.argument("run")
@_control_options
def show(run: str, data_dir: Path | None, config_file: Path | None) -> None:
    """Print the newest config of RUN."""
    result = _call(data_dir, config_file, "runconfig.get", {"run": run})
    click.echo(f"# run {result['run']} version {result['version']} owner {result['owner']}")
    click.echo(result["toml"], nl=False)


@runs.command()
@click.argument("toml_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@_control_options
def publish(toml_file: Path, data_dir: Path | None, config_file: Path | None) -> None:
    """Publish TOML_FILE as the next version of its run (the daemon's key owns the run)."""
    result = _call(data_dir, config_file, "runconfig.publish",
                   {"toml": toml_file.read_text(encoding="utf-8")})
    click.echo(f"published {result['run']} version {result['version']}")
