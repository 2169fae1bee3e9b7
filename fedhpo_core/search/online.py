"""Round-level methods as searches: the whole budget is one federated run of `budget` rounds whose
client configurations a `Tuner` changes as it goes. One Optuna trial records the run; its
parameters are the configuration the tuner settles on, retrained from scratch like any other."""

from abc import abstractmethod
from dataclasses import asdict, dataclass

import numpy as np
import optuna

from fedhpo_core.federation import Federation
from fedhpo_core.registry import ROUND, Method, Options, option, register
from fedhpo_core.search.base import SearchContext, SearchMethod, finished_trials, recorded_result, rounds_used
from fedhpo_core.search.space import CLIENT_SETTINGS, Configuration, grid_points, grid_size, setting_of
from fedhpo_core.settings import ClientConfig, SettingsError
from fedhpo_core.tuners.base import Tuner
from fedhpo_core.tuners.fedex import BASELINES as FEDEX_BASELINES
from fedhpo_core.tuners.fedex import SCHEDULES, SIGNALS, FedEx
from fedhpo_core.tuners.fedhyper import SCHEDULERS, FedHyper
from fedhpo_core.tuners.fedtune import ADVANTAGES, CREDITS, FedTune
from fedhpo_core.tuners.stepwise import BASELINES as STEPWISE_BASELINES
from fedhpo_core.tuners.stepwise import CHOICES, FEEDBACKS, Stepwise

OUTER_CONFIGS = 3  # random-search draws of server settings around FedEx: few, so each run can learn


def draw(distribution: optuna.distributions.BaseDistribution, rng: np.random.Generator):
    """One value from an Optuna distribution: uniform, or log-uniform where it is log-scaled."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[rng.integers(len(distribution.choices))]
    low, high = distribution.low, distribution.high
    value = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if distribution.log else rng.uniform(low, high)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return int(min(high, max(low, round(value))))
    return float(value)


def candidate_values(parameters, n: int, seed: int) -> list[dict]:
    """The grid when every setting is categorical; else n points drawn from the distributions."""
    if all(isinstance(d, optuna.distributions.CategoricalDistribution) for d in parameters.values()):
        return grid_points(parameters)
    rng = np.random.default_rng(seed)
    return [{name: draw(distribution, rng) for name, distribution in parameters.items()} for _ in range(n)]


def fixed_values(context: SearchContext, values: list[dict]) -> dict:
    """The study's fixed values of the settings the candidates vary."""
    return {name: getattr(context.fixed.client_config, name) for name in (values[0] if values else {})}


class OnlineSearch(SearchMethod):
    """A round-level tuner over candidate client configurations (the grid of the space's client
    settings, or n draws from it). Without server settings in the space, the whole budget is one
    run; a method that allows them (FedEx) is wrapped in a random search over them: `OUTER_CONFIGS`
    draws, the budget split evenly, one run each. What a tuner settles on is stored with its trial
    (`CHOSEN_ATTR`) and retrained together with the trial's server settings.

    A run is checkpointed with its tuner's state as it goes (`Trainer`): one interrupted or killed
    is left paused at its last checkpoint, and `--resume` continues it there, its tuner rebuilt
    and restored, so that it ends as the uninterrupted run would."""

    allows_server_settings = False
    pauses_trials = True

    def sampler(self, parameters, seed):
        server = [n for n in parameters if setting_of(n) not in CLIENT_SETTINGS]
        if server and not self.allows_server_settings:
            raise SettingsError(f"{type(self).__name__} tunes client settings only; drop {', '.join(server)}")
        client = {setting_of(n): d for n, d in parameters.items() if setting_of(n) in CLIENT_SETTINGS}
        if client and all(isinstance(d, optuna.distributions.CategoricalDistribution) for d in client.values()):
            grid_size(client)  # the candidates are this grid (`candidate_values`): refused up front if too large
        return optuna.samplers.RandomSampler(seed=seed)

    def check_budget(self, budget, n_configs):
        if budget < OUTER_CONFIGS:
            raise SettingsError(f"budget must be >= {OUTER_CONFIGS} rounds, got {budget}")

    @abstractmethod
    def tuner(self, context: SearchContext, configs: list[ClientConfig], values: list[dict]) -> Tuner:
        """The round-level tuner over these candidate configurations."""

    def tuner_for(self, context: SearchContext) -> Tuner:
        """A fresh tuner over the candidate configurations of the context's client settings."""
        client = {setting_of(n): d for n, d in context.parameters.items() if setting_of(n) in CLIENT_SETTINGS}
        values = candidate_values(client, context.n_configs, context.seed)
        configs = [Configuration(v).settings(context.fixed).client_config for v in values]
        return self.tuner(context, configs, values)

    def search(self, context: SearchContext) -> None:
        """The runs paused by an interrupt or a kill first, each continued from its checkpoint for
        the rest of its rounds; then new runs while the budget funds one."""
        server = {n: d for n, d in context.parameters.items() if setting_of(n) not in CLIENT_SETTINGS}
        runs = OUTER_CONFIGS if server else 1
        rounds = context.budget.total // runs
        for paused in context.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            trial = optuna.trial.Trial(context.study, paused._trial_id)
            self.run(context, trial, rounds - rounds_used(paused), start_from=trial)
        while len(finished_trials(context.study)) < runs and context.budget.remaining >= rounds:
            self.run(context, context.study.ask(server), rounds)

    def run(self, context: SearchContext, trial: optuna.trial.Trial, rounds: int, start_from=None) -> None:
        result = recorded_result(trial) if rounds <= 0 else None  # killed once its last round was recorded
        if result is None:
            tuner = self.tuner_for(context)
            result = context.train(trial, Configuration(trial.params), rounds, tuner, start_from=start_from)
        context.complete(trial, result)


