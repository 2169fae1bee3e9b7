"""Search spaces: which settings a study tunes, over which values, for one or for every client.

Declared as a dict or a YAML file mapping a setting to its domain:

    lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
    local_epochs: {type: int, low: 1, high: 5}
    weight_decay: {type: categorical, choices: [0, 1.0e-4, 1.0e-2]}

Client settings (`CLIENT_SETTINGS`, fields of `ClientConfig`) can be `personalized`: one value per
client, so the space is H^N as for the FedTune paper's baselines. Server settings stay global.

A space means what it says or is refused in one line naming the entry (docs/tune.md): no rounded
bounds, no truthy strings, no duplicate or unknown keys, and bounds on what reading the file and
enumerating a grid can cost.
"""

import math
import re
import reprlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, fields, replace
from itertools import product
from pathlib import Path

import optuna
import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from fedhpo_core.errors import one_line
from fedhpo_core.settings import ClientConfig, SettingsError, TrainSettings
from fedhpo_core.task import check_batch_size

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
ENTRY_KEYS = {  # what an entry of each type takes; `log` is optional
    "float": ("type", "low", "high", "log"),
    "int": ("type", "low", "high", "log"),
    "categorical": ("type", "choices"),
}

# Bounds on what a search space may cost before a round is trained (docs/tune.md).
MAX_SPACE_BYTES = 64 * 1024  # a search space is a few lines; a larger file is refused unread
MAX_DEPTH = 16  # YAML nesting; a space needs four levels
MAX_GRID_POINTS = 100_000  # grid points enumerated (a personalized grid multiplies per client)

# FedTune paper, section 4.1: 5 learning rates x 6 weight decays.
FEDTUNE_SPACE = {
    "lr": {"type": "categorical", "choices": [1e-1, 5e-2, 1e-2, 5e-3, 1e-3]},
    "weight_decay": {"type": "categorical", "choices": [0.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]},
}


class StrictLoader(yaml.SafeLoader):
    """Safe YAML read as written: a duplicated key is refused (the last would win unseen), so are
    anchors, aliases and merge keys (a few lines of aliases expand to gigabytes) and nesting deeper
    than `MAX_DEPTH` (the composer recurses); `1e-3` is a number, as in YAML 1.2, not a string."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ComposerError(None, None, "anchors and aliases (& and *) are not allowed", event.start_mark)
        if self.depth == MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConstructorError(None, None, "merge keys (<<) are not allowed", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise ConstructorError(None, None, f"duplicate key {shown(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def shown(value) -> str:
    """A value as the user wrote it, cut short (a refusal is one short line whatever the input)."""
    return reprlib.repr(value)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _bound(name: str, key: str, value, kind: str) -> int | float:
    """A range's end as written: a finite number, and for an int range a whole one (never rounded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"search space entry {name!r}: {key} must be a number, got {shown(value)}")
    if not _finite(value):
        raise SettingsError(f"search space entry {name!r}: {name} must be a finite number, got {key} {shown(value)}")
    if kind == "float":
        return float(value)
    if not float(value).is_integer():
        raise SettingsError(f"search space entry {name!r}: an int range takes whole bounds, got {key} {value}")
    return int(value)


def _choices(name: str, declared) -> tuple:
    """Distinct choices: words for `WORD_SETTINGS`, finite numbers for the others."""
    if not isinstance(declared, list | tuple):
        raise SettingsError(f"search space entry {name!r}: choices must be a list, got {shown(declared)}")
    if not declared:
        raise SettingsError(f"search space entry {name!r} has no choices")
    seen = set()
    for choice in declared:
        if name in WORD_SETTINGS:
            if not isinstance(choice, str):
                raise SettingsError(f"search space entry {name!r}: {name} takes words, got {shown(choice)}")
        elif isinstance(choice, bool) or not isinstance(choice, int | float) or not _finite(choice):
            raise SettingsError(f"search space entry {name!r}: choices must be finite numbers, got {shown(choice)}")
        if choice in seen:
            raise SettingsError(f"search space entry {name!r}: choice {shown(choice)} is given twice")
        seen.add(choice)
    return tuple(declared)


