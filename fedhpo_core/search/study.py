"""Studies: settings, the method registry, and opening, running and reading an Optuna study."""

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from threading import Event

import optuna
import sqlalchemy

from fedhpo_core import seeding
from fedhpo_core.cost import UNITS
from fedhpo_core.evaluation import NoisyEvaluation
from fedhpo_core.federation import Federation
from fedhpo_core.personalization import OBJECTIVES as PERSONAL_OBJECTIVES
from fedhpo_core.registry import ROUND, Method, Options, methods
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import (
    Budget,
    SearchContext,
    SearchMethod,
    Trainer,
    settle_interrupted_trials,
)
from fedhpo_core.search.base import (
    spent as study_spent,
)
from fedhpo_core.search.leases import LEASE_GRACE_S, LEASE_S, Leases, LeaseTerms
from fedhpo_core.search.space import SCOPES, SearchSpace
from fedhpo_core.search.storage import open_storage
from fedhpo_core.settings import SettingsError, TrainSettings, check_processes, setting
from fedhpo_core.stores import masked, one_line

# Methods that became an option of another: old name -> (method, its option as flags).
RENAMED = {
    "fedhyper-global": ("fedhyper", "--schedulers global"),
    "fedhyper-local": ("fedhyper", "--schedulers server_local"),
    "fedhyper-client": ("fedhyper", "--schedulers client_local"),
}
OBJECTIVES = ("server", "clients", *PERSONAL_OBJECTIVES)
# Named `fedhpo compare` settings. fedtune-table1: the FedTune paper's Table 1 protocol (section
# 4.1 and appendix C): MLP, 10 clients, Dirichlet alpha 0.1, its lr x weight-decay grid (the default
# search space), budget 30, 400 final rounds, its four methods (Bayesian optimization: TPE); the
# paper averages 30 runs, here 3 seeds by default.
COMPARISON_PRESETS = {
    "fedtune-table1": {
        "methods": ["random", "hyperband", "tpe", "fedtune"],
        "seeds": [0, 1, 2],
        "budgets": [30],
        "final_rounds": 400,
        "n_configs": 30,
        "dataset": "mnist",
        "model": "mlp",
        "clients": 10,
        "partition": "dirichlet",
        "alpha": 0.1,
    },
    # The FedTune paper's budget on a task where groups of clients need different learning rates
    # (`fedhpo_core.scaled_groups`), scored by the clients' personalized accuracy after 5 local steps.
    "personalized-scaled": {
        "methods": ["random", "fedex", "fedtune", "fts", "hpn", "clustered"],
        "seeds": [0, 1, 2],
        "budgets": [30],
        "final_rounds": 50,
        "n_configs": 30,
        "task": "mnist-scaled",
        "objective": "personalized",
        "finetune_steps": 5,
    },
}
DEFINITION_ATTR = "definition"  # Optuna study user attribute: `study_definition` at creation
# Settings a definition holds since after studies began keeping one: a study recorded without them had these.
ADDED_TO_DEFINITION = {
    "eval_clients": 0,
    "eval_noise": 0.0,
    "task": "",
    "client_column": "",
    "target": "",
    "task_type": "auto",
    "finetune_steps": 0,
    "finetune_lr": 0.0,
    "ditto_lambda": 0.0,
    "compression": "none",
    "compression_bits": 8,
    "compression_bucket": 512,
    "topk_fraction": 0.01,
    "compress_downloads": False,
    "budget_unit": "rounds",
    "max_bytes": 0.0,
}
# Configurations a study may plan: round-level tuners hold a distribution over every one (per client).
MAX_CONFIGS = 10_000
# Study user attribute set when a study ended, its best retrained: the final MLflow run's id (None
# without a final training). `--resume` of such a study starts nothing (`StudyFinished`).
FINAL_ATTR = "final_run_id"
SCHEMA_ATTEMPTS = 3  # processes joining a new storage at once race to create its tables

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial from us, not Optuna's


