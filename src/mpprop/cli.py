"""The `mpprop` command line: small commands that the DVC stages call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mpprop.config import Params, load_params
from mpprop.outputs import OutputBusyError
from mpprop.settings import OPTIMIZERS, ConfigError
from mpprop.write_errors import ProjectFileError, writing


class ParamsError(click.ClickException):
    """A params file (or -S override) that fails validation: `Error: <message>` on stderr and
    exit code 2, like a usage error, but without the usage text."""

    exit_code = 2


class Context:
    """What every command gets: the params, loaded and validated on first use (before any
    work), so that a bad params file ends the command with exit code 2."""

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
                raise ParamsError(str(exc)) from exc
        return self._params


class RefusedError(click.ClickException):
    """An argument refused because using it would destroy data (an --output that is an input
    or in a project folder): `Error: <message>` in one line and exit code 2, like a usage
    error, but without the usage text."""

    exit_code = 2


pass_ctx = click.make_pass_decorator(Context)


def check_property(params: Params, prop: str) -> str:
    if prop not in params.property_specs():
        raise click.BadParameter(
            f"unknown property {prop!r}; known: {', '.join(params.property_specs())}",
            param_hint="--property",
        )
    return prop


class MappedErrorsGroup(click.Group):
    """The command group that turns the core's own errors into one-line CLI errors: the core
    knows nothing of click, the CLI maps what it raises (exit code 1, no traceback): another
    writer of an output, a file that cannot be written (disk full, read-only), a tracking
    store that cannot be used (empty, corrupt, another project's)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (OutputBusyError, ProjectFileError) as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=MappedErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    from mpprop.stages.fetch import FetchError, fetch_snapshot, format_fetch_summary

    params = obj.params
    if source:
        params.data.source = source
    if path:
        params.data.path = str(Path(path).resolve())
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
    from mpprop.graphs import GraphError
    from mpprop.snapshot import SnapshotError
    from mpprop.stages.featurize import featurize as build

    try:
        summary = build(obj.params, workers)
    except (SnapshotError, GraphError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary.format())


@main.command()
@click.option("--property", "props", multiple=True,
              help="Properties to split (default: all in params).")
@click.option("--overwrite", is_flag=True, help="Remake splits that exist (new test sets!).")
@pass_ctx
def split(obj: Context, props: tuple[str, ...], overwrite: bool) -> None:
    """Make each property's fixed, seeded 20% test split."""
    from mpprop.data import SplitError
    from mpprop.snapshot import SnapshotError
    from mpprop.stages.split import split_property

    params = obj.params
    for prop in props or params.properties:
        check_property(params, prop)
        try:
            s = split_property(params, prop, overwrite=overwrite)
        except (SnapshotError, SplitError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{prop}: {len(s['test'])} test, {len(s['pool'])} train+val")


@main.command()
@pass_ctx
def pretrain(obj: Context) -> None:
    """Train the trunk the tuned models fine-tune (params `pretrain`; off by default)."""
    from mpprop.stages.pretrain import pretrain as run_pretrain

    try:
        metrics = run_pretrain(obj.params)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(metrics, indent=2))


@main.command()
@click.option("--property", "prop", required=True, help="Property key, e.g. bulk_modulus.")
@click.option("--preset", default="xie", show_default=True,
              help="xie (the paper's baseline), modern (L1, AdamW, warm-up + cosine, EMA), "
                   "tuned (from `mpprop tune`) or any name under presets: in params.yaml.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default: the preset's).")
@click.option("--lr", type=float, default=None, help="Learning rate (default: the preset's).")
@click.option("--lr-decay-epoch", type=int, default=None,
              help="Epoch of the x0.1 step decay (lr_schedule step only).")
@click.option("--batch-size", type=int, default=None, help="Crystals per batch.")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=None,
              help="Optimizer (default: the preset's).")