def _distribution(name: str, spec) -> optuna.distributions.BaseDistribution:
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise SettingsError(f"search space entry {name!r} needs a mapping with 'type'")
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in ENTRY_KEYS:
        raise SettingsError(
            f"search space entry {name!r} has unknown type {shown(kind)}; use float, int or categorical"
        )
    unknown = [shown(key) for key in spec if key not in ENTRY_KEYS[kind]]
    if unknown:
        raise SettingsError(
            f"search space entry {name!r} has unknown keys [{', '.join(unknown)}]; "
            f"{kind} entries take {', '.join(ENTRY_KEYS[kind])}"
        )
    missing = [key for key in ENTRY_KEYS[kind] if key not in spec and key != "log"]
    if missing:
        raise SettingsError(f"search space entry {name!r} is malformed: {kind} entries need {', '.join(missing)}")
    if kind == "categorical":
        return optuna.distributions.CategoricalDistribution(_choices(name, spec["choices"]))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SettingsError(f"search space entry {name!r}: log must be true or false, got {shown(log)}")
    low, high = (_bound(name, key, spec[key], kind) for key in ("low", "high"))
    if not low <= high or (log and low <= 0):
        raise SettingsError(f"search space entry {name!r} needs low <= high (and low > 0 with log)")
    if kind == "float":
        return optuna.distributions.FloatDistribution(low, high, log=log)
    return optuna.distributions.IntDistribution(low, high, log=log)


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem and error.problem_mark:
        mark = error.problem_mark
        problem = ": ".join(filter(None, (error.context, error.problem)))
        return one_line(f"{problem} (line {mark.line + 1}, column {mark.column + 1})")
    return one_line(error)


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
        odd = [name for name in declared if not isinstance(name, str)]
        if odd:
            raise SettingsError(f"search space settings are named by words, got {shown(odd[0])}")
        unknown = sorted(set(declared) - set(CLIENT_SETTINGS) - set(SERVER_SETTINGS))
        if unknown:
            raise SettingsError(
                f"search space names unknown settings [{', '.join(map(shown, unknown))}]; "
                f"tunable: {', '.join(CLIENT_SETTINGS + SERVER_SETTINGS)}"
            )
        return cls({name: _distribution(name, spec) for name, spec in declared.items()})

    @classmethod
    def load(cls, path: str | None) -> "SearchSpace":
        """From a YAML file (at most `MAX_SPACE_BYTES`, read by `StrictLoader`), or the FedTune
        paper's space when `path` is None."""
        if path is None:
            return cls.from_dict(FEDTUNE_SPACE)
        file, named = Path(path), repr(str(path))
        if not file.is_file():
            raise SettingsError(f"search space {named} {'is not a file' if file.exists() else 'does not exist'}")
        try:
            with file.open("rb") as stream:
                data = stream.read(MAX_SPACE_BYTES + 1)
        except OSError as error:
            raise SettingsError(f"cannot read search space {named}: {error.strerror}") from error
        if len(data) > MAX_SPACE_BYTES:
            raise SettingsError(f"search space {named} is larger than {MAX_SPACE_BYTES} bytes")
        try:
            declared = yaml.load(data.decode("utf-8"), Loader=StrictLoader)
        except UnicodeDecodeError as error:
            raise SettingsError(f"search space {named} is not UTF-8 text (byte {error.start})") from error
        except yaml.YAMLError as error:
            raise SettingsError(f"cannot read search space {named}: {_yaml_problem(error)}") from error
        except ValueError as error:  # a value YAML cannot make, such as an integer of 5000 digits
            raise SettingsError(f"cannot read search space {named}: {one_line(error)}") from error
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
                    if name == "batch_size":
                        check_batch_size(int(value), fixed)
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


def grid_size(parameters: Mapping[str, optuna.distributions.BaseDistribution]) -> int:
    """How many points the grid of these categorical settings has, counted before any is made and
    refused above `MAX_GRID_POINTS` (a personalized grid of 2 settings x 5 choices over 10 clients
    has 5^20)."""
    numeric = [n for n, d in parameters.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
    if numeric:
        raise SettingsError(f"grid search needs categorical settings; {', '.join(numeric)} are not")
    size = math.prod(len(d.choices) for d in parameters.values())
    if size > MAX_GRID_POINTS:
        count = size if size < 10**15 else f"about 10^{math.floor(math.log10(size))}"
        raise SettingsError(
            f"the grid has {count} points, more than {MAX_GRID_POINTS}; declare fewer choices"
            " (a personalized grid has each client's settings as its own)"
        )
    return size


def grid_points(parameters: Mapping[str, optuna.distributions.BaseDistribution]) -> list[dict]:
    """Every combination of the choices of categorical settings, in declaration order (at most
    `MAX_GRID_POINTS`)."""
    grid_size(parameters)
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
