"""The launcher and sweeper presets compose (the `sweep` extra installs their plugins)."""

import pytest
from hydra import compose, initialize_config_module


def compose_hydra(overrides):
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "override,target",
    [
        ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("hydra/launcher=submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("hydra/launcher=submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ],
)
def test_launcher_presets_compose(override, target):
    cfg = compose_hydra([override])
    assert cfg.hydra.launcher._target_ == target


def test_optuna_search_preset_composes():
    cfg = compose_hydra(["hydra/sweeper=kd_search", "hydra.sweeper.n_trials=3"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.n_trials == 3
    assert sweeper.params["distill.temperature"] == "interval(1.0, 10.0)"


def test_sweep_summary_callback_is_registered():
    cfg = compose_hydra([])
    assert cfg.hydra.callbacks.sweep_summary._target_ == "distill_runner.sweep.SweepSummary"
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/")