@click.option("--n-conv", type=int, default=None, help="Graph convolution layers.")
@click.option("--n-h", type=int, default=None, help="Hidden layers after pooling.")
@click.option("--atom-fea-len", type=int, default=None, help="Atom feature length.")
@click.option("--h-fea-len", type=int, default=None, help="Hidden feature length.")
@click.option("--ensemble", type=click.IntRange(min=1), default=None,
              help="Members to train (default: presets.<preset>.ensemble or train.ensemble); "
                   "kept as one ensemble, or the best alone with -S train.ensemble_keep=best.")
@click.option("--init-from", default=None,
              help="Fine-tune: start from this model's trunk (atom embedding + convolutions) "
                   "with a new head: mpprop-P@alias, NAME/VERSION, models:/..., a bundle "
                   "file, or published:P. Default: train.init_from.")
@click.option("--freeze-trunk-epochs", type=click.IntRange(min=0), default=None,
              help="Epochs the parent's trunk stays fixed (default: train.freeze_trunk_epochs).")
@click.option("--trunk-lr-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The trunk's learning rate is lr x this (default: train.trunk_lr_scale).")
@pass_ctx
def train(obj: Context, prop: str, preset: str, ensemble: int | None, init_from: str | None,
          freeze_trunk_epochs: int | None, trunk_lr_scale: float | None,
          **overrides: object) -> None:
    """Train one property's CGCNN, evaluate it on the fixed test set, log it to MLflow."""
    from mpprop.registry import RegistryError
    from mpprop.stages.train import train_property

    params = obj.params
    check_property(params, prop)
    if freeze_trunk_epochs is not None:
        params.train.freeze_trunk_epochs = freeze_trunk_epochs
    if trunk_lr_scale is not None:
        params.train.trunk_lr_scale = trunk_lr_scale
    try:
        metrics = train_property(params, prop, preset, overrides, ensemble=ensemble,
                                 init_from=init_from)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError,
            RegistryError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(metrics, indent=2))


@main.command()
@click.option("--property", "prop", required=True, help="Property key, e.g. bulk_modulus.")
@click.option("--n-trials", type=int, default=None,
              help="Target total of finished (complete + pruned) trials of the study, across "
                   "all workers (default: tune.n_trials).")
@click.option("--epochs", type=int, default=None,
              help="Epochs per trial (default: tune.epochs; a resumed study keeps its own).")
@click.option("--storage", default=None,
              help="Optuna storage URL (default: tune.storage, SQLite); e.g. "
                   "postgresql://user@host/db for workers on several hosts.")
