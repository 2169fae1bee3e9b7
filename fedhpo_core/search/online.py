"""Round-level methods as searches: the whole budget is one federated run of `budget` rounds whose
client configurations a `Tuner` changes as it goes. One Optuna trial records the run; its
parameters are the configuration the tuner settles on, retrained from scratch like any other."""

from abc import abstractmethod

import numpy as np
import optuna

from fedhpo_core.federation import Federation
from fedhpo_core.search.base import SearchContext, SearchMethod, finished_trials
from fedhpo_core.search.space import CLIENT_SETTINGS, Configuration, grid_points, setting_of
from fedhpo_core.settings import ClientConfig, SettingsError
from fedhpo_core.tuners.base import Tuner
from fedhpo_core.tuners.fedex import FedEx
from fedhpo_core.tuners.fedhyper import SCHEDULERS, FedHyper
from fedhpo_core.tuners.fedtune import FedTune
from fedhpo_core.tuners.stepwise import Stepwise

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
    (`CHOSEN_ATTR`) and retrained together with the trial's server settings."""

    allows_server_settings = False

    def sampler(self, parameters, seed):
        server = [n for n in parameters if setting_of(n) not in CLIENT_SETTINGS]
        if server and not self.allows_server_settings:
            raise SettingsError(f"{type(self).__name__} tunes client settings only; drop {', '.join(server)}")
        return optuna.samplers.RandomSampler(seed=seed)

    def check_budget(self, budget, n_configs):
        if budget < OUTER_CONFIGS:
            raise SettingsError(f"budget must be >= {OUTER_CONFIGS} rounds, got {budget}")

    @abstractmethod
    def tuner(self, context: SearchContext, configs: list[ClientConfig], values: list[dict]) -> Tuner:
        """The round-level tuner over these candidate configurations."""

    def search(self, context: SearchContext) -> None:
        client = {setting_of(n): d for n, d in context.parameters.items() if setting_of(n) in CLIENT_SETTINGS}
        server = {n: d for n, d in context.parameters.items() if setting_of(n) not in CLIENT_SETTINGS}
        values = candidate_values(client, context.n_configs, context.seed)
        configs = [Configuration(v).settings(context.fixed).client_config for v in values]
        runs = OUTER_CONFIGS if server else 1
        rounds = context.budget.total // runs
        while len(finished_trials(context.study)) < runs and context.budget.remaining >= rounds:
            trial = context.study.ask(server)
            tuner = self.tuner(context, configs, values)
            context.complete(trial, context.train(trial, Configuration(trial.params), rounds, tuner))


class FedTuneSearch(OnlineSearch):
    """FedTune (`fedhpo_core.tuners.fedtune`): a configuration per client."""

    options: dict = {}  # the tuner's defaults

    def tuner(self, context, configs, values):
        data = context.data
        fixed = fixed_values(context, values)
        return FedTune(
            configs, values, len(data.clients), data.spec, data.server_val, context.seed, fixed=fixed, **self.options
        )


class FedTunePaperSearch(FedTuneSearch):
    """FedTune as the paper writes it (`FedTune.PAPER`)."""

    options = FedTune.PAPER


class FedExSearch(OnlineSearch):
    """FedEx (`fedhpo_core.tuners.fedex`): one configuration for all clients; server settings in the
    space are searched around it by random search, as Khodak et al. wrap FedEx."""

    allows_server_settings = True
    options: dict = {}

    def tuner(self, context, configs, values):
        return FedEx(configs, values, context.seed, fixed=fixed_values(context, values), **self.options)


class FedExPaperSearch(FedExSearch):
    """FedEx with the paper's and reference code's defaults (`FedEx.PAPER`)."""

    options = FedEx.PAPER


class StepwiseSearch(OnlineSearch):
    """Step-wise adaptive Optuna with straggler-aware selection (`fedhpo_core.tuners.stepwise`)."""

    options: dict = {}

    def tuner(self, context, configs, values):
        global_parameters = {setting_of(n): d for n, d in context.parameters.items()}
        base = context.fixed.client_config
        seconds = Federation.of(context.data, context.fixed).client_seconds(base.local_epochs)
        return Stepwise(global_parameters, base, seconds, context.data.spec.num_classes, context.seed, **self.options)


class StepwisePaperSearch(StepwiseSearch):
    """Step-wise with accuracy differences as feedback and the best single round's configuration."""

    options = Stepwise.PAPER


class FedHyperSearch(OnlineSearch):
    """FedHyper (`fedhpo_core.tuners.fedhyper`) with the named schedulers, from the fixed settings'
    learning rate; the search space is not sampled."""

    def __init__(self, schedulers: tuple[str, ...] = SCHEDULERS):
        self.schedulers = schedulers

    def tuner(self, context, configs, values):
        return FedHyper(context.fixed.client_config, self.schedulers)

    def final_tuner(self, fixed):
        """FedHyper schedules during training itself: the final run is a scheduled run again."""
        return FedHyper(fixed.client_config, self.schedulers)
