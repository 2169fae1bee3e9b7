"""The method registry: every search method declares itself, once, where it is written.

A method's module calls `register(Method(...))` with its name, kind (trial-level or round-level),
paper, options (a frozen `Options` dataclass whose fields carry their help), the `SearchMethod`
class built from those options, and what it reports. The command line's flags, the flows'
`options` parameter, `fedhpo compare`'s per-method options and `fedhpo methods` are generated from
these declarations; nothing else lists methods.

Where declarations come from (`methods()`): every module of the packages `fedhpo_core.search` and
`fedhpo_core.tuners` (a new method is a new file there), modules named by the entry-point group
`fedhpo.methods` (installed plugins), and any module that calls `register` before a command runs
(a test's toy method).
"""

import importlib
import math
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from fedhpo_core.settings import SettingsError

if TYPE_CHECKING:
    from fedhpo_core.search.base import SearchMethod

TRIAL, ROUND = "trial-level", "round-level"
PACKAGES = ("fedhpo_core.search", "fedhpo_core.tuners")
ENTRY_POINTS = "fedhpo.methods"


def option(default, help: str, choices: tuple | None = None, low: float | None = None):
    """An options field: its default, its help text and, optionally, its choices or lower bound."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low})


@dataclass(frozen=True)
class Options:
    """A method's options, validated when made: choices, lower bounds, finite numbers and types.
    A method with options subclasses it with frozen fields made by `option`."""

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            kind = type(f.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SettingsError(f"option {f.name} must be a {kind.__name__}, got {value!r}")
            if meta["choices"] and value not in meta["choices"]:
                raise SettingsError(
                    f"option {f.name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"option {f.name} must be a finite number, got {value}")
            if meta["low"] is not None and value < meta["low"]:
                raise SettingsError(f"option {f.name} must be >= {meta['low']:g}, got {value}")


@dataclass(frozen=True)
class Method:
    """One method's declaration."""

    name: str
    kind: str  # TRIAL or ROUND
    paper: str  # who wrote it down, where ("ours" for fedhpo's own)
    summary: str  # one line
    search: Callable[[Options], "SearchMethod"]  # a SearchMethod class taking the options
    options: type[Options] = Options
    defaults: Mapping[str, object] = field(default_factory=dict)  # a variant's defaults (a paper's)
    reports: tuple[str, ...] = ()  # artifacts the method adds under study/ in the study's MLflow run
    attributes: tuple[str, ...] = ()  # Optuna trial attributes of its own

    def __post_init__(self):
        if self.kind not in (TRIAL, ROUND):
            raise ValueError(f"method {self.name}: kind must be {TRIAL} or {ROUND}, not {self.kind!r}")
        self.make_options()  # a variant's defaults are valid options

    @property
    def parallel(self) -> bool:
        return self.search.parallel

    @property
    def statistics(self) -> tuple:
        """The client statistics its tuner asks every client for (`fedhpo_core.statistics`)."""
        return getattr(self.search, "statistics", ())

    def make_options(self, given: Mapping[str, object] | None = None) -> Options:
        """The options with `given` values over the defaults; a one-line SettingsError for a name
        the method does not have or a value it refuses."""
        given = dict(given or {})
        names = {f.name for f in fields(self.options)}
        if unknown := sorted(set(given) - names):
            owners = declared_by(unknown[0])
            where = f"an option of {', '.join(owners)}" if owners else "no method's option"
            raise SettingsError(f"--{flag(unknown[0])} is {where}, not of {self.name}")
        try:
            return self.options(**(dict(self.defaults) | given))
        except TypeError as error:  # a dataclass without such a field
            raise SettingsError(f"{self.name}: {error}") from error

    def changed(self, options: Options) -> dict[str, object]:
        """The options that differ from the method's defaults, in declaration order."""
        default = asdict(self.make_options())
        return {k: v for k, v in asdict(options).items() if v != default[k]}

    def build(self, given: Mapping[str, object] | None = None) -> "SearchMethod":
        """The search method, with its options."""
        return self.search(self.make_options(given))


_registered: dict[str, Method] = {}
_discovered = False
_discovery = threading.RLock()  # threads asking at once wait for one discovery to finish


def register(method: Method) -> Method:
    """Declare a method. A name is one method: declaring another under it is an error."""
    known = _registered.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"method {method.name!r} is declared twice")
    for f in fields(method.options):
        for other in _registered.values():
            same = next((g for g in fields(other.options) if g.name == f.name), None)
            if same is not None and type(same.default) is not type(f.default):
                raise ValueError(f"option {f.name} of {method.name} and {other.name} must have one type")
    _registered[method.name] = method
    return method


def _discover() -> None:
    """Import every module that declares methods, once. Another thread asking meanwhile waits for
    it (it would see half the methods); a module asking while it is imported sees those so far."""
    global _discovered
    with _discovery:
        if _discovered:
            return
        _discovered = True
        try:
            for package in PACKAGES:
                for module in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
                    importlib.import_module(module.name)
            for entry in entry_points(group=ENTRY_POINTS):
                entry.load()
        except BaseException:
            _discovered = False
            raise


def methods() -> dict[str, Method]:
    """Every declared method by name: trial-level first, each kind in the order declared."""
    _discover()
    ordered = sorted(_registered.values(), key=lambda m: m.kind != TRIAL)
    return {m.name: m for m in ordered}


def method(name: str) -> Method:
    """The declaration of `name`, or a one-line SettingsError naming the choices."""
    known = methods()
    if name not in known:
        raise SettingsError(f"unknown method {name!r}; choose from {', '.join(known)}")
    return known[name]


def flag(name: str) -> str:
    return name.replace("_", "-")


def declared_by(option_name: str) -> list[str]:
    """The methods that have an option of this name."""
    return [m.name for m in methods().values() if any(f.name == option_name for f in fields(m.options))]


def option_fields() -> dict[str, list[tuple[Method, object]]]:
    """Every option name, with each method declaring it and its field (defaults and help per method)."""
    by_name: dict[str, list] = {}
    for m in methods().values():
        for f in fields(m.options):
            by_name.setdefault(f.name, []).append((m, f))
    return by_name


def default_of(method: Method, f) -> object:
    """An option's default for `method` (a variant's own default where it sets one)."""
    if f.name in method.defaults:
        return method.defaults[f.name]
    return f.default if f.default is not MISSING else f.default_factory()


def parse_value(kind: type, text: str):
    """An option's value from the command line, as its field's type."""
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    return kind(text)
