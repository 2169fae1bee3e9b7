"""Search spaces: which settings a study tunes, over which values, for one or for every client.

Declared as a dict or a YAML file mapping a setting to its domain:

    lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
    local_epochs: {type: int, low: 1, high: 5}
    weight_decay: {type: categorical, choices: [0, 1.0e-4, 1.0e-2]}

Client settings (`CLIENT_SETTINGS`, fields of `ClientConfig`) can be `personalized`: one value per
client, so the space is H^N as for the FedTune paper's baselines. Server settings stay global.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from itertools import product
from pathlib import Path

import optuna
import yaml

from fedhpo_core.settings import ClientConfig, SettingsError, TrainSettings

# The documented tunable settings (docs/tune.md): a new ClientConfig field is not tunable until listed.
CLIENT_SETTINGS = (
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "local_epochs",
    "mu",
    "finetune_steps",
    "finetune_lr",
    "ditto_lambda",
    "compression",
    "compression_bits",
    "compression_bucket",
    "topk_fraction",
)
SERVER_SETTINGS = ("server_lr", "beta1", "participation", "dp_clip", "dp_noise", "deadline_s", "compress_downloads")
SCOPES = ("global", "personalized")
WORD_SETTINGS = ("compression",)  # tunable settings whose values are words, not numbers

# FedTune paper, section 4.1: 5 learning rates x 6 weight decays.
FEDTUNE_SPACE = {
    "lr": {"type": "categorical", "choices": [1e-1, 5e-2, 1e-2, 5e-3, 1e-3]},
    "weight_decay": {"type": "categorical", "choices": [0.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]},
}


def _distribution(name: str, spec) -> optuna.distributions.BaseDistribution:
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise SettingsError(f"search space entry {name!r} needs a mapping with 'type'")
    kind = spec["type"]
    try:
        if kind == "categorical":
            # A tunable setting is a number unless it is named by a word (compression); YAML 1.1
            # reads 1e-3 (no dot) as a string.
            words = name in WORD_SETTINGS
            choices = tuple(c if isinstance(c, int | float) or words else float(c) for c in spec["choices"])
            if not choices:
                raise SettingsError(f"search space entry {name!r} has no choices")
            return optuna.distributions.CategoricalDistribution(choices)
        if kind in ("float", "int"):
            number = float if kind == "float" else int
            low, high, log = number(spec["low"]), number(spec["high"]), bool(spec.get("log", False))
            if not low <= high or (log and low <= 0):
                raise SettingsError(f"search space entry {name!r} needs low <= high (and low > 0 with log)")
            if kind == "float":
                return optuna.distributions.FloatDistribution(low, high, log=log)
            return optuna.distributions.IntDistribution(low, high, log=log)
    except (KeyError, TypeError, ValueError) as error:
        raise SettingsError(f"search space entry {name!r} is malformed: {error}") from error
    raise SettingsError(f"search space entry {name!r} has unknown type {kind!r}; use float, int or categorical")


@dataclass(frozen=True)
class SearchSpace:
    """Named Optuna distributions over client and server settings."""

    distributions: Mapping[str, optuna.distributions.BaseDistribution]

    @classmethod
    def from_dict(cls, declared: Mapping) -> "SearchSpace":
        if declared is not None and not isinstance(declared, Mapping):
            kind = type(declared).__name__
            raise SettingsError(
                f"the search space must map settings to domains (lr: {{type: float, ...}}), got a {kind}"
            )
        if not declared:
            raise SettingsError("the search space is empty; declare at least one setting")
        unknown = set(declared) - set(CLIENT_SETTINGS) - set(SERVER_SETTINGS)
        if unknown:
            raise SettingsError(
                f"search space names unknown settings {sorted(unknown)}; "
                f"tunable: {', '.join(CLIENT_SETTINGS + SERVER_SETTINGS)}"
            )
        return cls({name: _distribution(name, spec) for name, spec in declared.items()})

    @classmethod
    def load(cls, path: str | None) -> "SearchSpace":
        """From a YAML file, or the FedTune paper's space when `path` is None."""
        if path is None:
            return cls.from_dict(FEDTUNE_SPACE)
        try:
            declared = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise SettingsError(f"cannot read search space {path}: {' '.join(str(error).split())}") from error
        return cls.from_dict(declared)

    def check(self, fixed: TrainSettings) -> None:
        """Every value the space can give is one the setting accepts (a domain's ends and every
        choice, against the same checks as the command line), before any round is spent."""
        kinds = {f.name: f.type for f in fields(ClientConfig) + fields(TrainSettings)}
        every_setting = {f.name for f in fields(TrainSettings)}
        for name, distribution in self.distributions.items():
            kind = kinds[name]
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                values = distribution.choices
            else:
                values = (distribution.low, distribution.high)
                if kind is int and isinstance(distribution, optuna.distributions.FloatDistribution):
                    raise SettingsError(f"search space entry {name!r}: {name} takes integers; use type int")
            for value in values:
                if kind is int and not float(value).is_integer():
                    raise SettingsError(f"search space entry {name!r}: {name} takes integers, got {value}")
                try:
                    if name in every_setting:  # with the rest of the settings (topk and DP exclude each other)
                        replace(fixed, **{name: value})
                    elif name in CLIENT_SETTINGS:
                        replace(fixed.client_config, **{name: value})
                    else:
                        replace(fixed, **{name: value})
                except SettingsError as error:
                    raise SettingsError(f"search space entry {name!r}: {error}") from error

    def parameters(self, scope: str, clients: int) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna parameter names: `lr` in global scope; `lr/client_<i>` per client in personalized."""
        names = {}
        for name, distribution in self.distributions.items():
            if scope == "personalized" and name in CLIENT_SETTINGS:
                names.update({client_key(name, c): distribution for c in range(clients)})
            else:
                names[name] = distribution
        return names


def client_key(name: str, client: int) -> str:
    """The per-client name of a setting, `lr/client_3`: Optuna's parameters of personalized
    studies and what round-level tuners settle on per client."""
    return f"{name}/client_{client}"


def setting_of(key: str) -> str:
    """The setting a name is of: `lr/client_3` and `lr` are both `lr`."""
    return key.split("/")[0]


def grid_points(parameters: Mapping[str, optuna.distributions.BaseDistribution]) -> list[dict]:
    """Every combination of the choices of categorical settings, in declaration order."""
    numeric = [n for n, d in parameters.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
    if numeric:
        raise SettingsError(f"grid search needs categorical settings; {', '.join(numeric)} are not")
    names = list(parameters)
    return [dict(zip(names, point, strict=True)) for point in product(*(parameters[n].choices for n in names))]


@dataclass(frozen=True)
class Configuration:
    """One point of a search space, applied to the fixed settings of a study."""

    values: Mapping[str, object]  # Optuna parameter name -> value

    def text(self) -> str:
        """The configuration as users read it: 'lr 0.1, weight_decay 0.0001'."""
        return ", ".join(f"{k} {v}" for k, v in self.values.items())

    def settings(self, fixed: TrainSettings) -> TrainSettings:
        """The fixed settings with the global (and server) values of this configuration."""
        global_values = {k: v for k, v in self.values.items() if "/" not in k}
        return replace(fixed, **global_values)

    def client_configs(self, fixed: TrainSettings) -> list[ClientConfig]:
        """Each client's configuration: personalized values override the global ones."""
        base = self.settings(fixed).client_config
        configs = []
        for client in range(fixed.clients):
            own = {setting_of(k): v for k, v in self.values.items() if k == client_key(setting_of(k), client)}
            configs.append(replace(base, **own))
        return configs
