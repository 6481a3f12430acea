"""A project's dvc.yaml for its own properties: the repository's pipeline, less the top-level
plots of properties its params do not configure.

The stages run per property (`foreach: ${properties}`), but DVC has no foreach for top-level
plots: dvc.yaml lists every property's plots, and in a project that runs fewer properties
`dvc plots show` reports the missing ones as failed. The plots block is filtered as text, so
the file keeps its comments.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

PLOTS_KEY = "plots:"
ENTRY_PREFIX = "  - "  # a top-level plot: `  - <property> <kind>:`


class PipelineFileError(ValueError):
    """A dvc.yaml whose top-level plots this module cannot read."""


def _entries(block: list[str]) -> list[list[str]]:
    """The plots block's lines grouped per entry (comment lines go with the next entry)."""
    entries: list[list[str]] = []
    pending: list[str] = []
    for line in block:
        if line.startswith(ENTRY_PREFIX):
            entries.append(pending + [line])
            pending = []
        elif entries and line.startswith("    "):
            entries[-1].append(line)
        else:
            pending.append(line)
    if pending:
        entries.append(pending)
    return entries


def _plot_property(entry: list[str]) -> str | None:
    for line in entry:
        if line.startswith(ENTRY_PREFIX):
            return line[len(ENTRY_PREFIX):].split()[0].rstrip(":")
    return None


def pipeline_for(source: str, properties: Sequence[str]) -> str:
    """`source` (dvc.yaml's text) with only the top-level plots of `properties`."""
    lines = source.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip() == PLOTS_KEY)
    except StopIteration:
        return source  # no top-level plots
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and not lines[i].startswith((" ", "#"))), len(lines))
    kept = [line for entry in _entries(lines[start + 1:end])
            if _plot_property(entry) in (None, *properties) for line in entry]
    text = "".join(lines[:start + 1] + kept + lines[end:])
    plots = (yaml.safe_load(text) or {}).get("plots") or []
    ids = {next(iter(p)) for p in plots if isinstance(p, dict)}
    unknown = {i for i in ids if i.split()[0] not in properties}
    if unknown:
        raise PipelineFileError(f"dvc.yaml plots {sorted(unknown)} are not `<property> <kind>` "
                                "entries this filter can read")
    if not plots:
        # `plots:` with no entries is null, which DVC refuses
        text = "".join(lines[:start] + lines[end:])
    return text
