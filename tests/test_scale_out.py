"""Scale-out: the Dask backend, parallel trials, processes sharing a study, and the Prefect
artifacts a study and a comparison leave."""

import threading
import time

import optuna
import pytest
import torch

from fedhpo_core.client import ClientJob, ClientUpdate
from fedhpo_core.cost import Cost
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, FederationState, RoundSteps, clients_of, partition_of
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import ROUNDS_ATTR, TrialResult, planned_trials, rounds_spent
from fedhpo_core.search.fixed_budget import GridSearch, RandomSearch
from fedhpo_core.search.halving import plan_rungs
from fedhpo_core.search.leases import Leases, LeaseTerms
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.search.study import open_study, run_search
from fedhpo_core.settings import ExecutionSettings, TrainSettings
from fedhpo_core.tracking import run_url
from flows.comparison import method_comparison
from flows.study import artifact_key, hpo_study
from flows.training import federated_training
from tasks.training import PrefectSteps

SMALL = {"clients": 4, "rounds": 2, "partition": "dirichlet", "alpha": 0.5}


class RecordingRunner:
    """A task runner that runs each submitted task here and records what it was sent."""

    def __init__(self):
        self.sent = []

    def submit(self, task, parameters):
        self.sent.append(parameters)
        result = task.fn(**parameters)

        class Done:
            def result(self):
                return result

        return Done()


def test_remote_clients_receive_a_reference_to_their_data_not_the_data():
    settings = TrainSettings(**SMALL | {"clients": 5})
    data = FederatedData.build(load_dataset("digits", "unused"), partition_of(settings.data), "mlp")
    weights = data.spec.initial_weights(0)
    jobs = [ClientJob(c, 1, settings.client_config, 0) for c in range(5)]
    runner = RecordingRunner()

    remote = PrefectSteps("cohort", runner, settings.data, slots=2).train_clients(
        data.spec, weights, jobs, data.clients
    )
    local = RoundSteps().train_clients(data.spec, weights, jobs, data.clients)

    assert [[job.client for job in sent["jobs"]] for sent in runner.sent] == [[0, 1, 2], [3, 4]]  # one share a slot
    for parameters in runner.sent:
        assert parameters["data"] == settings.data  # a small frozen settings object: the reference
        assert [type(v).__name__ for v in parameters.values()] == [
            "str",
            "ModelSpec",
            "Tensor",
            "DataSettings",
            "str",
            "list",
        ]
    assert [u.client for u in remote] == list(range(5))
    for a, b in zip(remote, local, strict=True):  # shares of a cohort: equal up to float rounding
        assert isinstance(a, ClientUpdate) and (a.weights - b.weights).abs().max() < 1e-6
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-6)
        assert a.weights.untyped_storage().nbytes() == 4 * len(a.weights)  # its own copy, not a view of the share
    rebuilt = clients_of(settings.data)[3]
    assert torch.equal(rebuilt.x_train, data.clients[3].x_train) and torch.equal(rebuilt.y_val, data.clients[3].y_val)


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("engine", ["sequential", "cohort"])
def test_the_dask_backend_gives_the_thread_runners_metrics(engine, mlflow_client):
    """Bit for bit with the sequential engine (one thread per client everywhere); to float rounding
    with cohorts, whose batched products MKL splits between threads by the cohort's size."""
    thread = federated_training(**SMALL, experiment="backends", engine=engine)
    dask = federated_training(**SMALL, experiment="backends", task_runner="dask", dask_workers=2, engine=engine)
    same = (lambda a, b: a == b) if engine == "sequential" else (lambda a, b: a == pytest.approx(b, rel=1e-5))
    for key in ("final_val_acc", "final_val_loss", "final_test_acc", "final_test_loss"):
        assert same(thread[key], dask[key]), key
    for metric in ("train_loss", "val_loss", "client_val_acc"):
        histories = [
            [m.value for m in sorted(mlflow_client.get_metric_history(s["run_id"], metric), key=lambda m: m.step)]
            for s in (thread, dask)
        ]
        assert same(histories[0], histories[1]) and len(histories[0]) == 2, metric
    params = mlflow_client.get_run(dask["run_id"]).data.params
    assert params["lr"] == "0.05"


@pytest.mark.usefixtures("prefect_server")
def test_clients_join_a_running_dask_cluster_by_address():
    from distributed import LocalCluster

    thread = federated_training(**SMALL | {"rounds": 1}, experiment="backends")
    with LocalCluster(n_workers=1, threads_per_worker=2, host="127.0.0.1", dashboard_address=None) as cluster:
        joined = federated_training(
            **SMALL | {"rounds": 1}, experiment="backends", task_runner="dask", dask_address=cluster.scheduler_address
        )
        assert len(cluster.scheduler_info["workers"]) == 1  # the flow left the cluster it joined running
    assert joined["final_val_loss"] == pytest.approx(thread["final_val_loss"], rel=1e-5)
    assert joined["final_test_acc"] == pytest.approx(thread["final_test_acc"], abs=0.002)


