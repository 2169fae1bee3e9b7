"""A bracket keeps its draws: a study of successive halving, Hyperband, BOHB or PBT killed at any
moment (SIGKILL, a real process) and resumed trains the configurations it had asked for, each in
its bracket or generation, and ends with as many configurations as it planned, none twice, every
round charged as trained and within budget.

The killed process is a fork that runs `run_search` on an SQLite study; it stops after its n-th
write to the study (every storage call that writes, and the trainer's record of a finished
training, counted alike) and waits there for the parent's SIGKILL: so every moment between two
writes can be chosen, those inside `study.ask` included (a trial enqueued with its bracket or
lineage and not yet created, created, one of its parameters set...). The study is then resumed as
`--resume` does (`run_search` without `join`), in this process.

What "trained" means here: a training that ran to its end (the trainer's ledger line, written
before it returns). A training the kill cut short is neither charged nor counted (as before); one
the killed process finished but never recorded is trained again on resume from the same start,
and counted once.
"""

import multiprocessing
import os
import random
import select
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch
from test_faults import FEDHPO, SMALL, check_stores_agree, trial_lines, wait_for

from fedhpo_core.cost import Cost
from fedhpo_core.federation import FederationState
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import BRACKET_ATTR, TrialResult, rounds_spent
from fedhpo_core.search.halving import plan_cost, plan_rungs
from fedhpo_core.search.pbt import GENERATION, MEMBER, PARENT, POPULATION
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.search.study import open_study, run_search

SPACE = SearchSpace.load(None)  # the FedTune paper's grid: 30 configurations, so random draws repeat
PARAMETERS = SPACE.parameters("global", 4)
# (budget, configurations): sha's one bracket of 9, Hyperband's brackets of 3 + 2, BOHB's of
# 9 + 5 + 3 (the last drawn by TPE, fitted to the 14 before), PBT's three generations of 4.
STUDIES = {"sha": (60, 9), "hyperband": (30, 3), "bohb": (180, 9), "pbt": (24, 4)}
WRITES = (
    "create_new_trial",
    "set_trial_state_values",
    "set_trial_param",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "set_trial_intermediate_value",
    "set_study_user_attr",
)
SEED = 0


