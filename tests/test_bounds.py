"""Bounds on what can exhaust the machine, refused in one line before any work; a run that learns
nothing (frozen) said so; an option the chosen method ignores refused."""

import pytest

from cli.main import main
from fedhpo_core.search.study import MAX_CONFIGS
from fedhpo_core.settings import (
    MAX_COMPRESSION_BUCKET,
    MAX_FINETUNE_STEPS,
    MAX_LOCAL_EPOCHS,
    MAX_TAU,
    max_processes,
)

# digits, 10 iid clients: 1797 images less the server's 10% and each client's 10% leave 117 at most.
LARGEST_DIGITS_CLIENT = 117

REFUSED = {
    "batch larger than any client": (
        "train",
        ["--batch-size", "5000"],
        f"batch_size 5000 exceeds the largest client's {LARGEST_DIGITS_CLIENT} training samples (digits, 10 clients)",
    ),
    "local epochs": (
        "train",
        ["--local-epochs", "1000000000"],
        f"local_epochs must be in [1, {MAX_LOCAL_EPOCHS}], got 1000000000",
    ),
    "finetune steps": (
        "train",
        ["--finetune-steps", str(MAX_FINETUNE_STEPS + 1)],
        f"finetune_steps must be in [0, {MAX_FINETUNE_STEPS}], got {MAX_FINETUNE_STEPS + 1}",
    ),
    "compression bucket": (
        "train",
        ["--compression", "qsgd", "--compression-bucket", str(10**12)],
        f"compression_bucket must be <= {MAX_COMPRESSION_BUCKET}, got {10**12}",
    ),
    "dask workers": (
        "train",
        ["--task-runner", "dask", "--dask-workers", "1000"],
        f"dask_workers must be <= {max_processes()} (2 per CPU of this machine), got 1000",
    ),
    "tau that freezes fedadam": (
        "train",
        ["--aggregator", "fedadam", "--tau", "1e308"],
        f"tau must be in (0, {MAX_TAU:g}], got 1e+308",
    ),
    "tuned batch larger than any client": (
        "tune",
        ["--batch-size", "5000"],
        f"batch_size 5000 exceeds the largest client's {LARGEST_DIGITS_CLIENT} training samples",
    ),
    "trial threads": ("tune", ["--method", "random", "--workers", "1000"], f"workers must be <= {max_processes()}"),
    "configurations": (
        "tune",
        ["--n-configs", str(MAX_CONFIGS + 1), "--budget", str(10 * MAX_CONFIGS)],
        f"n_configs must be in [1, {MAX_CONFIGS}]",
    ),
    "checkpoints of a trial-level method": (
        "tune",
        ["--method", "tpe", "--checkpoint-every", "5"],
        "--checkpoint-every 5: tpe is trial-level and checkpoints no run",
    ),
    "a scope a round-level method ignores": (
        "tune",
        ["--method", "fedex", "--scope", "personalized"],
        "--scope personalized: fedex is round-level",
    ),
}


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """A scratch working folder, MLflow store and Prefect home: a refusal must leave the folder empty."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(folder / "prefect"))
    return folder


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_setting_past_its_bound_is_refused_in_one_line(case, stores, capsys):
    command, flags, message = REFUSED[case]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"fedhpo {command}: error: ") and message in error, error
    assert list(stores.iterdir()) == []


def test_settings_at_their_bounds_are_accepted():
    from fedhpo_core.search.study import TuneSettings
    from fedhpo_core.settings import ExecutionSettings, TrainSettings
    from fedhpo_core.task import prepared

    TrainSettings(local_epochs=MAX_LOCAL_EPOCHS, finetune_steps=MAX_FINETUNE_STEPS, tau=MAX_TAU)
    ExecutionSettings("dask", dask_workers=max_processes())
    TuneSettings(method="random", workers=max_processes(), n_configs=MAX_CONFIGS, budget=MAX_CONFIGS)
    TuneSettings(method="fedex", checkpoint_every=5)  # a round-level method checkpoints its run
    TuneSettings(method="tpe", scope="personalized")  # a trial-level method tunes each client's settings
    assert prepared(TrainSettings(batch_size=LARGEST_DIGITS_CLIENT)).batch_size == LARGEST_DIGITS_CLIENT


def last_run(client, experiment: str):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]


def models_of(run) -> list:
    import mlflow

    where = f"source_run_id = '{run.info.run_id}'"
    return mlflow.search_logged_models([run.info.experiment_id], filter_string=where, output_format="list")


@pytest.mark.usefixtures("prefect_server")
def test_a_run_whose_model_never_changes_is_reported_frozen(stores, capsys, mlflow_client):
    # One process, one capture: Prefect's console handler keeps the stream of the test that configured it.
    # FedAdam's step, server_lr * m / (sqrt(v) + tau), is ~1e-40 here: below float32's resolution of any weight.
    frozen = ["--clients", "3", "--rounds", "2", "--aggregator", "fedadam", "--server-lr", "1e-40"]
    assert main(["train", *frozen, "--experiment", "frozen"]) == 0
    out = capsys.readouterr().out
    assert "Frozen: none of 2 rounds changed the global model" in out and "Trained" not in out
    run = last_run(mlflow_client, "frozen")
    assert run.data.tags["fedhpo.frozen"] == "true" and run.data.metrics["frozen"] == 1.0
    assert models_of(run) == []  # no model of a run that learned nothing

    assert main(["train", "--clients", "3", "--rounds", "1", "--experiment", "learns"]) == 0
    assert "Trained 1 rounds" in capsys.readouterr().out
    run = last_run(mlflow_client, "learns")
    assert run.data.tags["fedhpo.frozen"] == "false" and run.data.metrics["frozen"] == 0.0
    assert len(models_of(run)) == 1


def test_a_final_run_that_freezes_says_so_and_logs_no_model(mlflow_client):
    from fedhpo_core.data import load_dataset
    from fedhpo_core.federation import FederatedData, RoundSteps, partition_of
    from fedhpo_core.search.space import Configuration
    from fedhpo_core.settings import TrainSettings
    from fedhpo_core.tracking import Tracker
    from fedhpo_core.trial import retrain, train_configuration

    fixed = TrainSettings(clients=3, aggregator="fedadam", server_lr=1e-40, experiment="frozen-final")
    data = FederatedData.build(load_dataset("digits", fixed.data_root), partition_of(fixed.data), fixed.model)
    configuration = Configuration({"lr": 0.05})
    with Tracker(fixed.experiment, "study") as study:
        final = retrain(data, fixed, configuration, 2, study, RoundSteps())
    assert final.result.frozen and final.model_uri is None
    run = mlflow_client.get_run(final.run_id)
    assert (
        run.data.tags["fedhpo.frozen"] == "true" and "frozen: no round changed" in run.data.tags["mlflow.note.content"]
    )
    # A round at a time (as trials train), the same: frozen while no round changed the weights.
    learning = TrainSettings(clients=3, experiment="frozen-final")
    for settings, frozen in ((fixed, True), (learning, False)):
        with Tracker(settings.experiment, "trial") as tracker:
            result, _, _ = train_configuration(
                data, settings, configuration, 2, tracker, RoundSteps(), keep_going=lambda _: True
            )
        assert len(result.evaluations) == 2 and result.frozen is frozen