@dataclass(frozen=True)
class TuneSettings:
    """How a study searches; every `TrainSettings` field is a fixed setting of it besides."""

    method: str = setting("tpe", "search method (`fedhpo methods` describes each)")
    budget: int = setting(30, "what the search may spend, every round of every trial, in --budget-unit")
    budget_unit: str = setting(
        "rounds",
        "the budget's currency: rounds, client-updates (sampled clients x rounds), bytes (up and down) or "
        "sim-seconds (the devices' simulated time)",
    )
    n_configs: int = setting(30, "configurations to try (random, grid, tpe, gp, multiobjective); sets (a)sha's rungs")
    final_rounds: int = setting(20, "rounds to retrain the best configuration from scratch (the paper uses 400)")
    scope: str = setting("global", "global: one configuration for all clients; personalized: one per client")
    search_space: str | None = setting(None, "YAML search space (default: the FedTune paper's lr x weight decay)")
    objective: str = setting(
        "server",
        "what trials are scored on: the server's validation split, the clients' reports, or the clients' "
        "personalized scores (personalized: their mean; personalized-worst: the worst tenth's)",
    )
    eval_clients: int = setting(
        0, "noisy evaluation (Kuo et al. 2023): score each round on k random clients' validation data (0: off)"
    )
    eval_noise: float = setting(0.0, "noisy evaluation: Laplace scale b of the noise on each round's score (0: off)")
    storage: str | None = setting(None, "Optuna storage URL (default: optuna.db beside the MLflow store)")
    study_name: str | None = setting(None, "Optuna study name (default: derived from the settings)")
    resume: bool = setting(False, "continue the interrupted study of that name")
    workers: int = setting(1, "trials trained at once (random, grid, tpe, gp, multiobjective, asha, async-hyperband)")
    join: bool = setting(False, "share the study with other processes on the same --storage (created if missing)")
    checkpoint_every: int = setting(
        1, "round-level methods: rounds between checkpoints of a run and its tuner (a kill loses at most these)"
    )
    lease_s: float = setting(
        LEASE_S, "seconds between renewals of the lease a process holds on each trial it trains (see --lease-grace-s)"
    )
    lease_grace_s: float = setting(
        LEASE_GRACE_S,
        "with --join: a trial whose lease went this many seconds unrenewed (its process killed) is settled by "
        "another process as --resume would, and its room used",
    )
    max_epsilon: float = setting(0.0, "privacy budget: a trial that spent more epsilon is never the best (0: none)")
    max_bytes: float = setting(0.0, "communication limit: a trial that sent more bytes is never the best (0: none)")
    register_model: str | None = setting(
        None, "register the retrained best model as a version of this name in MLflow's Model Registry"
    )
    # The method's options by name (its declaration's `Options`); each is a flag of its own.
    options: Mapping[str, object] = field(default_factory=dict, metadata={"help": "the method's options"})

    def __post_init__(self):
        if self.method in RENAMED:
            method, flags = RENAMED[self.method]
            raise SettingsError(f"method {self.method!r} is now {method} with an option: --method {method} {flags}")
        declared = self.declared  # an unknown name fails here, in one line
        _ = self.method_options  # and so does an option it does not have, or a value it refuses
        if self.scope not in SCOPES:
            raise SettingsError(f"unknown scope {self.scope!r}; choose from {', '.join(SCOPES)}")
        if self.scope != TuneSettings.scope and declared.kind == ROUND:
            raise SettingsError(
                f"--scope {self.scope}: {self.method} is round-level, its tuner chooses each client's settings "
                "itself (the scope applies to trial-level methods)"
            )
        if self.objective not in OBJECTIVES:
            raise SettingsError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        self.evaluation()  # refuses a negative eval_clients or eval_noise
        if self.objective in PERSONAL_OBJECTIVES and self.eval_clients:
            raise SettingsError(f"objective {self.objective} scores every client: eval_clients does not apply")
        if not 1 <= self.n_configs <= MAX_CONFIGS:
            raise SettingsError(f"n_configs must be in [1, {MAX_CONFIGS}], got {self.n_configs}")
        if self.final_rounds < 0:
            raise SettingsError(f"final_rounds must be >= 0, got {self.final_rounds}")
        if self.workers < 1:
            raise SettingsError(f"workers must be >= 1, got {self.workers}")
        check_processes("workers", self.workers)
        if (self.workers > 1 or self.join) and not declared.parallel:
            parallel = ", ".join(name for name, method in methods().items() if method.parallel)
            raise SettingsError(f"parallel trials (workers > 1, join) need one of {parallel}; not {self.method}")
        if self.join and self.resume:
            raise SettingsError("join and resume exclude each other: resume fails trials that others may be running")
        if self.checkpoint_every < 1:
            raise SettingsError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.checkpoint_every != TuneSettings.checkpoint_every and declared.kind != ROUND:
            raise SettingsError(
                f"--checkpoint-every {self.checkpoint_every}: {self.method} is {declared.kind} and checkpoints "
                "no run (round-level methods do)"
            )
        _ = self.lease  # refuses a period or grace that is not a number > 0, or a grace under two periods
        for name in ("max_epsilon", "max_bytes"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise SettingsError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        if self.budget_unit not in UNITS:
            raise SettingsError(f"unknown budget_unit {self.budget_unit!r}; choose from {', '.join(UNITS)}")
        if self.register_model is not None:
            if not self.register_model.strip() or any(c in self.register_model for c in "/:"):
                # what MLflow's Model Registry refuses, said before any work (not after the study)
                raise SettingsError(f"register_model: {self.register_model!r} is not a model name (empty, '/' or ':')")
            if not self.final_rounds:
                raise SettingsError("register_model needs final_rounds >= 1: the retrained best model is registered")
        if self.budget_unit == "rounds":  # in another unit, once a round's cost is known (`budget_of`)
            self.search_method().check_budget(self.budget, self.n_configs)
        elif self.budget <= 0:
            raise SettingsError(f"budget must be > 0, got {self.budget}")

    def budget_of(self, federation: Federation, fixed: TrainSettings) -> Budget:
        """The study's budget in its unit, with what a round of the fixed settings at full fidelity
        costs in it (`Federation.reference_cost`): methods plan in such rounds. A budget that cannot
        fund the method's plan is refused in one line, before any round."""
        round_cost = federation.reference_cost(fixed.client_config).in_unit(self.budget_unit)
        budget = Budget(self.budget, self.budget_unit, max(round_cost, 1e-9))
        if self.budget_unit != "rounds":
            try:
                self.search_method().check_budget(budget.total, self.n_configs)
            except SettingsError as error:
                bought = f"{budget.total} rounds of {round_cost:g} {self.budget_unit} each"
                raise SettingsError(f"budget {self.budget} {self.budget_unit} buys {bought}: {error}") from error
        return budget

    def check_with(self, fixed: TrainSettings) -> None:
        """What depends on the fixed settings: the search space, the clients noisy evaluation draws
        from, and the privacy or target accuracy that an objective or limit on epsilon or time to
        target needs."""
        self.space().check(fixed)
        self.evaluation().check(fixed.clients)
        needed = set(self.search_method().objectives) | ({"epsilon"} if self.max_epsilon else set())
        if fixed.dp_clip and (private := [s.name for s in self.declared.statistics if not s.privatized]):
            raise SettingsError(
                f"{self.method} asks every client for {', '.join(private)}, which DP-FedAvg does not privatize: "
                "run it without --dp-clip, or choose another method"
            )
        noised = fixed.dp_noise or "dp_noise" in self.space().distributions
        if "epsilon" in needed and not (fixed.dp_clip and noised):
            raise SettingsError(
                "epsilon (an objective or --max-epsilon) needs DP-FedAvg: --dp-clip C and --dp-noise sigma "
                "(or dp_noise in the search space)"
            )
        if fixed.dp_clip and "clients" in getattr(self.method_options, "fidelity", ""):
            raise SettingsError(
                "a client-fraction fidelity cannot run with dp_clip: DP-FedAvg's accountant assumes every round "
                "samples clients at the participation rate"
            )
        if "time_to_target_s" in needed and not fixed.target_acc:
            raise SettingsError("the objective time_to_target_s needs --target-acc")

    @cached_property
    def declared(self) -> Method:
        return method_named(self.method)

    @cached_property
    def method_options(self) -> Options:
        """The method's options: those given over its defaults."""
        return self.declared.make_options(self.options)

    @property
    def changed_options(self) -> dict:
        """The method's options that differ from its defaults (a study's name and definition carry them)."""
        return self.declared.changed(self.method_options)

    def evaluation(self) -> NoisyEvaluation:
        return NoisyEvaluation(self.eval_clients, self.eval_noise)

    @property
    def lease(self) -> LeaseTerms:
        return LeaseTerms(self.lease_s, self.lease_grace_s)

    @property
    def noisy(self) -> dict:
        """The noisy-evaluation settings that are on (a study's default name carries them)."""
        return {k: v for k, v in (("eval_clients", self.eval_clients), ("eval_noise", self.eval_noise)) if v}

    @cached_property
    def built(self) -> SearchMethod:
        """The method, with its options and the study's limits: built once per settings."""
        method = self.declared.search(self.method_options)
        limits = {"epsilon": self.max_epsilon, "bytes_sent": self.max_bytes}
        method.limits = {name: limit for name, limit in limits.items() if limit}
        return method

    def search_method(self) -> SearchMethod:
        return self.built

    def space(self) -> SearchSpace:
        return SearchSpace.load(self.search_space)

    def name_for(self, fixed: TrainSettings) -> str:
        changed = self.changed_options
        method = f"{self.method}[{';'.join(map(str, changed.values()))}]" if changed else self.method
        noisy = "".join(f"-{k.removeprefix('eval_')}{v:g}" for k, v in self.noisy.items())
        unit = "" if self.budget_unit == "rounds" else self.budget_unit
        return self.study_name or (
            f"{method}-{self.scope}-{fixed.task_ref.label}-{fixed.partition}-{fixed.clients}c-b{self.budget}{unit}"
            f"-s{fixed.seed}" + noisy
        )


def default_storage(tracking_uri: str) -> str:
    """An SQLite file beside MLflow's SQLite store, else optuna.db in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).with_name('optuna.db')}"
    return "sqlite:///optuna.db"


def while_schema_settles(call):
    """`call()`, tried again a second later while it fails because another process is creating
    Optuna's tables in the same storage at the same moment (processes joining a new storage)."""
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return call()
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(1.0)


def study_exists(storage: str, name: str) -> bool:
    """Whether the study exists, without creating an SQLite file that is not there."""
    if str(storage).startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        return False
    return name in {s.study_name for s in optuna.study.get_all_study_summaries(storage)}


def study_definition(tune: TuneSettings, fixed: TrainSettings) -> dict:
    """What a study is: its method and options, objective, scope, budget, configurations, search
    space and fixed settings (less where the data lives and `rounds`, which a study does not use).
    A study keeps it (`DEFINITION_ATTR`); `--resume` and `--join` continue it only with the same."""
    space = {name: optuna.distributions.distribution_to_json(d) for name, d in tune.space().distributions.items()}
    fixed_values = {k: v for k, v in asdict(fixed).items() if k not in ("data_root", "rounds")}
    names = ("method", "objective", "eval_clients", "eval_noise", "scope", "budget", "budget_unit", "n_configs")
    names += ("max_bytes",)
    scalars = {k: getattr(tune, k) for k in names}
    return scalars | tune.changed_options | {"search_space": space} | fixed_values


def check_continuation(study: optuna.Study, method: SearchMethod, definition: dict | None, flag: str) -> None:
    """Refuse to continue a study with settings it was not created with (say which, and how)."""
    directions = [d.name.lower() for d in study.directions]
    if directions != list(method.directions):
        kind = "several objectives" if len(directions) > 1 else "one objective"
        name = type(method).__name__
        raise SettingsError(f"{flag}: study {study.study_name!r} has {kind}; {name} cannot continue it")
    recorded = study.user_attrs.get(DEFINITION_ATTR)
    if not recorded or definition is None:
        return  # created before studies kept their definition
    recorded = ADDED_TO_DEFINITION | recorded
    differ = [k for k in definition if recorded.get(k) != definition[k]]
    if differ:
        was = " ".join(
            f"--{k.replace('_', '-')}" + ("" if k == "search_space" else f" {recorded.get(k)}") for k in differ
        )
        raise SettingsError(
            f"{flag}: study {study.study_name!r} was created with other settings ({was}); continue it with "
            "those, or start a new study with another --study-name"
        )


def check_study(
    storage: str, name: str, method: SearchMethod, definition: dict | None, resume: bool, join: bool
) -> None:
    """Before any work: `resume` needs the study, a new study needs its name free, and a study
    continued (`resume`, `join`) its own settings."""
    try:
        exists = while_schema_settles(lambda: study_exists(storage, name))
    except Exception as error:
        raise SettingsError(
            f"cannot read Optuna storage {masked(storage)} ({type(error).__name__}: {one_line(error)})"
        ) from error
    if resume and not exists:
        raise SettingsError(f"--resume: no study named {name!r} in {masked(storage)}")
    if exists and not (resume or join):
        raise SettingsError(
            f"a study named {name!r} exists in {masked(storage)}; pass --resume or another --study-name"
        )
    if exists:
        try:
            study = optuna.load_study(study_name=name, storage=open_storage(storage))
        except Exception as error:  # a storage of another Optuna version, or not Optuna's at all
            raise SettingsError(f"cannot read study {name!r} in {masked(storage)} ({one_line(error)})") from error
        check_continuation(study, method, definition, "--resume" if resume else "--join")
        if resume and FINAL_ATTR in study.user_attrs:
            raise StudyFinished(study)


class StudyFinished(Exception):
    """`--resume` of a study that ended (its search and its best's final training): nothing to do.
    Its message is the one line that says so."""

    def __init__(self, study: optuna.Study):
        best = best_trial(study)
        found = "no trial within its limits" if best is None else f"best trial {best.number}"
        final = study.user_attrs[FINAL_ATTR]
        retrained = f"final MLflow run {final}" if final else "no final training"
        super().__init__(f"Study {study.study_name!r} is finished: {found}, {retrained}; nothing to resume")


def open_study(
    method: SearchMethod, storage: str, name: str, resume: bool, join: bool = False, definition: dict | None = None
) -> optuna.Study:
    """A new study (keeping `definition`), or with `resume` the existing one; refuses to silently
    do the other, or to continue a study with other settings. With `join`, the study other
    processes share, whoever creates it first."""
    check_study(storage, name, method, definition, resume, join)
    if join:
        study = while_schema_settles(
            lambda: optuna.create_study(
                storage=open_storage(storage), study_name=name, directions=list(method.directions), load_if_exists=True
            )
        )
    elif resume:
        return optuna.load_study(study_name=name, storage=open_storage(storage))
    else:
        study = optuna.create_study(storage=open_storage(storage), study_name=name, directions=list(method.directions))
    if definition is not None and DEFINITION_ATTR not in study.user_attrs:
        study.set_user_attr(DEFINITION_ATTR, definition)
    check_continuation(study, method, definition, "--join")  # a joiner that created it at the same time
    return study


def run_search(
    method: SearchMethod,
    study: optuna.Study,
    space: SearchSpace,
    scope: str,
    clients: int,
    trainer: Trainer,
    budget: int,
    n_configs: int,
    seed: int,
    fixed: TrainSettings | None = None,
    data=None,
    workers: int = 1,
    join: bool = False,
    stop: Event | None = None,
    unit: str = "rounds",
    round_cost: float = 1.0,
    lease: LeaseTerms = LeaseTerms(),
) -> Budget:
    """Settle the trials an earlier process left RUNNING (unless other processes share the study:
    `join`), charge recorded trials to the budget, then search, the budget owned by the driver
    (`SearchContext`). Interrupted, it settles the trials it started before the interrupt goes on:
    finished training is told (or paused, for a method that pauses trials), the rest FAIL (or kept
    for a method that keeps the trials it asked for); a trial the method left RUNNING is settled
    the same way (`settle_interrupted_trials`). The sampler is seeded from the seed and the
    study's length, so a resumed study draws new points. `stop`, once set, has trials in training
    end at their round's end. The budget is in `unit`, a round of the fixed settings costing
    `round_cost` in it (`TuneSettings.budget_of`). Returns what the study spent, by every process.

    Throughout, the trials this process trains are held by leases renewed every `lease.period_s`
    (`leases.Leases`). With `join`, a trial of another process whose lease went `lease.grace_s`
    unrenewed is settled here as `--resume` would, and once its search is done this process stays
    while other processes' trials run, searching again each time one ends (a failed one's room is
    asked again): the last process of the study ends with it, nothing left RUNNING."""
    if not join:
        settle_interrupted_trials(study, method)
    parameters = space.parameters(scope, clients)
    # Processes joining one study must not draw the same stream: each adds a key of its own (a
    # shared study's order of trials is not reproducible anyway).
    keys = (seeding.SEARCH, len(study.trials), *((secrets.randbits(32),) if join else ()))
    study.sampler = method.sampler(parameters, int(seeding.numpy_rng(seed, *keys).integers(2**31)))
    spent = Budget(budget, unit, round_cost, study_spent(study, unit))
    context = SearchContext(
        study, method, parameters, trainer, spent, n_configs, seed, fixed, data, workers, stop or Event()
    )
    study.pruner = method.pruner(context)

    def held() -> set[int]:
        with context.lock:
            return set(context.started)

    def stopping() -> None:
        if context.stop.is_set():
            raise context.interrupt()

    with Leases(study, method, held, lease, watch=join) as leases:
        try:
            method.search(context)
            if join:
                leases.outlast(lambda: method.search(context), stopping)
        finally:
            settle_interrupted_trials(study, method, context.started if join else None)
    return Budget(budget, unit, round_cost, study_spent(study, unit))


def limits_text(limits) -> str:
    """The study's limits as a user writes them: "epsilon <= 8"."""
    return ", ".join(f"{name} <= {limit:g}" for name, limit in limits.items())


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial within the study's limits (Optuna's constraints); with several
    objectives, the best scored on the Pareto front. None when no trial is within them."""
    if len(study.directions) > 1:
        sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
        return max(study.best_trials, key=lambda t: sign * t.values[0], default=None)
    try:
        return study.best_trial
    except ValueError:  # no feasible complete trial
        return None