def test_execution_settings_are_checked():
    with pytest.raises(ValueError, match="dask_address needs task_runner dask"):
        ExecutionSettings(dask_address="127.0.0.1:8786")
    with pytest.raises(ValueError, match="dask_workers must be >= 1"):
        ExecutionSettings("dask", dask_workers=0)


@pytest.mark.usefixtures("prefect_server")
def test_parallel_trials_overlap_and_spend_the_budget_once(mlflow_client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    summary = hpo_study(
        method="tpe",
        budget=12,
        n_configs=6,
        final_rounds=0,
        workers=3,
        storage=storage,
        study_name="parallel",
        train={"clients": 4, "experiment": "parallel"},
    )
    study = optuna.load_study(study_name="parallel", storage=storage)
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 6 and len(study.trials) == 6
    assert sum(t.user_attrs[ROUNDS_ATTR] for t in complete) == 12 == summary["rounds_used"]
    # Some trial started before another had finished: they ran at once.
    spans = sorted((t.datetime_start, t.datetime_complete) for t in complete)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))

    runs = mlflow_client.search_runs(
        [summary["experiment_id"]], "tags.`fedhpo.study` = 'parallel' and tags.`fedhpo.role` = 'trial'"
    )
    assert sorted(int(r.data.tags["fedhpo.trial"]) for r in runs) == sorted(t.number for t in complete)
    for run in runs:
        trial = study.trials[int(run.data.tags["fedhpo.trial"])]
        assert run.data.metrics["score"] == trial.value and run.info.status == "FINISHED"


class FakeTraining:
    """Scores a configuration by its lr after `delay` seconds a round, reporting every round; with
    `worse_each_trial`, by its trial's number instead: each trial worse than every earlier one, so
    one that reaches a rung after an earlier trial of its bracket is not in its top 1/eta."""

    def __init__(self, delay: float, worse_each_trial: bool = False):
        self.delay, self.worse_each_trial, self.calls = delay, worse_each_trial, []

    def score(self, trial, configuration, trained: int) -> float:
        return (1 / (1 + trial.number) if self.worse_each_trial else configuration.values["lr"]) * trained

    def load(self, checkpoint):
        raise AssertionError("no method here continues a trial")

    def __call__(self, trial, configuration, rounds, start, tuner=None, keep_going=None, **_):  # the rest unused
        trained = 0
        while trained < rounds:
            time.sleep(self.delay)
            trained += 1
            trial.report(self.score(trial, configuration, trained), trained)
            if keep_going and not keep_going(trained):
                break
        self.calls.append((trial.number, trained))
        return TrialResult(
            score=self.score(trial, configuration, trained),
            rounds=trained,
            state=FederationState(trained, None),
            cost=Cost(rounds=trained),
        )


def fake_training(delay: float, worse_each_trial: bool = False) -> FakeTraining:
    return FakeTraining(delay, worse_each_trial)


@pytest.mark.parametrize("method", [RandomSearch, GridSearch])
def test_processes_sharing_a_study_split_it_without_losing_or_repeating_a_trial(method, tmp_path):
    """Three searchers on one storage, as separate processes would be (each its own Study object),
    two trials at once each: together they run exactly n configurations within the budget, and
    create no trial beyond them. (Forked processes on SQLite and PostgreSQL: `test_admission.py`.)"""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    space = SearchSpace.load(None)
    open_study(method(), storage, "shared", resume=False, join=True)

    def searcher():
        study = open_study(method(), storage, "shared", resume=False, join=True)
        run_search(method(), study, space, "global", 4, fake_training(0.05), 20, 10, 0, workers=2, join=True)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    study = optuna.load_study(study_name="shared", storage=storage)
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == len(study.trials) == 10 and sum(t.user_attrs[ROUNDS_ATTR] for t in complete) == 20
    points = [tuple(sorted(t.params.items())) for t in complete]
    if method is GridSearch:
        assert len(set(points)) == len(points)
    else:  # all three were given seed 0: joined processes still draw different streams
        assert len(set(points[:3])) > 1


