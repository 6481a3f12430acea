"""`mpprop train --init-from`: fine-tuning from a registered model, a bundle file or a
published checkpoint on real MP records; lineage on the run and the registry version;
one-line errors for references that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import run_cli, shared_record_lines, small_project
from mlflow.tracking import MlflowClient

from mpprop.bundle import load_bundle
from mpprop.config import load_params
from mpprop.model import trunk_state
from mpprop.presets import tuning_parent
from mpprop.registry import TAG_PARENT_NAME, TAG_PARENT_RUN_ID, TAG_PARENT_VERSION

PROP = "bulk_modulus"
N_RECORDS = 60
pytestmark = pytest.mark.e2e  # real MP records from ../shared/data


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return small_project(tmp_path_factory.mktemp("finetune"), shared_record_lines(PROP, N_RECORDS),
                         PROP)


cli = run_cli


def metrics_of(output: str) -> dict:
    return json.JSONDecoder().raw_decode(output[output.index("{"):])[0]


def test_fine_tuning_from_the_registry_records_the_parent(project):
    parent = metrics_of(cli(project, "train", "--property", PROP, "--epochs", "2"))
    cli(project, "promote", "--property", PROP)
    parent_trunk = trunk_state(load_bundle(project / f"models/{PROP}/xie/model.pt")[0].state_dict())

    child = metrics_of(cli(project, "train", "--property", PROP, "--preset", "xie",
                           "--epochs", "2", "--init-from", f"mpprop-{PROP}@champion",
                           "--freeze-trunk-epochs", "2"))
    # frozen for both epochs: the child's trunk is the parent's, its head is its own
    child_state = load_bundle(project / f"models/{PROP}/xie/model.pt")[0].state_dict()
    for key, value in parent_trunk.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(child_state[key], value), key
    assert not torch.equal(child_state["fc_out.weight"],
                           load_bundle_fc_out(project, parent["run_id"]))

    mlflow.set_tracking_uri(load_params(project / "params.yaml").tracking_uri())
    client = MlflowClient()
    tags = client.get_run(child["run_id"]).data.tags
    assert tags[TAG_PARENT_NAME] == f"mpprop-{PROP}"
    assert tags[TAG_PARENT_VERSION] == "1"
    assert tags[TAG_PARENT_RUN_ID] == parent["run_id"]
    assert client.get_run(child["run_id"]).data.params["init_from"] == f"mpprop-{PROP} v1"

    # the registry version of a fine-tuned model names its parent too
    from mpprop.stages.promote import find_candidates

    snapshot = tags["snapshot_sha256"]
    lineage = {c.run_id: c.lineage for c in find_candidates(client, PROP, snapshot)}
    assert lineage[child["run_id"]][TAG_PARENT_RUN_ID] == parent["run_id"]
    assert lineage[parent["run_id"]] == {}


def load_bundle_fc_out(project: Path, run_id: str) -> torch.Tensor:
    from mpprop.tracking import download_bundle

    mlflow.set_tracking_uri(load_params(project / "params.yaml").tracking_uri())
    model_id = next(m.model_id for m in mlflow.search_logged_models(output_format="list")
                    if m.source_run_id == run_id)
    path = download_bundle(f"models:/{model_id}", project / "dl")
    return load_bundle(path)[0].state_dict()["fc_out.weight"]


def test_references_that_do_not_fit_are_one_line_errors(project):
    # the published bulk-modulus checkpoint is the Xie architecture: it loads
    cli(project, "train", "--property", PROP, "--epochs", "1", "--init-from",
        "published:bulk_modulus")
    # another architecture: names both shapes
    out = cli(project, "train", "--property", PROP, "--epochs", "1", "--n-conv", "2",
              "--init-from", "published:bulk_modulus", ok=False)
    assert "n_conv=4, atom_fea_len=64" in out and "n_conv=2" in out
    assert "Traceback" not in out
    # other graph settings: names the setting
    out = cli(project, "-S", "graph.max_neighbors=8", "train", "--property", PROP, "--epochs",
              "1", "--init-from", "published:bulk_modulus", ok=False)
    assert "max_neighbors 12 (parent) vs 8" in out
    for ref, message in (("no-such-model@champion", "no-such-model"),
                         ("published:density", "no published checkpoint for 'density'"),
                         ("nothing-here.pt", "not a file, and not a registered model")):
        out = cli(project, "train", "--property", PROP, "--epochs", "1", "--init-from", ref,
                  ok=False)
        assert message in out, out
        assert len(out.strip().splitlines()) == 1, out


def test_tuning_with_a_parent_searches_the_fine_tuning_settings(project):
    out = cli(project, "-S", "train.init_from=published:bulk_modulus",
              "-S", "tune.search_space.trunk_lr_scale=[0.1, 0.5]",
              "-S", "tune.search_space.freeze_trunk_epochs={low: 0, high: 1}",
              "-S", "tune.pruner_warmup_steps=5",
              "tune", "--property", PROP, "--n-trials", "2", "--epochs", "1",
              "--study-name", "ft-study")
    assert "trial" in out
    tuned = yaml.safe_load((project / f"tuned/{PROP}.yaml").read_text())
    # the published trunk is the Xie architecture: it wins over what the sampler drew
    assert tuned["hyperparams"]["n_conv"] == 4 and tuned["hyperparams"]["atom_fea_len"] == 64
    ft = tuned["fine_tuning"]
    assert ft["init_from"] == "published:bulk_modulus"
    assert ft["trunk_lr_scale"] in (0.1, 0.5) and ft["freeze_trunk_epochs"] in (0, 1)
    # train --preset tuned starts from the same parent with the tuned settings
    child = metrics_of(cli(project, "train", "--property", PROP, "--preset", "tuned",
                           "--epochs", "1"))
    mlflow.set_tracking_uri(load_params(project / "params.yaml").tracking_uri())
    run = MlflowClient().get_run(child["run_id"])
    assert run.data.params["init_from"] == "published:bulk_modulus"
    assert float(run.data.params["trunk_lr_scale"]) == ft["trunk_lr_scale"]


def test_pretrained_trunk_never_sees_any_property_test_material(project):
    # formation energy is labelled on 46 of the 60 records: its test set differs from the
    # elastic one, so the trunk's pool loses materials to it
    sets = ["-S", "properties=[formation_energy_per_atom, shear_modulus]",
            "-S", "pretrain.enabled=true",
            "-S", "pretrain.property=shear_modulus", "-S", "pretrain.preset=xie",
            "-S", "pretrain.epochs=2"]
    cli(project, *sets, "split")
    metrics = metrics_of(cli(project, *sets, "pretrain"))
    splits = {p: json.loads((project / f"data/splits/{p}.json").read_text())
              for p in ("formation_energy_per_atom", "shear_modulus")}
    every_test = set().union(*(set(s["test"]) for s in splits.values()))
    seen = json.loads((project / "models/trunk/materials.json").read_text())
    used = set(seen["train"]) | set(seen["val"])
    assert used and not used & every_test
    # everything else of the trunk property's pool is used
    assert used == set(splits["shear_modulus"]["pool"]) - every_test
    assert metrics["n_excluded_test_materials"] == len(
        set(splits["shear_modulus"]["pool"]) & every_test) > 0
    assert metrics["registered"] == "mpprop-trunk v1"
    # the pipeline's tuned models fine-tune it
    params = load_params(project / "params.yaml", [s for s in sets if s != "-S"])
    assert tuning_parent(params) == str(project / "models/trunk/model.pt")
    mlflow.set_tracking_uri(params.tracking_uri())
    mv = MlflowClient().get_model_version_by_alias("mpprop-trunk", "champion")
    assert mv.tags["property"] == "shear_modulus"

    # off (the default): a stub that says so, nothing trained
    out = metrics_of(cli(project, "pretrain"))
    assert out == {"enabled": False}
    assert not (project / "models/trunk/model.pt").exists()


def test_shipped_models_register_at_their_alias_and_predict(project, tmp_path):
    from mpprop.shipped import ShippedModelError, add_to_index, shipped_models
    from mpprop.stages.import_models import import_shipped

    if not (project / f"models/{PROP}/xie/model.pt").exists():
        cli(project, "train", "--property", PROP, "--epochs", "1")
    folder = tmp_path / "shipped"
    add_to_index(folder, PROP, project / f"models/{PROP}/xie/model.pt",
                 "# bulk modulus\nlog10 GPa; test MAE 0.1 [0.09, 0.11]\n",
                 {"test_mae": 0.1, "data": "60 MP records"})
    params = load_params(project / "params.yaml")
    first = import_shipped(params, folder=folder)
    assert [(r.name, r.alias, r.status) for r in first] == [
        (f"mpprop-{PROP}", "mpprop-2026", "registered")]
    mlflow.set_tracking_uri(params.tracking_uri())
    mv = MlflowClient().get_model_version_by_alias(f"mpprop-{PROP}", "mpprop-2026")
    assert mv.description.startswith("# bulk modulus")
    assert mv.tags["test_mae"] == "0.1" and mv.tags["checkpoint_sha256"] == first[0].checkpoint_sha256
    # idempotent: the same file is not registered twice
    again = import_shipped(params, folder=folder)
    assert again[0].status == "already registered" and again[0].version == first[0].version
    # it predicts by its alias
    structures = project / "in"
    structures.mkdir()
    (structures / "nacl.cif").write_text(NACL_CIF)
    cli(project, "predict", "--property", PROP, "--alias", "mpprop-2026", "--input",
        str(structures), "--output", str(tmp_path / "out.csv"))
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert len(rows) == 2 and "mpprop-2026" in rows[1]
    # a tampered file is refused with the property named
    (folder / f"{PROP}.pt").write_bytes((folder / f"{PROP}.pt").read_bytes() + b"x")
    with pytest.raises(ShippedModelError, match=f"shipped model of {PROP}.*SHA-256"):
        shipped_models(folder)


NACL_CIF = """data_NaCl
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Na1 Na 0 0 0
Na2 Na 0 0.5 0.5
Na3 Na 0.5 0 0.5
Na4 Na 0.5 0.5 0
Cl1 Cl 0.5 0 0
Cl2 Cl 0 0.5 0
Cl3 Cl 0 0 0.5
Cl4 Cl 0.5 0.5 0.5
"""


def test_ui_url_opens_the_training_runs_in_the_model_training_view(project):
    from urllib.parse import parse_qs, urlsplit

    url = cli(project, "ui-url").strip().splitlines()[-1]  # after MLflow's log lines
    mlflow.set_tracking_uri(load_params(project / "params.yaml").tracking_uri())
    exp = MlflowClient().get_experiment_by_name("mpprop")
    route, _, query = urlsplit(url).fragment.partition("?")
    assert url.startswith("http://127.0.0.1:5000/#/")
    assert route == f"/experiments/{exp.experiment_id}/runs"
    q = parse_qs(query)
    assert q["workflowType"] == ["machine_learning"]  # not MLflow 3's default GenAI view
    # the runs table's state is the experiment's shared view that the link names
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{q['viewStateShareKey'][0]}"])
    assert view["searchFilter"] == "tags.`mpprop.kind` = 'train'"
    assert view["orderByKey"] == "metrics.`test_mae`" and view["orderByAsc"] is True
    assert {"metrics.`test_mae`", "metrics.`best_val_mae`", "tags.`mpprop.preset`"} <= set(
        view["selectedColumns"])
    # any search parameter in the URL would make the UI ignore the shared view
    assert set(q) == {"workflowType", "viewStateShareKey"}
