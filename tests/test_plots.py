"""DVC plots: dvc.yaml's top-level plots draw what `mpprop evaluate` writes, one parity plot per
property and one screening curve per property with a screening direction, every preset in one
plot, in its own colour, named in the legend, with the y = x line and the property's unit (from
params.yaml) on both axes of the parity plot; and `dvc plots show` on a small project renders
them, into a page that needs no internet.

The definitions are checked statically against params.yaml and the evaluate stage's outputs,
then the real `dvc` runs on CSVs written by evaluate's own writers, and Vega renders its specs
to SVG (vl-convert, the Vega project's own renderer, no browser) to read what a person sees.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import REPO, headless_browser

from mpprop.config import load_params
from mpprop.paths import PARITY_CSV, SCREENING_CSV
from mpprop.pipeline_file import pipeline_for
from mpprop.stages.evaluate import (
    PresetEvaluation,
    curve_percents,
    screening_curve,
    write_parity_csv,
    write_screening_csv,
)

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PRESETS = PARAMS["evaluate"]["presets"]
PROPERTIES = PARAMS["properties"]
OFFLINE_SCRIPT = REPO / "scripts" / "dvc_plots_offline.py"
VENV_BIN = Path(sys.executable).parent
N_TEST = 50  # test materials per property in the small project (enough for a top-1% curve)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
TEMPLATES = {"parity": "mpprop_parity", "screening": "mpprop_screening"}
CATEGORY10 = ("#1f77b4", "#ff7f0e")  # the first two colours of the templates' scheme


def resolve(text: str, item: str | None = None) -> str:
    """`text` with DVC's ${a.b} interpolated from params.yaml (and ${item})."""

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key == "item":
            assert item is not None, text
            return item
        node: Any = PARAMS
        for part in key.split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def top_plots() -> dict[str, dict[str, Any]]:
    """The top-level plots by id (each list entry is {id: properties})."""
    defs: dict[str, dict[str, Any]] = {}
    for entry in DVC.get("plots", []):
        assert isinstance(entry, dict) and len(entry) == 1, entry
        (plot_id, props), = entry.items()
        assert plot_id not in defs, f"plot {plot_id!r} defined twice"
        defs[plot_id] = props
    return defs


def entry_paths(entries: list[Any], item: str | None) -> set[str]:
    return {resolve(e if isinstance(e, str) else next(iter(e)), item) for e in entries}


def evaluate_outputs(prop: str) -> set[str]:
    """Every file the evaluate stage of `prop` declares (outs, plots, metrics), resolved."""
    stage = DVC["stages"]["evaluate"]["do"]
    return set().union(*(entry_paths(stage.get(k, []), prop) for k in ("outs", "plots", "metrics")))


def data_file(prop: str, kind: str) -> str:
    name = {"parity": PARITY_CSV, "screening": SCREENING_CSV}[kind]
    return f"{PARAMS['evaluate']['plots_dir']}/{prop}/{name}"


def files_of(props: dict[str, Any]) -> dict[str, str]:
    """The plot's data files (resolved) and the y field each gives."""
    assert isinstance(props["y"], dict), "y maps file -> field"
    return {resolve(path): field for path, field in props["y"].items()}


def has_screening(prop: str) -> bool:
    return PARAMS["property_specs"][prop]["better"] is not None


def expected_ids() -> set[str]:
    return {f"{p} parity" for p in PROPERTIES} | {f"{p} screening" for p in PROPERTIES
                                                  if has_screening(p)}


def header(write, ev: PresetEvaluation, path: Path) -> list[str]:
    write(path, [ev])
    with path.open() as fh:
        return next(csv.reader(fh))


def evaluation(prop: str, preset: str, rng: np.random.Generator) -> PresetEvaluation:
    """A made-up preset evaluation of `prop` (the tuned one a little closer to the truth)."""
    y_true = rng.normal(size=N_TEST)
    noise = 0.2 if preset == PRESETS[-1] else 0.5
    y_pred = y_true + noise * rng.normal(size=N_TEST)
    better = PARAMS["property_specs"][prop]["better"]
    params = load_params(REPO / "params.yaml")
    return PresetEvaluation(
        preset=preset, material_ids=np.array([f"mp-{i}" for i in range(N_TEST)]),
        y_true=y_true, y_pred=y_pred, test_mae=float(np.mean(np.abs(y_pred - y_true))),
        test_screening_precision=None, best_val_mae=None, run_id=None,
        curve=screening_curve(y_true, y_pred, curve_percents(params), better),
        parent="mpprop-trunk@champion" if preset == "tuned" else None,
    )


