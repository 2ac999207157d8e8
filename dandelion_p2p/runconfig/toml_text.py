"""Writing a run config back as TOML text (what ``schema.loads`` reads)."""

from __future__ import annotations

from typing import Any


def plain(value: Any) -> Any:
    """Dicts, lists and scalars: tuples become lists, as TOML has no tuples."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for a two-level table of scalars and string lists, and lists of tables of
    scalars inside a table (all a run config holds); None values (unset) are left out."""
    top = [f"{k} = {_toml_scalar(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = [*top]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append("")
            lines.append(f"[{k}]")
            lines.extend(f"{kk} = {_toml_scalar(vv)}" for kk, vv in v.items()
                         if vv is not None and not _is_table_list(vv))
            for kk, vv in v.items():
                if vv is not None and _is_table_list(vv):
                    for table in vv:
                        lines.append("")
                        lines.append(f"[[{k}.{kk}]]")
                        lines.extend(f"{kkk} = {_toml_scalar(vvv)}"
                                     for kkk, vvv in table.items() if vvv is not None)
    return "\n".join(lines) + "\n"


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


