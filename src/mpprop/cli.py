"""The `mpprop` command line: small commands that the DVC stages call."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from mpprop.config import ConfigError, Params, load_params


class Context:
    def __init__(self, params_file: str, overrides: tuple[str, ...]) -> None:
        self.params_file = params_file
        self.overrides = list(overrides)
        self._params: Params | None = None

    @property
    def params(self) -> Params:
        if self._params is None:
            try:
                self._params = load_params(self.params_file, self.overrides)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from exc
        return self._params


pass_ctx = click.make_pass_decorator(Context)


def check_property(params: Params, prop: str) -> str:
    if prop not in params.property_specs():
        raise click.BadParameter(
            f"unknown property {prop!r}; known: {', '.join(params.property_specs())}",
            param_hint="--property",
        )
    return prop


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file (the project's configuration).")
@click.option("-S", "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a params value for this command, e.g. -S train.batch_size=64.")
@click.pass_context
def main(ctx: click.Context, params_file: str, overrides: tuple[str, ...]) -> None:
    """mpprop: CGCNN property models on a dated Materials Project snapshot."""
    ctx.obj = Context(params_file, overrides)


@main.command()
@click.option("--source", type=click.Choice(["file", "mp-api"]), default=None,
              help="Override data.source.")
@click.option("--path", "path", default=None, help="Override data.path (file source).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Snapshot folder (default: data.snapshot_dir).")
@pass_ctx
def fetch(obj: Context, source: str | None, path: str | None, out_dir: str | None) -> None:
    """Write a dated snapshot (snapshot.npz + snapshot.json) from MP or a local file."""
    from mpprop.sources import FetchError, fetch_snapshot, format_fetch_summary

    params = obj.params
    if source:
        params.data["source"] = source
    if path:
        params.data["path"] = str(Path(path).resolve())
    try:
        meta = fetch_snapshot(params, Path(out_dir) if out_dir else None)
    except (FetchError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_fetch_summary(meta))


@main.command()
@click.option("--workers", type=int, default=None, help="Processes (default: all cores).")
@pass_ctx
def featurize(obj: Context, workers: int | None) -> None:
    """Build the crystal-graph cache of the snapshot (keyed by snapshot hash + settings)."""
    from mpprop.graphs import GraphError, build_graphs, cache_key, save_graph_cache
    from mpprop.snapshot import SnapshotError, load_snapshot

    params = obj.params
    try:
        snap, meta = load_snapshot(params.snapshot_dir(), verify=True)
    except SnapshotError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = params.graph_settings()
    key = cache_key(meta["sha256"], settings)
    t0 = time.perf_counter()
    try:
        cache = build_graphs(snap, settings, workers=workers)
    except GraphError as exc:
        raise click.ClickException(str(exc)) from exc
    seconds = time.perf_counter() - t0
    cache.key = key
    folder = save_graph_cache(
        cache, params.graph_cache_dir(), {"snapshot_sha256": meta["sha256"], "seconds": seconds}
    )
    # a stable pointer for DVC and for people: which cache belongs to the current snapshot
    (params.graph_cache_dir() / "current.json").write_text(
        json.dumps({"key": key, "snapshot_sha256": meta["sha256"]}, indent=2) + "\n"
    )
    click.echo(
        f"{len(cache)} graphs, {int(cache.edge_offsets[-1])} edges in {seconds:.1f} s "
        f"({len(cache) / max(seconds, 1e-9):.0f} structures/s); "
        f"{cache.nbytes() / max(len(cache), 1):.0f} bytes/structure -> {folder}"
    )


@main.command()
@click.option("--property", "props", multiple=True,
              help="Properties to split (default: all in params).")
@click.option("--overwrite", is_flag=True, help="Remake splits that exist (new test sets!).")
@pass_ctx
def split(obj: Context, props: tuple[str, ...], overwrite: bool) -> None:
    """Make each property's fixed, seeded 20% test split."""
    from mpprop.data import ensure_split, open_workspace

    params = obj.params
    ws = open_workspace(params, in_memory=False)
    for prop in props or params.properties:
        check_property(params, prop)
        s = ensure_split(params, ws, prop, overwrite=overwrite)
        click.echo(f"{prop}: {len(s['test'])} test, {len(s['pool'])} train+val")


@main.command()
@click.option("--property", "prop", required=True, help="Property key, e.g. bulk_modulus.")
@click.option("--preset", default="xie", show_default=True,
              help="xie (the paper's baseline) or tuned (from `mpprop tune`).")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--lr-decay-epoch", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--optimizer", type=click.Choice(["SGD", "RAdam", "Adam"]), default=None)
@click.option("--n-conv", type=int, default=None)
@click.option("--n-h", type=int, default=None)
@click.option("--atom-fea-len", type=int, default=None)
@click.option("--h-fea-len", type=int, default=None)
@pass_ctx
def train(obj: Context, prop: str, preset: str, **overrides: object) -> None:
    """Train one property's CGCNN, evaluate it on the fixed test set, log it to MLflow."""
    from mpprop.training import train_property

    params = obj.params
    check_property(params, prop)
    try:
        metrics = train_property(params, prop, preset, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(metrics, indent=2))


def run() -> None:  # pragma: no cover
    sys.exit(main())