# --- the definitions -------------------------------------------------------------------------


def test_one_parity_plot_per_property_with_mpprops_template() -> None:
    defs = top_plots()
    assert set(defs) == expected_ids()
    for prop in PROPERTIES:
        props = defs[f"{prop} parity"]
        files = files_of(props)
        # one file with every preset's rows: the template colours by its `model` column
        assert set(files) == {data_file(prop, "parity")}
        assert set(files.values()) == {"predicted"} and props["x"] == "true"
        assert props["template"] == TEMPLATES["parity"]
        assert set(files) <= evaluate_outputs(prop), "a plot of a file evaluate does not write"


def test_templates_are_in_the_repository() -> None:
    for name in TEMPLATES.values():
        spec = json.loads((REPO / ".dvc" / "plots" / f"{name}.json").read_text())
        assert spec["data"] == {"values": "<DVC_METRIC_DATA>"}


def test_parity_axes_carry_the_unit_from_params() -> None:
    defs = top_plots()
    for prop in PROPERTIES:
        props = defs[f"{prop} parity"]
        unit = PARAMS["property_specs"][prop]["unit"]
        for axis in ("x_label", "y_label"):
            # interpolated from params (one place for units), not typed into dvc.yaml
            assert f"${{property_specs.{prop}.unit}}" in props[axis], (prop, axis)
            assert resolve(props[axis]).endswith(f"{prop} ({unit})"), (prop, axis)


def test_screening_curves_only_where_the_property_has_a_direction() -> None:
    defs = top_plots()
    for prop in PROPERTIES:
        if not has_screening(prop):
            assert f"{prop} screening" not in defs
            continue
        props = defs[f"{prop} screening"]
        files = files_of(props)
        assert set(files) == {data_file(prop, "screening")}
        assert set(files.values()) == {"precision"} and props["x"] == "top_percent"
        assert props["template"] == TEMPLATES["screening"]
        assert set(files) <= evaluate_outputs(prop)
        assert "(%)" in props["x_label"] and "(%)" in props["y_label"]


def test_stage_plots_are_figures_only() -> None:
    # DVC draws every stage plot on its own, besides the top-level plots: a CSV there would be
    # drawn twice, with DVC's default template, and as an empty plot where there is no
    # screening curve
    for name, stage in DVC["stages"].items():
        body = stage.get("do", stage)
        for path in entry_paths(body.get("plots", []), "P"):
            assert path.endswith(IMAGE_SUFFIXES), f"stage {name} plots data file {path}"


def test_plot_fields_are_the_columns_evaluate_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    columns = {
        "parity": header(write_parity_csv, evaluation("band_gap", "xie", rng), tmp_path / "p.csv"),
        "screening": header(write_screening_csv, evaluation("band_gap", "xie", rng),
                            tmp_path / "s.csv"),
    }
    for plot_id, props in top_plots().items():
        kind = plot_id.rsplit(" ", 1)[1]
        assert props["x"] in columns[kind], plot_id
        assert set(files_of(props).values()) <= set(columns[kind]), plot_id


# --- `dvc plots show` on a small project -------------------------------------------------------