@click.option("--study-name", default=None, help="Study name (default: mpprop-<property>).")
@click.option("--no-pruning", is_flag=True, help="Run every trial to the last epoch.")
@pass_ctx
def tune(obj: Context, prop: str, n_trials: int | None, epochs: int | None,
         storage: str | None, study_name: str | None, no_pruning: bool) -> None:
    """Tune one property's hyperparameters with Optuna (TPE + percentile pruning), each trial
    an MLflow run; writes tuned/<property>.yaml for `train --preset tuned`.

    One process is one worker: start more `mpprop tune` processes with the same --storage and
    study name (on this host or others) to run trials in parallel. Rerunning continues the
    study up to --n-trials.
    """
    from mpprop.stages.tune import TuneError, tune_property

    params = obj.params
    check_property(params, prop)
    try:
        summary = tune_property(params, prop, n_trials, epochs, storage, study_name,
                                prune=not no_pruning, echo=click.echo)
    except (ConfigError, TuneError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option("--property", "props", multiple=True,
              help="Properties to promote (default: all in params).")
@click.option("--record", type=click.Path(dir_okay=False), default=None,
              help="Write what was promoted as JSON (the DVC stage's output).")
@pass_ctx
def promote(obj: Context, props: tuple[str, ...], record: str | None) -> None:
    """Register each property's best model by validation MAE; point `champion` at it."""
    from mpprop.registry import RegistryError
    from mpprop.stages.promote import promote as promote_property

    params = obj.params
    failed = []
    promoted: dict[str, dict] = {}
    for prop in props or params.properties:
        check_property(params, prop)
        try:
            p = promote_property(params, prop)
        except RegistryError as exc:
            click.echo(f"{prop}: {exc}", err=True)
            failed.append(prop)
            continue
        click.echo(f"{prop}: {p.summary()}")
        promoted[prop] = p.record()
    if failed:
        raise click.ClickException(f"no candidate model for: {', '.join(failed)}")
    if record:
        with writing(Path(record), permission=True):  # a full disk: one line naming it
            Path(record).parent.mkdir(parents=True, exist_ok=True)
            Path(record).write_text(json.dumps(promoted, indent=2) + "\n")


@main.command("import-pretrained")
@click.option("--property", "props", multiple=True,
              help="Properties to import (default: all seven published regressions); "
                   "band_gap brings the metal classifier (is_metal), which can be named too.")
@pass_ctx
def import_pretrained(obj: Context, props: tuple[str, ...]) -> None:
    """Register the published CGCNN checkpoints (Xie & Grossman 2018) under their alias
    (seven regressions and the metal / non-metal classifier), and mpprop's own shipped
    models under theirs (mlflow.shipped_alias, e.g. mpprop-2026)."""
    from mpprop.model import PRETRAINED_CLASSIFIER_FILES
    from mpprop.shipped import ShippedModelError
    from mpprop.stages.import_models import import_pretrained as do_import
    from mpprop.stages.import_models import import_shipped

    params = obj.params
    for prop in props:
        if prop not in PRETRAINED_CLASSIFIER_FILES:
            check_property(params, prop)
    try:
        results = do_import(params, list(props) or None)
        results += import_shipped(params, props=list(props) or None)
    except ShippedModelError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in results:
        click.echo(f"{r.name}@{r.alias} -> v{r.version} ({r.status}; "
                   f"checkpoint sha256 {r.checkpoint_sha256[:12]})")


@main.command()
@click.option("--property", "prop", required=True,
              help="Property key, or `all` for every property whose model has the alias.")
@click.option("--input", "inputs", multiple=True, required=True,
              type=click.Path(path_type=Path),
              help="Structure folder, list file (.txt), structure file, snapshot folder or "
                   ".jsonl(.gz) of MP records; repeatable.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="CSV to write (atomically). Never an input, a file in an input folder or "
                   "list, or in the project's data, models, tracking or .dvc folders; an "
                   "existing file only if it is an earlier prediction CSV.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --output that is not an earlier prediction CSV "
                   "(inputs and project folders stay refused).")
@click.option("--alias", default=None, help="Registry alias (default: mlflow.champion_alias).")
@click.option("--version", type=int, default=None, help="Registry version instead of an alias.")
@click.option("--batch-size", type=int, default=None,
              help="Structures per model call (default: predict.batch_size).")
@click.option("--fail-on-error", is_flag=True,
              help="Exit non-zero (1) if any row has an error (the CSV is still written).")
@pass_ctx
def predict(obj: Context, prop: str, inputs: tuple[Path, ...], output: Path, overwrite: bool,
            alias: str | None, version: int | None, batch_size: int | None,
            fail_on_error: bool) -> None:
    """Predict properties of structures with registered models; one CSV row per structure."""
    from mpprop.output_guard import OutputRefused, check_prediction_output
    from mpprop.stages.predict import PredictError, resolve_models, run_prediction

    params = obj.params
    if prop != "all":
        check_property(params, prop)
    if alias and version is not None:
        raise click.UsageError("give --alias or --version, not both")
    try:
        # before any model is loaded: a refused --output writes nothing
        check_prediction_output(params, list(inputs), output, overwrite)
    except OutputRefused as exc:
        raise RefusedError(str(exc)) from exc
    try:
        models = resolve_models(params, prop, alias, version)
    except PredictError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        summary = run_prediction(
            models, list(inputs), output, batch_size or params.predict.batch_size,
            limits=params.structure_limits(),
            coverage=params.predict.interval_coverage,
        )
    except PredictError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(summary.format())
    n_failed = sum(summary.failed.values())
    if fail_on_error and n_failed:
        raise click.ClickException(f"{n_failed} row(s) with an error (--fail-on-error)")


@main.command()
@click.option("--property", "prop", required=True, help="Property key, e.g. bulk_modulus.")
@click.option("--alias", default=None,
              help="Registry alias of the model to calibrate (default: mlflow.champion_alias); "
                   "it moves to the calibrated version unless --keep-alias.")
@click.option("--version", type=int, default=None,
              help="Registry version to calibrate instead of an alias (no alias moves).")
@click.option("--input", "labelled", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labelled materials the model was not trained on: .jsonl(.gz) of MP records "
                   "(material_id, structure, the property's field).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the calibrated bundle (model.pt) to this new file.")
@click.option("--no-register", is_flag=True,
              help="Do not register a new version (with --output: the bundle file only).")
@click.option("--keep-alias", is_flag=True, help="Leave --alias on the version it is on.")
@pass_ctx
def calibrate(obj: Context, prop: str, alias: str | None, version: int | None,
              labelled: Path, output: Path | None, no_register: bool, keep_alias: bool) -> None:
    """Calibrated prediction intervals for a registered model: split conformal on a labelled
    file; registers a new version of the model with them in its bundle."""
    from mpprop.stages.calibrate import CalibrateError, calibrate_model

    params = obj.params
    check_property(params, prop)
    if alias and version is not None:
        raise click.UsageError("give --alias or --version, not both")
    if no_register and output is None:
        raise click.UsageError("--no-register needs --output (else nothing is kept)")
    try:
        result = calibrate_model(params, prop, labelled, alias, version, output,
                                 register=not no_register, move_alias=not keep_alias)
    except CalibrateError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(result.format())


@main.command()
@click.option("--property", "prop", required=True, help="Property key, e.g. band_gap.")
@click.option("--preset", "presets", multiple=True,
              help="Preset whose model to evaluate; repeatable, each required "
                   "(default: those of evaluate.presets that have a model).")
@click.option("--no-mlflow", is_flag=True, help="Do not log figures to the training runs.")
@click.option("--extrapolation", is_flag=True,
              help="Instead: hold out the property's top materials, train each preset without "
                   "them, and report how many of them each model finds (recall, enrichment); "
                   "writes metrics/<property>.extrapolation.json (trains one model per preset).")
@pass_ctx
def evaluate(obj: Context, prop: str, presets: tuple[str, ...], no_mlflow: bool,
             extrapolation: bool) -> None:
    """Test-set metrics, parity and screening plots of a property's saved models."""
    from mpprop.bundle import BundleError
    from mpprop.data import SplitError
    from mpprop.presets import default_presets
    from mpprop.snapshot import SnapshotError
    from mpprop.stages.evaluate import EvaluationError, evaluate_property, format_results

    params = obj.params
    check_property(params, prop)
    if extrapolation:
        from mpprop.stages.extrapolation import evaluate_extrapolation

        try:
            out = evaluate_extrapolation(params, prop, list(presets) or default_presets(params))
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(json.dumps(out, indent=2))
        return
    try:
        results = evaluate_property(params, prop, list(presets) or None, not no_mlflow)
    except (EvaluationError, SplitError, SnapshotError, FileNotFoundError, BundleError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_results(prop, results))


@main.command()
@click.option("--no-mlflow", is_flag=True, help="Do not log the report to MLflow.")
@pass_ctx
def report(obj: Context, no_mlflow: bool) -> None:
    """Table 2 (test MAE, screening; Xie settings vs tuned) as markdown and CSV."""
    from mpprop.stages.report import ReportError, make_report

    try:
        markdown, files, run_id = make_report(obj.params, log_mlflow=not no_mlflow)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(markdown)
    click.echo("written: " + ", ".join(str(f) for f in files)
               + (f"; MLflow run {run_id}" if run_id else ""))


@main.command()
@click.option("--property", "prop", required=True, help="Property whose model to use.")
@click.option("--input", "inputs", multiple=True, required=True,
              type=click.Path(path_type=Path), help="As for `mpprop predict`; repeatable.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="X.npy (+ X.ids.txt) or X.parquet; refused where `predict --output` is, "
                   "an existing file only if `mpprop embed` wrote it.")
@click.option("--overwrite", is_flag=True,
              help="Replace existing files that `mpprop embed` did not write (inputs and "
                   "project folders stay refused).")
@click.option("--alias", default=None, help="Registry alias (default: mlflow.champion_alias).")
@click.option("--version", type=int, default=None, help="Registry version instead of an alias.")
@pass_ctx
def embed(obj: Context, prop: str, inputs: tuple[Path, ...], output: Path, overwrite: bool,
          alias: str | None, version: int | None) -> None:
    """Crystal feature vectors (the vector the model's output layer reads) of any input."""
    from mpprop.output_guard import OutputRefused, check_embedding_output
    from mpprop.stages.predict import PredictError, resolve_models, run_embedding

    params = obj.params
    check_property(params, prop)
    if alias and version is not None:
        raise click.UsageError("give --alias or --version, not both")
    try:
        check_embedding_output(params, list(inputs), output, overwrite)
    except OutputRefused as exc:
        raise RefusedError(str(exc)) from exc
    try:
        (model,) = resolve_models(params, prop, alias, version)
        summary = run_embedding(model, list(inputs), output, params.predict.batch_size,
                                limits=params.structure_limits())
    except PredictError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(summary.format())


@main.command("ui-url")
@click.option("--base", default="http://127.0.0.1:5000", show_default=True,
              help="Where `mlflow ui` serves (its --host and --port).")
@pass_ctx
def ui_url(obj: Context, base: str) -> None:
    """The MLflow UI link to this project's training runs (model-training view, best first)."""
    from mpprop.tracking import runs_table_url, setup_mlflow

    click.echo(runs_table_url(setup_mlflow(obj.params), base.rstrip("/")))


def _print_or_write(text: str, out: Path | None, what: str) -> None:
    """The show-* commands' output: printed, or written to --out with a line saying so."""
    if out is None:
        click.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    click.echo(f"{what} -> {out}")


@main.command("show-params")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write them to this file instead of printing them.")
@pass_ctx
def show_params(obj: Context, out: Path | None) -> None:
    """The params in effect: params.yaml with the -S overrides, validated, defaults filled in
    (e.g. to make the params.yaml of another DVC project, as run.sh does)."""
    import yaml

    text = yaml.safe_dump(obj.params.as_dict(), sort_keys=False, allow_unicode=True)
    _print_or_write(text, out, "params")


@main.command("show-pipeline")
@click.option("--source", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=Path("dvc.yaml"), show_default=True, help="The pipeline to start from.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write it to this file instead of printing it.")
@pass_ctx
def show_pipeline(obj: Context, source: Path, out: Path | None) -> None:
    """dvc.yaml for the params' properties: the top-level plots of the others left out (DVC
    has no foreach for them; run.sh's demo project uses this)."""
    from mpprop.pipeline_file import PipelineFileError, pipeline_for

    try:
        text = pipeline_for(source.read_text(), obj.params.properties)
    except PipelineFileError as exc:
        raise click.ClickException(f"{source}: {exc}") from exc
    _print_or_write(text, out, "pipeline")


def run() -> None:  # pragma: no cover
    sys.exit(main())
