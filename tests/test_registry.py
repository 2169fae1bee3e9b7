"""The method registry: a method declared in one module (this one) runs through `fedhpo methods`,
`fedhpo tune` and `fedhpo compare` without any other file knowing it; options are validated and
built once per study."""

import subprocess
import sys
from dataclasses import dataclass, fields

import optuna
import pytest

import flows.comparison  # noqa: F401 - Prefect, imported before capsys, binds its logging to the real stderr
from cli.main import main
from fedhpo_core.registry import ROUND, Method, Options, method, methods, option, register
from fedhpo_core.search.online import OnlineSearch
from fedhpo_core.search.study import TuneSettings
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.tuners import FixedConfig

FIXED = ["--clients", "3", "--experiment", "registry"]


@dataclass(frozen=True)
class ToyOptions(Options):
    toy_lr: float = option(0.02, "toy: the learning rate every client trains with, every round", low=1e-6)


class ToySearch(OnlineSearch):
    """A round-level method that only trains with its option's learning rate: what it settles on
    shows that the option reached it."""

    builds = 0

    def __init__(self, options=None):
        super().__init__(options)
        type(self).builds += 1

    def tuner(self, context, configs, values):
        rate = self.options.toy_lr

        class Toy(FixedConfig):
            def chosen(self):
                return {"lr": rate}

        return Toy(context.fixed.client_config.__class__(**{**vars(context.fixed.client_config), "lr": rate}))


TOY = register(Method("toy", ROUND, "a test's own method", "every client trains with --toy-lr", ToySearch, ToyOptions))


def test_a_declared_method_is_listed_with_its_kind_paper_and_options(capsys):
    assert methods()["toy"] is TOY and list(methods()).index("toy") > list(methods()).index("random")
    assert main(["methods", "toy"]) == 0
    text = capsys.readouterr().out
    assert "Round-level" in text and "toy" in text and "paper: a test's own method" in text
    assert "--toy-lr 0.02: toy: the learning rate" in text
    main(["methods"])
    listing = capsys.readouterr().out
    for name, declared in methods().items():  # every method, each of its options with its default
        assert f"  {name} " in listing
        for f in fields(declared.options):
            assert f"--{f.name.replace('_', '-')} " in listing


def test_options_are_validated_in_one_line_and_belong_to_their_method():
    assert TuneSettings(method="toy", options={"toy_lr": 0.5}).changed_options == {"toy_lr": 0.5}
    assert TuneSettings(method="toy", options={"toy_lr": 0.02}).changed_options == {}  # the default
    with pytest.raises(SettingsError, match="option toy_lr must be >= 1e-06"):
        TuneSettings(method="toy", options={"toy_lr": 0.0})
    with pytest.raises(SettingsError, match="--toy-lr is an option of toy, not of tpe"):
        TuneSettings(method="tpe", options={"toy_lr": 0.5})
    with pytest.raises(SettingsError, match="--signal is an option of fedex, fedex-paper"):
        TuneSettings(method="toy", options={"signal": "after"})
    with pytest.raises(SettingsError, match="unknown method 'toys'"):
        TuneSettings(method="toys")
    with pytest.raises(SettingsError, match="option toy_lr must be a float"):
        method("toy").make_options({"toy_lr": "fast"})


def test_a_name_is_one_method_and_an_option_name_one_type():
    with pytest.raises(ValueError, match="declared twice"):
        register(Method("toy", ROUND, "another", "another toy", ToySearch))

    @dataclass(frozen=True)
    class Clashing(Options):
        toy_lr: str = option("fast", "a string where toy has a float")

    with pytest.raises(ValueError, match="must have one type"):
        register(Method("toy-clash", ROUND, "", "", ToySearch, Clashing))
    assert "toy-clash" not in methods()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "toy", "--toy-lr", "0"], "option toy_lr must be >= 1e-06"),
        (["--method", "tpe", "--toy-lr", "0.1"], "--toy-lr is an option of toy, not of tpe"),
        (["--method", "fedex", "--baseline", "window"], "fedex's baseline must be one of previous, round, fitted"),
    ],
)
def test_the_command_line_refuses_a_bad_option_in_one_line(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *flags])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error, error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("prefect_server")
def test_the_toy_method_runs_through_tune_and_compare_built_once_per_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    before = ToySearch.builds
    flags = ["--budget", "4", "--final-rounds", "1", "--storage", storage, *FIXED]
    assert main(["tune", "--method", "toy", "--toy-lr", "0.07", "--study-name", "toy", *flags]) == 0
    assert ToySearch.builds - before == 2  # once to check the command line, once by the study's flow
    study = optuna.load_study(study_name="toy", storage=storage)
    (trial,) = study.trials
    assert trial.user_attrs["chosen"] == {"lr": 0.07} and trial.user_attrs["rounds_used"] == 4
    assert "Best configuration retrained for 1 rounds" in capsys.readouterr().out

    compare = ["--methods", "toy,random", "--seeds", "0", "--budgets", "3", "--n-configs", "3", "--toy-lr", "0.09"]
    assert main(["compare", *compare, "--final-rounds", "1", "--storage", storage, *FIXED]) == 0
    table = capsys.readouterr().out
    assert "toy" in table and "random" in table
    toy = [s for s in optuna.get_all_study_summaries(storage) if s.study_name.endswith("-toy-b3-s0")]
    (compared,) = optuna.load_study(study_name=toy[0].study_name, storage=storage).trials
    assert compared.user_attrs["chosen"] == {"lr": 0.09}  # the option reached the compared toy, not random


def test_a_method_whose_statistics_dp_does_not_privatize_is_refused_under_dp():
    private = TrainSettings(dp_clip=1.0, dp_noise=1.0)
    message = "fedex asks every client for val_loss_before, val_loss_after, which DP-FedAvg does not privatize"
    with pytest.raises(SettingsError, match=message):
        TuneSettings(method="fedex").check_with(private)
    TuneSettings(method="fedex").check_with(TrainSettings())  # without DP: fine
    TuneSettings(method="random").check_with(private)  # no statistics asked: fine


def test_an_installed_plugin_declares_its_methods_through_the_entry_point_group(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    from fedhpo_core import registry

    (tmp_path / "fedhpo_plugin_method.py").write_text(
        "from fedhpo_core.registry import ROUND, Method, register\n"
        "from fedhpo_core.search.online import FedHyperSearch\n"
        "register(Method('plugin-hyper', ROUND, 'a plugin', 'FedHyper under another name', FedHyperSearch))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = EntryPoint(name="plugin", value="fedhpo_plugin_method", group=registry.ENTRY_POINTS)
    monkeypatch.setattr(registry, "entry_points", lambda group: [plugin] if group == registry.ENTRY_POINTS else [])
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    monkeypatch.setattr(registry, "_discovered", False)
    assert methods()["plugin-hyper"].paper == "a plugin"
    assert TuneSettings(method="plugin-hyper").declared.kind == ROUND


def test_threads_asking_at_once_in_a_new_process_all_see_every_method():
    """The first asks discover the methods: the others wait for it, not see half of them (which
    failed threads of processes sharing a study with 'unknown method async-hyperband')."""
    script = (
        "import threading\n"
        "from fedhpo_core.registry import methods\n"
        "seen = []\n"
        "threads = [threading.Thread(target=lambda: seen.append(len(methods()))) for _ in range(8)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print(sorted(seen))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    builtin = len([m for m in methods().values() if m.search.__module__.startswith("fedhpo_core.")])
    assert done.stdout.strip() == str([builtin] * 8), done.stdout
