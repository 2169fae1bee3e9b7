"""The examples (examples/*.py) run as documented: a real `fedhpo tune` and `fedhpo compare` on each
task file, against a real MLflow store, with the task's scoring metric named and directed in the
printed lines, the Optuna study, the MLflow runs and the comparison's table."""

import ast
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import servers
from mlflow import MlflowClient

from fedhpo_core.search.study import default_storage

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Each example: its scoring metric, that metric's direction, and the Optuna direction it makes.
SCORES = {
    "diabetes": ("rmse", "minimize", optuna.study.StudyDirection.MINIMIZE),
    "mnist_folders": ("acc", "maximize", optuna.study.StudyDirection.MAXIMIZE),
    "sequences": ("acc", "maximize", optuna.study.StudyDirection.MAXIMIZE),
}
BUDGET, N_CONFIGS, FINAL_ROUNDS = 8, 2, 2  # random search: 4 rounds per trial
TUNE = ["tune", "--method", "random", "--budget", str(BUDGET), "--n-configs", str(N_CONFIGS)]
COMPARE = ["compare", "--methods", "random,tpe", "--seeds", "0,1", "--budgets", "6", "--n-configs", "2"]


def fedhpo(folder: Path, *args: str, **env: str) -> tuple[str, str]:
    """`fedhpo ARGS` in `folder` with its own MLflow store there; (stdout, stdout and stderr), after
    checking that it exited 0."""
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"} | env
    done = subprocess.run(
        [servers.venv_bin("fedhpo"), *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stdout + done.stderr


def printed(pattern: str, text: str) -> str:
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return found.group(1)


def run_with_example(name: str, tmp_path_factory, *flags: str) -> dict:
    """A finished `fedhpo tune` of examples/NAME.py: its folder, output and what it printed."""
    folder = tmp_path_factory.mktemp(name)
    cache = str(folder / "cache")  # the examples write what they generate here, not into the checkout
    stdout, output = fedhpo(
        folder,
        *TUNE,
        "--final-rounds",
        str(FINAL_ROUNDS),
        "--task",
        str(EXAMPLES / f"{name}.py"),
        *flags,
        FEDHPO_EXAMPLES_CACHE=cache,
    )
    return {"name": name, "folder": folder, "cache": Path(cache), "stdout": stdout, "output": output}


@pytest.fixture(scope="module")
def tuned_diabetes(tmp_path_factory):
    return run_with_example("diabetes", tmp_path_factory)


@pytest.fixture(scope="module")
def tuned_sequences(tmp_path_factory):
    return run_with_example("sequences", tmp_path_factory)


@pytest.fixture(scope="module")
def tuned_mnist_folders(tmp_path_factory):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST under {SHARED_DATA}")
    return run_with_example("mnist_folders", tmp_path_factory, "--data-root", str(SHARED_DATA))


@pytest.fixture(params=sorted(SCORES))
def tuned(request):
    return request.getfixturevalue(f"tuned_{request.param}")


def test_the_study_is_scored_by_the_examples_metric_in_its_direction(tuned):
    score, direction, optuna_direction = SCORES[tuned["name"]]
    stdout = tuned["stdout"]
    assert printed(r"^Study \S+: best trial \d+ \(validation (\w+) ", stdout) == score
    name = printed(r"^Study (\S+): ", stdout)
    assert f"retrained for {FINAL_ROUNDS} rounds: test_{score} " in stdout
    storage = printed(r"Optuna study in (\S+);", stdout)
    tracking_uri = f"sqlite:///{tuned['folder'] / 'mlflow.db'}"
    assert storage == default_storage(tracking_uri)
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.direction == optuna_direction
    assert len(study.trials) == N_CONFIGS

    client = MlflowClient(tracking_uri)
    run = client.get_run(printed(r"; MLflow run (\w+) in ", stdout))
    assert run.data.tags["fedhpo.role"] == "study"
    assert run.data.params["task"] == tuned["name"]
    assert (run.data.params["score"], run.data.params["score_direction"]) == (score, direction)
    assert np.isfinite(run.data.metrics[f"final_test_{score}"])
    assert f"final_test_{'acc' if score != 'acc' else 'rmse'}" not in run.data.metrics

    trials = client.search_runs([run.info.experiment_id], "tags.`fedhpo.role` = 'trial'")
    assert len(trials) == N_CONFIGS
    for trial in trials:
        history = client.get_metric_history(trial.info.run_id, f"val_{score}")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, BUDGET // N_CONFIGS + 1))
        assert all(np.isfinite(m.value) for m in history)


def test_the_diabetes_regression_is_scored_in_the_targets_units(tuned_diabetes):
    client = MlflowClient(f"sqlite:///{tuned_diabetes['folder'] / 'mlflow.db'}")
    run = client.get_run(printed(r"; MLflow run (\w+) in ", tuned_diabetes["stdout"]))
    rmse = run.data.metrics["final_test_rmse"]
    # The target (disease progression) spreads about 77 around its mean 152: an RMSE in those units,
    # not in standardized ones (about 1).
    assert 30 < rmse < 200, rmse
    assert (run.data.params["partition"], run.data.params["clients"]) == ("natural", "5")  # five age bands


def test_the_diabetes_runs_measure_mae_beside_rmse(tuned_diabetes):
    """A table's regression is measured by RMSE (scoring) and MAE (`Task.metrics`, docs/tasks.md)."""
    client = MlflowClient(f"sqlite:///{tuned_diabetes['folder'] / 'mlflow.db'}")
    study = client.get_run(printed(r"; MLflow run (\w+) in ", tuned_diabetes["stdout"]))
    (final,) = client.search_runs([study.info.experiment_id], "tags.`fedhpo.role` = 'final'")
    assert {"test_rmse", "val_rmse"} <= final.data.metrics.keys()
    assert {"test_mae", "val_mae"} <= final.data.metrics.keys()


@pytest.mark.parametrize("name", ["mnist_folders", "sequences"])
def test_the_custom_models_train_on_the_cohort_engine(name, request):
    """Neither model is an nn.Sequential; the cohort engine batches both (SmallCNN lowered to its
    built-in kernel, MotifCNN through torch.func's vmap), so no fallback line."""
    tuned = request.getfixturevalue(f"tuned_{name}")
    assert "cohort engine:" not in tuned["output"]
    assert "sequential engine" not in tuned["output"]


def test_mnist_goes_through_the_per_client_folder_layout(tuned_mnist_folders):
    folder = tuned_mnist_folders["cache"] / "mnist_folders"
    clients = sorted(p.name for p in folder.iterdir())
    assert clients == [f"client_{c:02d}" for c in range(10)]
    images = sorted(folder.glob("*/*/*.png"))
    sizes = [len(list((folder / c).glob("*/*.png"))) for c in clients]
    assert len(images) == sum(sizes) and all(100 <= s <= 300 for s in sizes)
    assert {p.parent.name for p in images} == {str(d) for d in range(10)}
    assert not list(folder.parent.glob("*.partial-*"))  # written to a temporary folder, then renamed
    for client in clients:  # a label skew: each client's most common digit is well above a tenth
        counts = [len(list((folder / client / str(d)).glob("*.png"))) for d in range(10)]
        assert max(counts) > 0.2 * sum(counts), (client, counts)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_compare_names_the_examples_score(name, tmp_path):
    from conftest import SHARED_DATA

    score, direction, _ = SCORES[name]
    flags = ("--data-root", str(SHARED_DATA)) if name == "mnist_folders" else ()
    if flags and not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST under {SHARED_DATA}")
    stdout, _ = fedhpo(
        tmp_path,
        *COMPARE,
        "--final-rounds",
        str(FINAL_ROUNDS),
        "--task",
        str(EXAMPLES / f"{name}.py"),
        *flags,
        FEDHPO_EXAMPLES_CACHE=str(tmp_path / "cache"),
    )
    assert f"final_test_{score} ({direction}), mean ± std over seeds" in stdout
    assert re.search(r"^\| method \| budget 6 \|", stdout, re.MULTILINE)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    run = client.get_run(printed(r"^MLflow run (\w+) in ", stdout))
    assert (run.data.params["score"], run.data.params["score_direction"]) == (score, direction)
    results = pd.read_csv(client.download_artifacts(run.info.run_id, "comparison/results.csv", str(tmp_path)))
    assert f"final_test_{score}" in results.columns
    assert sorted(zip(results["method"], results["seed"], strict=True)) == [
        ("random", 0),
        ("random", 1),
        ("tpe", 0),
        ("tpe", 1),
    ]
    assert results[f"final_test_{score}"].notna().all()


@pytest.mark.parametrize("name", sorted(SCORES))
def test_each_example_documents_its_one_command(name):
    """The command in the example's docstring is the one the README lists; the file defines one Task."""
    source = (EXAMPLES / f"{name}.py").read_text()
    docstring = ast.get_docstring(ast.parse(source))
    (command,) = [line.strip() for line in docstring.splitlines() if line.strip().startswith("fedhpo ")]
    assert f"--task examples/{name}.py" in command
    assert command in (EXAMPLES / "README.md").read_text()