@dataclass(frozen=True)
class FedTuneOptions(Options):
    credit: str = option(
        "local", "fedtune: a client's credit: local (its validation log-ratio), mixture (eq. 12), update", CREDITS
    )
    advantage: str = option("fitted", "fedtune: credit (the paper) or fitted (less a fitted baseline)", ADVANTAGES)
    shared: bool = option(True, "fedtune: clients' logits share a part b (false: the paper's per-client pi_i)")
    factorized: bool = option(True, "fedtune, fedex: one distribution per setting of a grid (false: one over all)")
    eta: float = option(0.5, "fedtune: step size of eq. 11", low=0.0)


class FedTuneSearch(OnlineSearch):
    """FedTune (`fedhpo_core.tuners.fedtune`): a configuration per client."""

    statistics = FedTune.statistics

    def tuner(self, context, configs, values):
        data = context.data
        fixed = fixed_values(context, values)
        return FedTune(
            configs,
            values,
            len(data.clients),
            data.spec,
            data.server_val,
            context.seed,
            fixed=fixed,
            **asdict(self.options),
        )


@dataclass(frozen=True)
class FedExOptions(Options):
    signal: str = option(
        "log-ratio", "fedex: a client's signal: after, difference or log-ratio of its val loss", SIGNALS
    )
    baseline: str = option(
        "fitted", "fedex: previous, round or fitted; stepwise: none or window (the mean gain of 3 rounds)"
    )
    schedule: str = option("auto", "fedex: the step size schedule eta_t", SCHEDULES)
    factorized: bool = option(True, "fedtune, fedex: one distribution per setting of a grid (false: one over all)")

    def __post_init__(self):
        super().__post_init__()
        if self.baseline not in FEDEX_BASELINES:
            raise SettingsError(f"fedex's baseline must be one of {', '.join(FEDEX_BASELINES)}, got {self.baseline!r}")


class FedExSearch(OnlineSearch):
    """FedEx (`fedhpo_core.tuners.fedex`): one configuration for all clients; server settings in the
    space are searched around it by random search, as Khodak et al. wrap FedEx."""

    allows_server_settings = True
    statistics = FedEx.statistics

    def tuner(self, context, configs, values):
        return FedEx(configs, values, context.seed, fixed=fixed_values(context, values), **asdict(self.options))


@dataclass(frozen=True)
class StepwiseOptions(Options):
    feedback: str = option("log-error", "stepwise: the round's gain: difference or log-error of accuracies", FEEDBACKS)
    baseline: str = option(
        "window", "fedex: previous, round or fitted; stepwise: none or window (the mean gain of 3 rounds)"
    )
    choice: str = option(
        "mean", "stepwise: what it settles on: best (single round) or mean (per configuration)", CHOICES
    )

    def __post_init__(self):
        super().__post_init__()
        if self.baseline not in STEPWISE_BASELINES:
            raise SettingsError(
                f"stepwise's baseline must be one of {', '.join(STEPWISE_BASELINES)}, got {self.baseline!r}"
            )


