"""A search space means what it says or is refused in one line naming the entry: no rounded bounds,
no truthy strings, no duplicate keys, no unknown keys, and bounds on what reading and enumerating
it can cost."""

import time
import tracemalloc

import pytest

from cli.main import main
from fedhpo_core.search.fixed_budget import GridSearch
from fedhpo_core.search.space import MAX_GRID_POINTS, MAX_SPACE_BYTES, SearchSpace, grid_points, grid_size
from fedhpo_core.settings import SettingsError

DECLARED = {  # refused by from_dict: (declared, what the line must say)
    "fractional int bound": ({"local_epochs": {"type": "int", "low": 1.5, "high": 4}}, "'local_epochs'.*whole bounds"),
    "number as a string": ({"lr": {"type": "float", "low": "2", "high": 4}}, "'lr': low must be a number, got '2'"),
    "boolean as a bound": ({"local_epochs": {"type": "int", "low": True, "high": 4}}, "'local_epochs': low must be a"),
    "nan bound": ({"lr": {"type": "float", "low": float("nan"), "high": 1}}, "'lr': lr must be a finite number"),
    "infinite int bound": ({"batch_size": {"type": "int", "low": 1, "high": float("inf")}}, "'batch_size'.*finite"),
    "infinite float bound": ({"lr": {"type": "float", "low": 0.1, "high": float("inf")}}, "'lr'.*finite.*high inf"),
    "integer beyond floats": ({"lr": {"type": "float", "low": 0.1, "high": 10**400}}, "'lr'.*finite"),
    "log as a string": ({"lr": {"type": "float", "low": 0.1, "high": 1, "log": "false"}}, "'lr': log must be true"),
    "log as a number": ({"lr": {"type": "float", "low": 0.1, "high": 1, "log": 1}}, "'lr': log must be true"),
    "typo of high": (
        {"lr": {"type": "float", "low": 0.1, "hihg": 1}},
        r"'lr' has unknown keys \['hihg'\]; float entr",
    ),
    "typo of low": (
        {"local_epochs": {"type": "int", "lo": 1, "high": 2}},
        r"\['lo'\]; int entries take type, low, hi",
    ),
    "step nothing reads": ({"lr": {"type": "float", "low": 0.1, "high": 1, "step": 0.1}}, r"\['step'\]"),
    "low in a categorical": (
        {"lr": {"type": "categorical", "choices": [1], "low": 0}},
        "categorical entries take type, choices$",
    ),
    "missing high": ({"lr": {"type": "float", "low": 0.1}}, "'lr' is malformed: float entries need high"),
    "type not a word": ({"lr": {"type": ["float"], "low": 0.1, "high": 1}}, r"'lr' has unknown type \['float'\]"),
    "choices not a list": ({"lr": {"type": "categorical", "choices": 5}}, "'lr': choices must be a list, got 5"),
    "choices a string": ({"lr": {"type": "categorical", "choices": "0.1"}}, "'lr': choices must be a list"),
    "no choices": ({"lr": {"type": "categorical", "choices": []}}, "'lr' has no choices"),
    "duplicate choice": (
        {"lr": {"type": "categorical", "choices": [0.1, 0.2, 0.1]}},
        "choice 0.1 is given twice",
    ),
    "equal choices": ({"local_epochs": {"type": "categorical", "choices": [1, 1.0]}}, "choice 1.0 is given twice"),
    "infinite choice": ({"lr": {"type": "categorical", "choices": [0.1, float("inf")]}}, "'lr': choices must be fin"),
    "nan choice": ({"lr": {"type": "categorical", "choices": [float("nan")]}}, "'lr': choices must be finite"),
    "word choice": ({"lr": {"type": "categorical", "choices": [0.1, "abc"]}}, "'lr'.*got 'abc'"),
    "boolean choice": ({"lr": {"type": "categorical", "choices": [0.1, True]}}, "'lr'.*got True"),
    "nested choice": ({"lr": {"type": "categorical", "choices": [[0.1]]}}, r"'lr'.*got \[0.1\]"),
    "number for a word setting": ({"compression": {"type": "categorical", "choices": ["none", 8]}}, "takes words"),
    "setting named by a number": ({1: {"type": "float", "low": 0.1, "high": 1}}, "named by words, got 1"),
}