class LedgerTrainer:
    """Trains instantly; stores each state reached as a file (any process continues from it), and
    appends one line per training run to its end to the ledger: trial, start round, rounds."""

    def __init__(self, folder: Path, after_write=lambda name: None):
        self.folder, self.after_write = folder, after_write

    def load(self, checkpoint):
        return FederationState(int(Path(checkpoint).read_text()), torch.zeros(1))

    def __call__(self, trial, configuration, rounds, start, tuner=None, keep_going=None, afford=None, **_):
        begun = start.round if start else 0
        trained = 0
        while trained < rounds and (afford is None or afford(Cost(rounds=1))):
            trained += 1
            if keep_going and not keep_going(begun + trained):
                break
        checkpoint = self.folder / f"state-{trial.number}-{begun + trained}"
        checkpoint.write_text(str(begun + trained))
        ledger = os.open(self.folder / "ledger", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(ledger, f"{trial.number} {begun} {trained}\n".encode())  # one write: whole, or not at all
        os.close(ledger)
        self.after_write("ledger")
        score = 1 - abs(configuration.values["lr"] - 0.05) + 0.001 * configuration.values["weight_decay"] + begun
        state = FederationState(begun + trained, torch.zeros(1))
        return TrialResult(score, trained, state, checkpoint=str(checkpoint), cost=Cost(rounds=trained))


def search(method: str, storage: str, folder: Path, resume: bool, after_write=lambda name: None) -> optuna.Study:
    budget, n_configs = STUDIES[method]
    study = open_study(method_named(method).build(), storage, "s", resume)
    for name in WRITES:  # counted where the study writes: a Trial writes through the same object
        write = getattr(study._storage, name)

        def counted(*arguments, write=write, name=name, **keywords):
            result = write(*arguments, **keywords)
            after_write(name)
            return result

        setattr(study._storage, name, counted)
    trainer = LedgerTrainer(folder, after_write)
    run_search(method_named(method).build(), study, SPACE, "global", 4, trainer, budget, n_configs, SEED)
    return study


def killed_search(method: str, storage: str, folder: Path, writes: int, told) -> None:
    """The forked child: searches until its `writes`-th write, then says so and waits to be killed."""
    count = 0

    def after_write(name: str):
        nonlocal count
        count += 1
        if count == writes:
            os.write(told, b"!")
            time.sleep(600)

    search(method, storage, folder, resume=False, after_write=after_write)


def kill_after(method: str, storage: str, folder: Path, writes: int) -> bool:
    """Run a study in a forked process and SIGKILL it right after its `writes`-th write (False if
    it finished first)."""
    read, told = os.pipe()
    process = multiprocessing.get_context("fork").Process(
        target=killed_search, args=(method, storage, folder, writes, told)
    )
    process.start()
    os.close(told)
    ready, _, _ = select.select([read, process.sentinel], [], [], 120)
    assert ready, "the child neither wrote nor ended"
    killed = read in ready
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.join(60)
    os.close(read)
    assert process.exitcode == (-signal.SIGKILL if killed else 0)
    return killed


def trained_rounds(folder: Path) -> int:
    """Rounds of trainings run to their end, a training repeated from the same start counted once."""
    lines = (folder / "ledger").read_text().split()
    trainings = {(lines[i], lines[i + 1]): int(lines[i + 2]) for i in range(0, len(lines), 3)}
    return sum(trainings.values())


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """Each method's study run without a kill, and the writes it made (by name, in order)."""
    studies = {}
    for method in STUDIES:
        folder, writes = tmp_path_factory.mktemp(method), []
        study = search(method, f"sqlite:///{folder / 'optuna.db'}", folder, False, writes.append)
        studies[method] = SimpleNamespace(study=study, writes=writes, spent=rounds_spent(study))
    return studies


def kill_moments(method: str, writes: list[str]) -> list[int]:
    """After each of the first six writes (sha's plan; then a trial enqueued with its bracket or
    lineage, created from it, each parameter set; the next enqueued), after the first training
    ended and before its record, and six moments drawn at random over the rest."""
    chosen = {*range(1, 7), writes.index("ledger") + 1}
    rest = [n for n in range(1, len(writes)) if n not in chosen]
    return sorted(chosen | set(random.Random(f"{method}-kills").sample(rest, 6)))


def check_resumed(method: str, study: optuna.Study, reference: SimpleNamespace, folder: Path) -> None:
    budget, n_configs = STUDIES[method]
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    # A trial marked FAIL never held a whole configuration (killed inside `study.ask`): none was discarded.
    assert all(t.params.keys() != PARAMETERS.keys() for t in trials if t.state == optuna.trial.TrialState.FAIL)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    spent = rounds_spent(study)
    assert spent == trained_rounds(folder) == reference.spent <= budget
    if method == "pbt":
        check_generations(study, finished, reference.study)
        return
    plans = {k: v for k, v in study.user_attrs.items() if k.startswith(f"{BRACKET_ATTR}_")}
    assert plans == {k: v for k, v in reference.study.user_attrs.items() if k.startswith(f"{BRACKET_ATTR}_")}
    for key, plan in plans.items():  # each bracket: its planned first rung, distinct configurations
        bracket = [t for t in finished if t.user_attrs[BRACKET_ATTR] == int(key.removeprefix(f"{BRACKET_ATTR}_"))]
        assert len({frozenset(t.params.items()) for t in bracket}) == len(bracket) == plan[0][0]
    assert len(finished) == sum(plan[0][0] for plan in plans.values())
    if method == "sha":
        assert len(finished) == n_configs and spent == plan_cost(plan_rungs(n_configs, budget))


def check_generations(study: optuna.Study, finished: list, reference: optuna.Study) -> None:
    """As many generations as without the kill, each of every member once; the first of distinct
    configurations, the others as their parents' generation plans them (`offspring`)."""
    generations: dict[int, dict[int, optuna.trial.FrozenTrial]] = {}
    for trial in finished:
        members = generations.setdefault(trial.user_attrs[GENERATION], {})
        assert trial.user_attrs[MEMBER] not in members
        members[trial.user_attrs[MEMBER]] = trial
    assert sorted(generations) == sorted({t.user_attrs[GENERATION] for t in reference.trials})
    assert all(sorted(members) == list(range(POPULATION)) for members in generations.values())
    assert len({frozenset(t.params.items()) for t in generations[0].values()}) == POPULATION
    pbt = method_named("pbt").build()
    for generation in sorted(generations)[1:]:
        context = SimpleNamespace(seed=SEED, parameters=PARAMETERS)
        plan = pbt.offspring(context, generations[generation - 1], generation)
        for member, trial in generations[generation].items():
            values, parent = plan[member]
            assert trial.params == values and trial.user_attrs[PARENT] == parent.number


@pytest.mark.parametrize("method", STUDIES)
def test_a_study_killed_at_any_moment_resumes_with_the_configurations_it_planned(method, references, tmp_path):
    reference = references[method]
    for writes in kill_moments(method, reference.writes):
        folder = tmp_path / str(writes)
        folder.mkdir()
        storage = f"sqlite:///{folder / 'optuna.db'}"
        assert kill_after(method, storage, folder, writes)
        study = search(method, storage, folder, resume=True)
        check_resumed(method, study, reference, folder)


def test_sha_killed_in_its_first_rung_resumes_to_its_nine_configurations(tmp_path):
    """The issue's case, end to end: `fedhpo tune --method sha` SIGKILLed once its first trials
    had trained, then `--resume`: the bracket's nine configurations, as drawn, none twice."""
    budget, n_configs = 60, 9
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [FEDHPO, "tune", "--method", "sha", "--budget", str(budget), "--n-configs", str(n_configs), *SMALL]
    command += ["--dataset", "digits", "--storage", storage, "--study-name", "first-rung", "--experiment", "first-rung"]
    log = tmp_path / "log.txt"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(lambda: trial_lines(log) >= 2)  # two of the first rung's nine trainings
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    asked = {t.number: t.params for t in optuna.load_study(study_name="first-rung", storage=storage).trials}
    assert len(asked) == n_configs  # the bracket's trials were all asked for before its first training

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="first-rung", storage=storage)
    trained = check_stores_agree(study, mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]), "first-rung")
    assert {t.number: t.params for t in study.trials} == asked  # trained as drawn: none added, none dropped
    assert len({frozenset(t.params.items()) for t in study.trials}) == n_configs
    assert sum(trained.values()) == rounds_spent(study) == plan_cost(plan_rungs(n_configs, budget))