class StepwiseSearch(OnlineSearch):
    """Step-wise adaptive Optuna with straggler-aware selection (`fedhpo_core.tuners.stepwise`)."""

    def use_score(self, metric):
        if metric.name != "acc":
            raise SettingsError(
                "stepwise's feedback is the gain in accuracy (from chance): "
                f"it cannot tune a task scored by {metric.name}"
            )
        super().use_score(metric)

    def tuner(self, context, configs, values):
        global_parameters = {setting_of(n): d for n, d in context.parameters.items()}
        base = context.fixed.client_config
        seconds = Federation.of(context.data, context.fixed).client_seconds(base.local_epochs)
        return Stepwise(
            global_parameters, base, seconds, context.data.spec.outputs, context.seed, **asdict(self.options)
        )


@dataclass(frozen=True)
class FedHyperOptions(Options):
    schedulers: str = option(",".join(SCHEDULERS), "fedhyper's schedulers, comma-separated: " + ", ".join(SCHEDULERS))

    def __post_init__(self):
        super().__post_init__()
        unknown = [name for name in self.schedulers.split(",") if name not in SCHEDULERS]
        if unknown:
            raise SettingsError(
                f"unknown FedHyper scheduler {unknown[0]!r}; choose from {', '.join(SCHEDULERS)}, comma-separated"
            )


class FedHyperSearch(OnlineSearch):
    """FedHyper (`fedhpo_core.tuners.fedhyper`) with the named schedulers, from the fixed settings'
    learning rate; the search space is not sampled."""

    def tuner(self, context, configs, values):
        return self.final_tuner(context.fixed)

    def final_tuner(self, fixed):
        """FedHyper schedules during training itself: the final run is a scheduled run again."""
        return FedHyper(fixed.client_config, tuple(self.options.schedulers.split(",")))


register(
    Method(
        "fedtune",
        ROUND,
        "FedTune, differentiable personalized HPO (../shared/papers/fedtune-differentiable-personalized-hpo.md)",
        "a categorical distribution over the candidates per client, moved by policy gradient (eq. 11) each round",
        FedTuneSearch,
        FedTuneOptions,
    )
)
register(
    Method(
        "fedtune-paper",
        ROUND,
        "FedTune as the paper writes it",
        "fedtune with the paper's options (mixture credit, no baseline, per-client pi_i, joint, eta 1)",
        FedTuneSearch,
        FedTuneOptions,
        defaults=FedTune.PAPER,
    )
)
register(
    Method(
        "fedex",
        ROUND,
        "Khodak et al., NeurIPS 2021, Algorithm 1 (reference mkhodak/FedEx)",
        "one distribution over configurations for all clients, an exponentiated-gradient step each round",
        FedExSearch,
        FedExOptions,
    )
)
register(
    Method(
        "fedex-paper",
        ROUND,
        "FedEx as Khodak et al. and their reference code set it",
        "fedex with the paper's options (after, previous, auto, joint)",
        FedExSearch,
        FedExOptions,
        defaults=FedEx.PAPER,
    )
)
register(
    Method(
        "stepwise",
        ROUND,
        "Step-wise adaptive HPO, arXiv 2411.12244",
        "Optuna asked and told each round, with straggler-aware client selection",
        StepwiseSearch,
        StepwiseOptions,
    )
)
register(
    Method(
        "stepwise-paper",
        ROUND,
        "Step-wise adaptive HPO as arXiv 2411.12244 writes it",
        "stepwise with accuracy differences as feedback and the best single round's configuration",
        StepwiseSearch,
        StepwiseOptions,
        defaults=Stepwise.PAPER,
    )
)
register(
    Method(
        "fedhyper",
        ROUND,
        "Wu et al., arXiv 2310.03156 (reference ATP-1010/FedHyper)",
        "hypergradient learning-rate schedulers (global, server-local, client-local) during training",
        FedHyperSearch,
        FedHyperOptions,
    )
)
