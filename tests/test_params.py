"""params.yaml is validated when it is loaded: every section, unknown keys, types, ranges and
the rules between keys; a bad file ends a command with exit code 2 and a one-line message."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mpprop.cli import main
from mpprop.config import load_params
from mpprop.params_schema import ParamsSchema, TrainSection
from mpprop.presets import hyperparams
from mpprop.settings import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(folder: Path, change=None) -> Path:
    """The repo's params.yaml, changed by `change(raw)`, written into `folder`."""
    raw = copy.deepcopy(SHIPPED)
    if change:
        change(raw)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def error_of(folder: Path, change=None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(write_params(folder, change), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def contains(big: Any, small: Any) -> bool:
    """Every key and value of `small` is in `big` (with the same type)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
    return type(big) is type(small) and big == small


def test_shipped_params_load_unchanged():
    params = load_params(REPO / "params.yaml")
    assert contains(params.as_dict(), SHIPPED)  # nothing the file says is lost or retyped
    # typed after loading: each section is its model, read by attribute
    assert isinstance(params.schema, ParamsSchema) and isinstance(params.train, TrainSection)
    assert params.train.batch_size == SHIPPED["train"]["batch_size"]
    assert params.graph_settings().radius == SHIPPED["graph"]["radius"]
    xie = hyperparams(params, "xie", params.properties[0])
    assert xie.optimizer == SHIPPED["presets"]["xie"]["optimizer"]
    assert set(params.property_specs()) >= set(params.properties)


def test_defaults_are_filled_in_and_overridable(tmp_path):
    def drop(raw):
        del raw["train"]["torch_threads"], raw["tune"]["enqueue"], raw["data"]["mp_api"]

    path = write_params(tmp_path, drop)
    params = load_params(path)
    assert params.train.torch_threads is None and params.tune.enqueue == []
    assert params.data.mp_api.chunk_size == 1000
    # -S may set a key the file leaves to its default
    assert load_params(path, ["train.torch_threads=2"]).train.torch_threads == 2


def test_numbers_keep_their_type(tmp_path):
    def change(raw):
        raw["graph"]["radius"] = 8  # a float setting given as an integer
        raw["train"]["screening_top_percent"] = 3

    params = load_params(write_params(tmp_path, change))
    assert params.graph_settings().key() == load_params(REPO / "params.yaml").graph_settings().key()
    assert params.train.screening_top_percent == 3
    assert type(params.train.screening_top_percent) is int  # "top 3%", not "top 3.0%"
    # a range is dumped as written (a default step would change how Optuna samples)
    dumped = params.as_dict()["tune"]["search_space"]["n_conv"]
    assert dumped == SHIPPED["tune"]["search_space"]["n_conv"]


def _set(dotted: str, value: Any):
    def change(raw):
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return change


DELETE = object()

BAD = [
    # (dotted key, value, the key named in the message, words in the message)
    ("grpah", {"radius": 8.0}, "grpah", "unknown key"),
    ("graph.radus", 3, "graph.radus", "unknown key"),
    ("train.torch_thread", 1, "train.torch_thread", "unknown key"),
    ("data.mp_api.chunksize", 10, "data.mp_api.chunksize", "unknown key"),
    ("graph.radius", DELETE, "graph.radius", "missing"),
    ("graph.radius", "8", "graph.radius", "must be a number (got '8')"),
    ("train.batch_size", "64", "train.batch_size", "must be an integer"),
    ("train.batch_size", 64.0, "train.batch_size", "must be an integer"),
    ("graph.gaussian_step", 0, "graph.gaussian_step", "must be > 0 (got 0)"),
    ("graph.gaussian_width", -0.1, "graph.gaussian_width", "must be > 0"),
    ("graph.max_neighbors", 0, "graph.max_neighbors", "must be >= 1 (got 0)"),
    ("graph.radius", -1, "graph.radius", "must be > 0 (got -1)"),
    ("graph.first_search_radius", 9.0, "graph.first_search_radius", "<= graph.radius"),
    ("graph.gaussian_dmin", 8.0, "graph.gaussian_dmin", "< graph.radius"),
    ("split.test_fraction", 1.0, "split.test_fraction", "must be < 1"),
    ("split.val_fraction", 0, "split.val_fraction", "must be > 0"),
    ("train.torch_threads", 0, "train.torch_threads", "must be >= 1"),
    ("train.screening_top_percent", 101, "train.screening_top_percent", "<= 100"),
    ("predict.batch_size", 0, "predict.batch_size", ">= 1"),
    ("predict.xie_band_gap_metal_gate", "yes", "predict.xie_band_gap_metal_gate",
     "must be true or false"),
    ("property_specs.band_gap.transform", "ln", "property_specs.band_gap.transform", "'log10'"),
    ("property_specs.band_gap.better", "up", "property_specs.band_gap.better", "'higher'"),
    ("properties", [*SHIPPED["properties"], "density"], f"properties[{len(SHIPPED['properties'])}]",
     "no entry in property_specs"),
    ("presets.xie.optimizer", "LBFGS", "presets.xie.optimizer", "'SGD', 'RAdam', 'Adam' or 'AdamW'"),
    ("presets.xie.lr", 0, "presets.xie.lr", "must be > 0"),
    ("presets.xie.n_conv", 0, "presets.xie.n_conv", ">= 1"),
    ("presets.tuned", SHIPPED["presets"]["xie"], "presets.tuned", "reserved"),
    ("tune.search_space.n_conv", {"low": 5, "high": 1}, "tune.search_space.n_conv.low", "<= high"),
    ("tune.search_space.n_conv", {"low": 1, "hig": 5}, "tune.search_space.n_conv.hig", "unknown key"),
    ("tune.search_space.n_conv", [], "tune.search_space.n_conv", "must not be empty"),
    ("tune.search_space.n_conv", 3, "tune.search_space.n_conv", "list of choices"),
    ("tune.search_space.epochs", [10, 20], "tune.search_space.epochs", "not a searchable"),
    ("tune.enqueue", {"n_conv": 4}, "tune.enqueue", "must be a list"),
    ("tune.n_trials", 0, "tune.n_trials", ">= 1"),
    ("tune.epochs", 0, "tune.epochs", ">= 1"),
    ("tune.pruner_percentile", 101, "tune.pruner_percentile", "<= 100"),
    ("tune.pruner_warmup_steps", -1, "tune.pruner_warmup_steps", ">= 0"),
    ("tune.heartbeat_interval", 0, "tune.heartbeat_interval", ">= 1"),
    ("tune.grace_period", SHIPPED["tune"]["heartbeat_interval"], "tune.grace_period",
     "> tune.heartbeat_interval"),
    ("tune.failed_trial_max_retry", -1, "tune.failed_trial_max_retry", ">= 0"),
    ("evaluate.curve_min_percent", 30, "evaluate.curve_min_percent", "<= evaluate.curve_max_percent"),
    ("evaluate.curve_max_percent", 120, "evaluate.curve_max_percent", "<= 100"),
    ("evaluate.curve_step_percent", 0, "evaluate.curve_step_percent", "> 0"),
    ("evaluate.presets", ["xie", "nope"], "evaluate.presets[1]", "not a preset"),
    ("data.source", "web", "data.source", "'mp-api'"),
    ("data.max_records", 0, "data.max_records", ">= 1"),
]


@pytest.mark.parametrize(("dotted", "value", "key", "words"), BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD])
def test_bad_params_name_the_key(tmp_path, dotted, value, key, words):
    message = error_of(tmp_path, _set(dotted, value))
    source = f"{tmp_path / 'params.yaml'}: "
    assert message.startswith(source), message
    problems = message.removeprefix(source).split("; ")
    assert any(p.startswith(f"{key}: ") and words in p for p in problems), message


def test_several_problems_on_one_line(tmp_path):
    def change(raw):
        raw["graph"]["radus"] = 3
        raw["train"]["batch_size"] = 0

    message = error_of(tmp_path, change)
    assert "graph.radus: unknown key" in message and "train.batch_size: must be >= 1" in message
    assert message.count("; ") == 1


def test_overrides_are_validated_and_named(tmp_path):
    message = error_of(tmp_path, overrides=["graph.radus=3"])
    assert "graph.radus: unknown key (set by -S graph.radus=3)" in message
    message = error_of(tmp_path, overrides=["graph.gaussian_step=0"])
    assert "graph.gaussian_step: must be > 0 (got 0)" in message


def test_unreadable_files_are_config_errors(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("graph: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(path)


def test_cli_bad_params_exit_2_before_any_work(tmp_path, monkeypatch):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["-S", "graph.radus=3", "featurize"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: params.yaml: graph.radus: unknown key"), lines
    assert "Usage" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_builtin_defaults_are_the_shipped_params() -> None:
    """Outside a project folder mpprop uses a packaged copy of params.yaml: keep it equal."""
    from mpprop.config import BUILTIN_PARAMS

    assert BUILTIN_PARAMS.read_text() == (REPO / "params.yaml").read_text(), (
        "src/mpprop/defaults.yaml differs from params.yaml: cp params.yaml src/mpprop/defaults.yaml"
    )
