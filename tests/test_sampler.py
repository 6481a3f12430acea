"""`tune.sampler`: TPE (the paper's) or Optuna's GPSampler, both reseeded per trial."""

from __future__ import annotations

import optuna
import pytest
from optuna.samplers import GPSampler, TPESampler

from mpprop.config import load_params
from mpprop.search import TrialSeededSampler
from mpprop.settings import ConfigError


def _study(kind: str, n: int = 12) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=TrialSeededSampler(7, kind=kind))
    study.optimize(lambda t: (t.suggest_float("x", -3, 3) - 1.0) ** 2
                   + 0.1 * t.suggest_categorical("n_conv", [1, 2, 3]), n_trials=n)
    return study


@pytest.mark.parametrize(("kind", "cls"), [("tpe", TPESampler), ("gp", GPSampler)])
def test_sampler_kind_is_used_and_reproducible(kind, cls):
    first, again = _study(kind), _study(kind)
    assert isinstance(first.sampler._tpe, cls)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    # on a smooth 1-d bowl, 12 trials get within 0.3 of the minimum at x = 1
    assert abs(first.best_params["x"] - 1.0) < 0.3


def test_gp_and_tpe_differ_after_the_start_up_trials():
    gp, tpe = _study("gp"), _study("tpe")
    assert [t.params for t in gp.trials] != [t.params for t in tpe.trials]


def test_sampler_key_is_validated(tmp_path):
    from conftest import REPO

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert load_params(tmp_path / "params.yaml").tune.sampler == "tpe"
    with pytest.raises(ConfigError, match="tune.sampler"):
        load_params(tmp_path / "params.yaml", ["tune.sampler=cmaes"])


def test_percentile_pruner_waits_for_the_configured_trials(tmp_path):
    """A 5-trial study with Optuna's 5 start-up trials never prunes: the count is a param."""
    from conftest import REPO

    from mpprop.search import make_pruner

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())

    def pruned_after(startup: int) -> list[bool]:
        params = load_params(tmp_path / "params.yaml",
                             [f"tune.pruner_startup_trials={startup}", "tune.pruner_warmup_steps=0"])
        study = optuna.create_study(pruner=make_pruner(params, epochs=3))
        for value in (1.0, 1.1):  # two completed trials, good ones
            t = study.ask()
            t.report(value, 1)
            study.tell(t, value)
        bad = study.ask()
        bad.report(9.0, 1)
        return bool(bad.should_prune())

    assert pruned_after(2) is True
    assert pruned_after(5) is False  # Optuna's default: not enough completed trials yet