@pytest.mark.parametrize("method", ["asha", "async-hyperband"])
def test_asynchronous_halving_shared_by_processes_stays_within_budget_and_runs_nothing_twice(method, tmp_path):
    """Three searchers on one storage, as separate processes would be, two trials at once each:
    rounds granted never exceed the budget, every trained round is charged once, and Optuna's
    pruner stopped some trials at a rung. Scores planted to fall with each trial: whether a random
    configuration is pruned would depend on the order the threads reach a rung in."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    space = SearchSpace.from_dict({"lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}})
    trainers = [fake_training(0.005, worse_each_trial=True) for _ in range(3)]
    # They search from the same moment: rounds of 5 ms spend the budget in a fraction of a second,
    # less than the first to open the new storage takes to create its tables.
    opened = threading.Barrier(len(trainers))

    def searcher(trainer):
        study = open_study(method_named(method).build(), storage, "shared", resume=False, join=True)
        opened.wait(timeout=60)
        run_search(method_named(method).build(), study, space, "global", 4, trainer, 60, 9, 0, workers=2, join=True)

    threads = [threading.Thread(target=searcher, args=(trainer,)) for trainer in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    study = optuna.load_study(study_name="shared", storage=storage)
    calls = [call for trainer in trainers for call in trainer.calls]
    assert len({number for number, _ in calls}) == len(calls)  # no trial trained twice
    assert all(trainer.calls for trainer in trainers)  # each process trained some
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert rounds_spent(study) == sum(rounds for _, rounds in calls) <= 60
    assert rounds_spent(study) >= 60 - 3 * 2  # the budget put to use, but for trials cut at its end
    assert study.get_trials(states=[optuna.trial.TrialState.PRUNED])
    longest = plan_rungs(9, 60)[-1].rounds
    assert all(t.user_attrs[ROUNDS_ATTR] <= longest for t in planned_trials(study))


def test_a_joining_search_leaves_room_for_trials_others_are_running(tmp_path):
    """Another process's trial, alive (its lease renewed) and told 2 s on: the joining search trains
    around it, never fails it, and stays until it ends."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = open_study(RandomSearch(), storage, "shared", resume=False, join=True)
    other = study.ask()
    terms = LeaseTerms(0.1, 0.5)
    with Leases(study, RandomSearch(), lambda: {other.number}, terms):
        telling = threading.Timer(2.0, study.tell, (other, 0.5))
        telling.start()
        search = (RandomSearch(), study, SearchSpace.load(None), "global", 4, fake_training(0), 10, 5, 0)
        run_search(*search, join=True, lease=terms)
        telling.join()
    assert study.trials[other.number].value == 0.5  # never failed: it was alive
    assert len(planned_trials(study)) == len(study.trials) == 5  # none created past the plan
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 5


def artifacts_of(flow_run_id) -> dict[str, list[dict]]:
    """The flow run's Prefect artifacts by type, read through the REST API (3.8.8's client sends
    None for the filter fields it is not given, which the server refuses)."""
    from prefect.client.orchestration import get_client

    body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "limit": 100, "offset": 0, "sort": "CREATED_DESC"}
    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json=body).json()
    by_type: dict[str, list[dict]] = {}
    for artifact in found:
        by_type.setdefault(artifact["type"], []).append(artifact)
    return by_type


@pytest.mark.usefixtures("prefect_server")
def test_a_study_and_a_comparison_leave_progress_and_markdown_summaries_in_prefect(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    fixed = {"clients": 3, "experiment": "artifacts"}
    state = hpo_study(
        method="random",
        budget=4,
        n_configs=2,
        final_rounds=1,
        storage=storage,
        study_name="Artifact Study!",
        train=fixed,
        return_state=True,
    )
    summary = state.result()
    artifacts = artifacts_of(state.state_details.flow_run_id)
    [markdown] = artifacts["markdown"]
    assert markdown["key"] == "study-artifact-study" == artifact_key("study-Artifact Study!")
    best_run = run_url("http://127.0.0.1:5000", summary["experiment_id"], summary["best_trial_run_id"])  # `mlflow ui`
    assert f"| best trial | [trial {summary['best_trial']}]({best_run}) |" in markdown["data"]
    assert "| rounds used | 4 of 4 |" in markdown["data"] and f"{summary['final_test_acc']:.4f}" in markdown["data"]
    [progress] = artifacts["progress"]
    assert progress["data"] == 100.0  # 4 of 4 rounds

    state = method_comparison(
        methods=["random"],
        seeds=[0],
        budgets=[2],
        n_configs=2,
        final_rounds=1,
        storage=storage,
        train=fixed,
        return_state=True,
    )
    [markdown] = artifacts_of(state.state_details.flow_run_id)["markdown"]
    assert markdown["key"].startswith("comparison-") and state.result()["table"] in markdown["data"]
