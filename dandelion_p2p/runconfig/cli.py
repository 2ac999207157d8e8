"""``dandelion-p2p runs``: the runs of the swarm, and publishing a run's config."""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path
from typing import Any

import click

from dandelion_p2p.cli_common import CONTROL_OPTIONS, add_options, call_daemon


def printable(value: object, *, multiline: bool = False) -> str:
    """``value`` as text safe for a terminal: what comes from the DHT is anyone's text, and
    control characters (escape sequences, carriage returns, bidi overrides) could rewrite
    what the terminal shows. Each becomes U+FFFD; ``multiline`` keeps newlines and tabs."""
    keep = {"\n", "\t"} if multiline else set()
    return "".join(
        ch if ch in keep or unicodedata.category(ch) not in ("Cc", "Cf") else "\ufffd"
        for ch in str(value)
    )


def run_line(r: dict[str, Any]) -> str:
    """One run of ``runs.list`` as ``dandelion-p2p runs`` prints it."""
    return printable(f"{r['run']}  v{r['version']}  {r['model']}  owner {r['owner']}  "
                     f"updated {_age(r['updated_at'])}")


def shown_config(result: dict[str, Any]) -> str:
    """``runconfig.get``'s result as ``dandelion-p2p runs show`` prints it."""
    head = printable(f"# run {result['run']} version {result['version']} (from global step "
                     f"{result.get('effective_step', 0)}) owner {result['owner']}")
    return head + "\n" + printable(result["toml"], multiline=True)


def _age(updated_at: float) -> str:
    seconds = max(0, int(time.time() - updated_at))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


@click.group(invoke_without_command=True)
@add_options(CONTROL_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def runs(ctx: click.Context, data_dir: Path | None, config_file: Path | None,
         as_json: bool) -> None:
    """List the runs of the swarm (as their owners list them in the DHT)."""
    if ctx.invoked_subcommand is not None:
        return
    result = call_daemon(data_dir, config_file, "runs.list", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if not result["runs"]:
        click.echo("no runs found")
        return
    for r in result["runs"]:
        click.echo(run_line(r))


@runs.command()
@click.argument("run")
@add_options(CONTROL_OPTIONS)
def show(run: str, data_dir: Path | None, config_file: Path | None) -> None:
    """Print the newest config of RUN."""
    result = call_daemon(data_dir, config_file, "runconfig.get", {"run": run})
    click.echo(shown_config(result), nl=False)


@runs.command()
@click.argument("toml_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--at-step", type=click.IntRange(0, 2**53 - 1), default=None,
              help="The global step from which the new version applies (rounded up to a "
                   "round boundary); default: a few rounds after the swarm's current step.")
@add_options(CONTROL_OPTIONS)
def publish(toml_file: Path, at_step: int | None, data_dir: Path | None,
            config_file: Path | None) -> None:
    """Publish TOML_FILE as the next version of its run (the daemon's key owns the run)."""
    params: dict[str, Any] = {"toml": toml_file.read_text(encoding="utf-8")}
    if at_step is not None:
        params["at_step"] = at_step
    result = call_daemon(data_dir, config_file, "runconfig.publish", params)
    click.echo(printable(f"published {result['run']} version {result['version']}, in force "
                         f"from global step {result['effective_step']}"))