def dvc(*args: str, cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def plots_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dvc.yaml and params.yaml of the repo, and the evaluate stage's plot files of every
    property as `mpprop evaluate` writes them (figures as placeholders)."""
    root = tmp_path_factory.mktemp("plots")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    dvc("init", "--no-scm", "-q", cwd=root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    rng = np.random.default_rng(0)
    for prop in PROPERTIES:
        evaluations = [evaluation(prop, preset, rng) for preset in PRESETS]
        (root / data_file(prop, "parity")).parent.mkdir(parents=True, exist_ok=True)
        write_parity_csv(root / data_file(prop, "parity"), evaluations)
        write_screening_csv(root / data_file(prop, "screening"), evaluations)
        for path in evaluate_outputs(prop):
            if path.endswith(IMAGE_SUFFIXES):
                (root / path).write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


def svg_texts(spec: dict[str, Any]) -> tuple[set[str], str]:
    """The texts and the SVG of a Vega-Lite spec as Vega draws it."""
    import vl_convert

    svg = vl_convert.vegalite_to_svg(spec)
    return set(re.findall(r"<text[^>]*>([^<]*)</text>", svg)), svg


def test_dvc_plots_show_overlays_presets_with_units(plots_project: Path) -> None:
    shown = json.loads(dvc("plots", "show", "--json", cwd=plots_project))
    assert not shown.get("errors"), shown.get("errors")
    data = shown["data"]
    vega = {k for k, v in data.items() if v[0]["type"] == "vega"}
    assert vega == expected_ids()  # no plot per CSV, none of Poisson's ratio's empty curve
    labels = {"Xie preset", "tuned preset, fine-tuned"}
    for plot_id in vega:
        prop, kind = plot_id.split()
        spec = data[plot_id][0]["content"]
        rows = spec["data"]["values"]
        assert {r["model"] for r in rows} == labels, plot_id
        texts, svg = svg_texts(spec)
        # each model in the legend, in its own colour
        assert labels <= texts, (plot_id, texts)
        assert all(colour in svg for colour in CATEGORY10), plot_id
        if kind == "parity":
            unit = PARAMS["property_specs"][prop]["unit"]
            assert {f"DFT {prop} ({unit})", f"predicted {prop} ({unit})", "y = x"} <= texts
        else:
            assert {"screening precision (%)"} <= texts


def test_show_pipeline_keeps_only_the_params_properties(tmp_path: Path) -> None:
    text = pipeline_for((REPO / "dvc.yaml").read_text(), ["bulk_modulus", "poisson_ratio"])
    kept = {next(iter(p)) for p in yaml.safe_load(text)["plots"]}
    assert kept == {"bulk_modulus parity", "bulk_modulus screening", "poisson_ratio parity"}
    assert yaml.safe_load(text)["stages"] == DVC["stages"]  # the stages untouched
    assert "# The evaluate stage's CSVs as plots" in text  # comments kept
    project = tmp_path / "demo"
    project.mkdir()
    (project / "dvc.yaml").write_text(text)
    props = ["bulk_modulus", "poisson_ratio"]
    (project / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "properties": props}))
    dvc("init", "--no-scm", "-q", cwd=project)
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots", dirs_exist_ok=True)
    rng = np.random.default_rng(1)
    for prop in props:
        evaluations = [evaluation(prop, preset, rng) for preset in PRESETS]
        (project / data_file(prop, "parity")).parent.mkdir(parents=True)
        write_parity_csv(project / data_file(prop, "parity"), evaluations)
        write_screening_csv(project / data_file(prop, "screening"), evaluations)
        for path in evaluate_outputs(prop):
            if path.endswith(IMAGE_SUFFIXES):
                (project / path).write_bytes(b"\x89PNG\r\n\x1a\n")
    shown = json.loads(dvc("plots", "show", "--json", cwd=project))
    # the full dvc.yaml here would report five properties' plots as failed to load
    assert not shown.get("errors"), shown.get("errors")
    assert {k for k, v in shown["data"].items() if v[0]["type"] == "vega"} == kept


def test_offline_page(plots_project: Path, tmp_path: Path) -> None:
    template = tmp_path / "page.html"
    subprocess.run([sys.executable, str(OFFLINE_SCRIPT), "--out", str(template), "--configure",
                    "--project", str(plots_project)], check=True, capture_output=True)
    # plain `dvc plots show` uses it (.dvc/config.local), with the libraries inline
    dvc("plots", "show", "-o", "page", cwd=plots_project)
    html = (plots_project / "page" / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html), "the page loads a script from elsewhere"
    assert "window.vegaEmbed=" in html.replace(" ", "")
    assert html.count("vegaEmbed('#") == len(expected_ids())
    assert "DFT band_gap (eV)" in html and "tuned preset, fine-tuned" in html

    # in a real browser with the network off: every plot drawn, nothing fetched from elsewhere
    with headless_browser() as browser:
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 900})
        page = context.new_page()
        requests: list[str] = []
        errors: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((plots_project / "page" / "index.html").as_uri())
        drawn = page.locator(".vega-embed canvas, .vega-embed svg.marks")
        drawn.nth(len(expected_ids()) - 1).wait_for(timeout=60_000)
        assert drawn.count() == len(expected_ids())
        assert not errors, errors
        assert all(url.startswith(("file:", "data:", "blob:")) for url in requests), requests
        page.screenshot(path=str(tmp_path / "plots.png"), full_page=True)
        context.close()