@pytest.mark.parametrize("case", sorted(DECLARED))
def test_a_space_that_does_not_mean_what_it_says_is_refused_naming_the_entry(case):
    declared, message = DECLARED[case]
    with pytest.raises(SettingsError, match=message) as refusal:
        SearchSpace.from_dict(declared)
    assert "\n" not in str(refusal.value)


FILES = {  # refused by load: (YAML text, what the line must say)
    "fractional int bound": ("local_epochs: {type: int, low: 1.5, high: 4}\n", "'local_epochs'.*low 1.5"),
    "yaml true as a bound": ("local_epochs: {type: int, low: true, high: 4}\n", "low must be a number, got True"),
    "quoted number": ("lr: {type: float, low: '0.1', high: 1}\n", "'lr': low must be a number, got '0.1'"),
    "infinite int bound": ("local_epochs: {type: int, low: 1, high: .inf}\n", "'local_epochs'.*finite.*high inf"),
    "nan float bound": ("lr: {type: float, low: .nan, high: 1}\n", "'lr'.*finite.*low nan"),
    "quoted false": ('lr: {type: float, low: 0.1, high: 1, log: "false"}\n', "log must be true or false, got 'false'"),
    "duplicate setting": ("lr: {type: float, low: 0.1, high: 1}\nlr: {type: float, low: 0.2, high: 1}\n", "key 'lr'"),
    "duplicate bound": ("lr: {type: float, low: 0.1, low: 0.3, high: 1}\n", "duplicate key 'low' .line 1"),
    "duplicate in block style": ("lr:\n  type: float\n  low: 0.1\n  high: 1\n  type: int\n", "key 'type' .line 5"),
    "typo": ("lr: {type: float, low: 0.1, hihg: 1}\n", r"'lr' has unknown keys \['hihg'\]"),
    "list": ("- lr\n- weight_decay\n", "must map settings to domains.*got a list"),
    "scalar": ("just words\n", "must map settings to domains.*got a str"),
    "choices a number": ("lr: {type: categorical, choices: 5}\n", "'lr': choices must be a list, got 5"),
    "word among numbers": ("lr: {type: categorical, choices: [1e-3, abc]}\n", "'lr'.*got 'abc'"),
    "nested junk": ("lr: {type: categorical, choices: [{a: [1]}]}\n", "'lr': choices must be finite numbers"),
    "too deep": ("lr: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 16 levels"),
    "alias": ("lr: &domain {type: float, low: 0.1, high: 1}\nmu: *domain\n", "anchors and aliases"),
    "merge key": ("lr: {<<: {low: 0.1}, type: float, high: 1}\n", "merge keys"),
    "two documents": ("lr: {type: float}\n---\nmu: {type: float}\n", "another document"),
    "broken flow mapping": ("lr: {type: float, low: 0.1\n", "cannot read search space .*line 2"),
    "tab": ("lr:\t{type: float}\n", "cannot start any token"),
    "integer beyond conversion": ("local_epochs: {type: int, low: 1, high: " + "9" * 5000 + "}\n", "digits"),
    "empty": ("", "search space is empty"),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_a_space_file_that_does_not_mean_what_it_says_is_refused_in_one_line(case, tmp_path):
    text, message = FILES[case]
    (tmp_path / "space.yaml").write_text(text)
    with pytest.raises(SettingsError, match=message) as refusal:
        SearchSpace.load(str(tmp_path / "space.yaml"))
    assert "\n" not in str(refusal.value)


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ["a0: &a0 [lr, lr, lr, lr, lr, lr, lr, lr, lr]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9^10 strings if expanded
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    with pytest.raises(SettingsError, match="anchors and aliases .* are not allowed .line 1"):
        SearchSpace.load(str(tmp_path / "bomb.yaml"))
    assert tracemalloc.get_traced_memory()[1] < 10 * 2**20
    tracemalloc.stop()


def test_files_that_are_no_text_or_no_file_are_refused(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "folder").mkdir()
    (tmp_path / "large.yaml").write_text("lr: {type: float, low: 0.1, high: 1}\n" + "#" * MAX_SPACE_BYTES)
    refusals = {
        "binary.yaml": "is not UTF-8 text .byte 128.$",
        "folder": "is not a file",
        "missing.yaml": "does not exist",
        "large.yaml": f"is larger than {MAX_SPACE_BYTES} bytes",
    }
    for name, message in refusals.items():
        with pytest.raises(SettingsError, match=message):
            SearchSpace.load(str(tmp_path / name))


def test_a_valid_space_reads_as_written(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "lr: {type: float, low: 1e-3, high: 1E-1, log: yes}\n"
        "local_epochs: {type: int, low: 1.0, high: 3}\n"
        "weight_decay: {type: categorical, choices: [0, 1e-4, 1.0e-2]}\n"
        "compression: {type: categorical, choices: [none, qsgd]}\n"
    )
    space = SearchSpace.load(str(tmp_path / "space.yaml")).distributions
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (0.001, 0.1, True)  # YAML 1.1 reads 1e-3 as text
    assert (space["local_epochs"].low, space["local_epochs"].high, space["local_epochs"].log) == (1, 3, False)
    assert space["weight_decay"].choices == (0, 0.0001, 0.01)
    assert space["compression"].choices == ("none", "qsgd")


FIVE_BY_FIVE = SearchSpace.from_dict(
    {
        "lr": {"type": "categorical", "choices": [0.1, 0.05, 0.01, 0.005, 0.001]},
        "weight_decay": {"type": "categorical", "choices": [0.0, 0.1, 0.01, 0.001, 0.0001]},
    }
)


def test_a_personalized_grid_of_5_to_the_20_is_refused_at_once_without_enumerating_it():
    parameters = FIVE_BY_FIVE.parameters("personalized", 10)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(SettingsError, match=f"the grid has 95367431640625 points, more than {MAX_GRID_POINTS}"):
        GridSearch().sampler(parameters, 0)  # what `fedhpo tune` builds to validate a study
    assert time.perf_counter() - started < 1
    assert tracemalloc.get_traced_memory()[1] < 10 * 2**20
    tracemalloc.stop()


def test_a_grid_within_the_bound_is_enumerated_and_one_past_it_is_refused():
    parameters = FIVE_BY_FIVE.parameters("personalized", 2)
    assert grid_size(parameters) == len(grid_points(parameters)) == 5**4
    tenths = {"type": "categorical", "choices": [tenth / 10 for tenth in range(10)]}
    ten_by_ten = SearchSpace.from_dict({"momentum": tenths, "topk_fraction": tenths})
    assert grid_size(ten_by_ten.parameters("personalized", 2)) == 10**4 <= MAX_GRID_POINTS
    with pytest.raises(SettingsError, match=f"the grid has {10**6} points, more than {MAX_GRID_POINTS}"):
        grid_size(ten_by_ten.parameters("personalized", 3))
    with pytest.raises(SettingsError, match="about 10\\^209 points"):
        grid_size(FIVE_BY_FIVE.parameters("personalized", 150))  # 5^300 = 4.9e209


COMMAND_LINE = {
    "fractional int bound": ("local_epochs: {type: int, low: 1.5, high: 4}\n", "whole bounds"),
    "infinite int bound": ("local_epochs: {type: int, low: 1, high: .inf}\n", "must be a finite number"),
    "duplicate key": ("lr: {type: float, low: 0.1, high: 1}\nlr: {type: float, low: 0.2, high: 1}\n", "duplicate"),
    "quoted false": ('lr: {type: float, low: 0.1, high: 1, log: "false"}\n', "log must be true or false"),
    "personalized grid of 5^20": (
        "lr: {type: categorical, choices: [0.1, 0.05, 0.01, 0.005, 0.001]}\n"
        "weight_decay: {type: categorical, choices: [0.0, 0.1, 0.01, 0.001, 0.0001]}\n",
        "the grid has 95367431640625 points",
    ),
}


@pytest.mark.parametrize("case", sorted(COMMAND_LINE))
def test_the_command_line_refuses_in_one_line_before_any_store_is_made(case, tmp_path, monkeypatch, capsys):
    text, message = COMMAND_LINE[case]
    space = tmp_path / "space.yaml"
    space.write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "p"))
    flags = ["--method", "grid", "--scope", "personalized", "--clients", "10"] if "grid" in case else []
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--search-space", str(space), "--budget", "6", "--n-configs", "3", "--dataset", "digits", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fedhpo tune: error: ") and message in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "work"] and not list(work.iterdir())
