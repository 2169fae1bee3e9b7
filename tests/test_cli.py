"""Bad input: a one-line error and exit status 2, before any work (no flow run, no MLflow store)."""

import inspect
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from cli.main import COMPARISON_SKIPS, main
from fedhpo_core.search.study import TuneSettings
from fedhpo_core.settings import ExecutionSettings, TrainSettings
from flows.comparison import method_comparison
from flows.study import hpo_study
from flows.training import federated_training

BAD_INPUTS = {
    "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "unknown model": (["--model", "resnet"], "unknown model 'resnet'"),
    "unknown partitioner": (["--partition", "zipf"], "unknown partition 'zipf'"),
    "unknown aggregator": (["--aggregator", "fedsgd"], "unknown aggregator 'fedsgd'"),
    "alpha zero": (["--alpha", "0"], "alpha must be in (0, 1e+06]"),
    "unknown task runner": (["--task-runner", "ray"], "unknown task_runner 'ray'"),
    "dask address without dask": (["--dask-address", "127.0.0.1:8786"], "dask_address needs task_runner dask"),
    "alpha negative": (["--alpha", "-1"], "alpha must be in (0, 1e+06]"),
    "alpha past IID": (["--alpha", "1e308"], "larger is IID: use --partition iid"),
    "seed negative": (["--seed", "-1"], "seed must be >= 0, got -1"),
    "no server validation sample": (["--val-fraction", "0.0001"], "leaves the server no validation sample"),
    "no clients": (["--clients", "0"], "clients must be >= 1"),
    "more clients than samples": (["--clients", "5000"], "clients (5000) exceeds"),
    "no rounds": (["--rounds", "0"], "rounds must be >= 1"),
    "lr zero": (["--lr", "0"], "lr must be > 0"),
    "lr negative": (["--lr", "-0.1"], "lr must be > 0"),
    "participation zero": (["--participation", "0"], "participation must be in (0, 1]"),
    "participation above one": (["--participation", "1.5"], "participation must be in (0, 1]"),
    "missing dataset files": (["--dataset", "fashion_mnist", "--data-root", "/nonexistent"], "fashion_mnist is not"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_fast_with_one_line(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    flags, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fedhpo train: error: ") and message in error
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def test_the_installed_command_exits_non_zero_on_bad_input():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("fedhpo")), "train", "--alpha", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("fedhpo train: error: alpha must be in (0, 1e+06], got 0.0")


def test_help_describes_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in fields(TrainSettings):
        assert "--" + f.name.replace("_", "-") in text


def test_flow_parameters_are_the_settings_with_the_same_defaults():
    expected = {
        federated_training: [*fields(TrainSettings), *fields(ExecutionSettings)],
        hpo_study: [*fields(TuneSettings), *fields(ExecutionSettings)],
        method_comparison: [
            f for f in [*fields(TuneSettings), *fields(ExecutionSettings)] if f.name not in COMPARISON_SKIPS
        ],
    }
    assert [f.name for f in expected[federated_training]] == list(inspect.signature(federated_training.fn).parameters)
    for flow, settings in expected.items():
        parameters = inspect.signature(flow.fn).parameters
        described = flow.parameters.properties
        for f in settings:
            # A method's options: {} in the settings, None (none given) as a flow parameter.
            default = f.default if f.name != "options" else None
            assert default is not MISSING and parameters[f.name].default == default, (flow.name, f.name)
            assert described[f.name].get("description"), (flow.name, f.name)


@pytest.mark.parametrize("name", ["lr_hypergradient", "depth"])
def test_a_search_space_naming_an_undocumented_setting_is_refused(name, capsys, tmp_path, monkeypatch):
    from fedhpo_core.search.space import CLIENT_SETTINGS, SearchSpace
    from fedhpo_core.settings import ClientConfig, SettingsError

    assert set(CLIENT_SETTINGS) <= {f.name for f in fields(ClientConfig)}  # the documented ones exist
    declared = {name: {"type": "categorical", "choices": [0, 1]}}
    with pytest.raises(SettingsError, match=f"unknown settings \\['{name}'\\]"):
        SearchSpace.from_dict(declared)
    (tmp_path / "space.yaml").write_text(f"{name}: {{type: categorical, choices: [0, 1]}}\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--method", "random", "--search-space", str(tmp_path / "space.yaml")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fedhpo tune: error: search space names unknown settings")
    assert list(work.iterdir()) == []
