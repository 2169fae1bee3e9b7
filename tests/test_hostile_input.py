"""Careless and hostile input (issue 30): every refusal is one line naming the value and the rule,
exit status 2, no traceback, nothing on stdout, ended within seconds, before any flow run starts and
before anything is written to a store.

Each case runs the command line in-process (`cli.main.main`) in a folder of its own, with its own
MLflow store and Prefect home that must stay absent, and with `local_prefect` replaced by a tripwire:
a case that is not refused fails at once, rather than training. Cases that bound memory run as real
processes and assert their peak resident memory too. Security cases (spools, secrets, foreign
processes) and signals have modules of their own (test_spool_safety, test_secrets, test_background,
test_interrupt_exits)."""

import argparse
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import cli.main
import flows.comparison  # noqa: F401  imported here, not under capsys: Prefect's logging binds the streams it finds
import flows.study  # noqa: F401
from cli.main import build_parser, main

ONE_CASE_S = 30  # a refusal is found in seconds: loading digits is the slowest check


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    says: str  # a fragment of the line: the value or the rule it names
    files: dict = field(default_factory=dict)  # name -> text or bytes, written in the case's input folder
    env: dict = field(default_factory=dict)  # "{input}" in a value is the input folder


def case(*argv: str, says: str, files: dict | None = None, env: dict | None = None) -> Case:
    return Case(argv, says, files or {}, env or {})


def typed_flags(command: str) -> list[tuple[str, str]]:
    """The flags of `command` whose values argparse parses (int, float, bool, lists), with their kind."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (action.option_strings[0], action.type.__name__)
        for action in commands.choices[command]._actions
        if action.option_strings and action.type is not None and action.type.__name__ != "str"
    ]


# A value argparse must refuse, for each kind of flag.
MALFORMED = {"int": ["abc", "1.5"], "float": ["abc"], "bool": ["maybe"], "parse": ["a,,b?"]}

PARSED = {
    f"{command} {flag} {value!r}": case(command, flag, value, says=f"argument {flag}: ")
    for command in ("train", "tune", "compare")
    for flag, kind in typed_flags(command)
    for value in MALFORMED[kind]
    if not (kind == "parse" and flag == "--methods")  # names: any text parses (checked as a method below)
}
PARSED |= {
    "no command": case(says="the following arguments are required: command"),
    "unknown command": case("trian", says="invalid choice: 'trian'"),
    "stray argument": case("train", "10", says="unrecognized arguments: 10"),
    "unknown flag": case("train", "--round", "5", says="unrecognized arguments"),
    "flag without value": case("train", "--rounds", says="argument --rounds: expected one argument"),
    "tune option of compare": case("compare", "--resume", says="unrecognized arguments: --resume"),
    "unknown server action": case("server", "restart", says="invalid choice: 'restart'"),
    "server without action": case("server", says="the following arguments are required: action"),
    "unknown preset": case("compare", "--preset", "huge", says="invalid choice: 'huge'"),
}

SETTINGS = {
    "rounds negative": case("train", "--rounds", "-3", says="rounds must be >= 1"),
    "clients negative": case("train", "--clients", "-1", says="clients must be >= 1"),
    "lr nan": case("train", "--lr", "nan", says="lr must be a finite number"),
    "lr inf": case("train", "--lr", "inf", says="lr must be a finite number"),
    "momentum one": case("train", "--momentum", "1", says="momentum must be in [0, 1)"),
    "weight decay negative": case("train", "--weight-decay", "-1e-4", says="weight_decay must be >= 0"),
    "batch size zero": case("train", "--batch-size", "0", says="batch_size must be >= 1"),
    "local epochs zero": case("train", "--local-epochs", "0", says="local_epochs must be"),
    "mu negative": case("train", "--mu", "-0.01", says="mu must be >= 0"),
    "tau zero": case("train", "--aggregator", "fedadam", "--tau", "0", says="tau must be"),
    "server lr zero": case("train", "--server-lr", "0", says="server_lr must be > 0"),
    "beta1 one": case("train", "--beta1", "1", says="beta1 and beta2 must be in [0, 1)"),
    "beta2 negative": case("train", "--beta2", "-0.5", says="beta1 and beta2 must be in [0, 1)"),
    "dp noise without clip": case("train", "--dp-noise", "1", says="dp_noise needs dp_clip > 0"),
    "dp delta one": case("train", "--dp-delta", "1", says="dp_delta must be in (0, 1)"),
    "dropout one": case("train", "--dropout", "1", says="dropout must be in [0, 1)"),
    "deadline negative": case("train", "--deadline-s", "-1", says="deadline_s must be >= 0"),
    "target above one": case("train", "--target-acc", "2", says="target_acc must be in [0, 1]"),
    "client val one": case("train", "--client-val-fraction", "1", says="client_val_fraction must be in [0, 1)"),
    "val fraction one": case("train", "--val-fraction", "1", says="val_fraction must be in (0, 1)"),
    "shards beyond classes": case("train", "--partition", "shards", "--shards-per-client", "11", says="shards_per"),
    "unknown device profile": case("train", "--devices", "phones", says="unknown devices 'phones'"),
    "unknown algorithm": case("train", "--algorithm", "fednova", says="unknown algorithm 'fednova'"),
    "unknown engine": case("train", "--engine", "gpu", says="unknown engine 'gpu'"),
    "unknown device": case("train", "--device", "tpu", says="unknown device 'tpu'"),
    "unknown compression": case("train", "--compression", "zip", says="zip"),
    "topk with dp": case("train", "--compression", "topk", "--dp-clip", "1", says="compression topk cannot run"),
    "scaffold with dp": case("train", "--algorithm", "scaffold", "--dp-clip", "1", says="scaffold cannot run"),
    "dataset and task": case("train", "--dataset", "mnist", "--task", "x.csv", says="both name the data"),
    "empty experiment": case("train", "--experiment", "  ", says="experiment must be a non-empty name"),
    "unknown task type": case("train", "--task-type", "ranking", says="unknown task_type 'ranking'"),
    "dask workers zero": case("train", "--dask-workers", "0", says="dask_workers must be >= 1"),
    "unknown task runner": case("train", "--task-runner", "ray", says="unknown task_runner 'ray'"),
    "cuda here": case("train", "--device", "cuda", says="no CUDA device"),
    "unknown method": case("tune", "--method", "sgd-magic", says="sgd-magic"),
    "unknown scope": case("tune", "--scope", "local", says="unknown scope 'local'"),
    "unknown objective": case("tune", "--objective", "loss", says="unknown objective 'loss'"),
    "unknown budget unit": case("tune", "--budget-unit", "dollars", says="unknown budget_unit 'dollars'"),
    "budget zero": case("tune", "--budget", "0", says="budget"),
    "n configs zero": case("tune", "--n-configs", "0", says="n_configs must be"),
    "final rounds negative": case("tune", "--final-rounds", "-1", says="final_rounds must be >= 0"),
    "workers zero": case("tune", "--workers", "0", says="workers must be >= 1"),
    "workers of a serial method": case("tune", "--method", "fedex", "--workers", "2", says="parallel trials"),
    "join and resume": case("tune", "--join", "--resume", says="join and resume exclude each other"),
    "checkpoint every zero": case("tune", "--checkpoint-every", "0", says="checkpoint_every must be >= 1"),
    "lease zero": case("tune", "--lease-s", "0", says="lease"),
    "max epsilon inf": case("tune", "--max-epsilon", "inf", says="max_epsilon must be a number >= 0"),
    "max bytes negative": case("tune", "--max-bytes", "-5", says="max_bytes must be a number >= 0"),
    "model name with slash": case("tune", "--register-model", "a/b", says="is not a model name"),
    "register without final": case("tune", "--register-model", "m", "--final-rounds", "0", says="register_model"),
    "eval noise negative": case("tune", "--eval-noise", "-1", says="eval_noise"),
    "eval clients negative": case("tune", "--eval-clients", "-2", says="eval_clients"),
    "option of another method": case("tune", "--method", "tpe", "--eta", "3", says="eta"),
    "option value refused": case("tune", "--method", "hyperband", "--eta", "1", says="eta"),
    "resume of no study": case("tune", "--resume", "--study-name", "never-made", says="never-made"),
    "compare unknown method": case("compare", "--methods", "tpe,nope", says="nope"),
    "compare no seeds": case("compare", "--seeds", ",", says="seeds"),
    "compare negative budget": case("compare", "--budgets", "-10", says="budget"),
    "compare unknown reference": case("compare", "--reference", "bohb", says="bohb"),
    "methods unknown": case("methods", "sgd-magic", says="sgd-magic"),
    "round-level grid too large": case(
        "tune",
        "--method",
        "fedex",
        "--search-space",
        "{input}/grid.yaml",
        says="the grid has 1000000 points",
        files={
            "grid.yaml": "".join(
                f"{name}: {{type: categorical, choices: {list(range(1, 11))}}}\n"
                for name in ("lr", "weight_decay", "mu", "local_epochs", "batch_size", "finetune_steps")
            )
        },
    ),
    "personalized grid too large": case(
        "tune",
        "--method",
        "grid",
        "--scope",
        "personalized",
        "--search-space",
        "{input}/grid.yaml",
        says="points, more than",
        files={
            "grid.yaml": "lr: {type: categorical, choices: [0.1, 0.01]}\nmu: {type: categorical, choices: [0, 1]}\n"
        },
    ),
}

TASKS = {
    "missing task file": case("train", "--task", "{input}/nope.csv", says="nope.csv"),
    "task folder missing": case("train", "--task", "{input}/nowhere/", says="nowhere"),
    "csv without client column": case(
        "train", "--task", "{input}/t.csv", "--target", "y", says="client", files={"t.csv": "a,y\n1,0\n2,1\n"}
    ),
    "csv unknown target": case(
        "train",
        "--task",
        "{input}/t.csv",
        "--client-column",
        "c",
        "--target",
        "zz",
        says="zz",
        files={"t.csv": "c,a,y\n1,1,0\n2,2,1\n"},
    ),
    "binary csv": case(
        "train",
        "--task",
        "{input}/t.csv",
        "--client-column",
        "c",
        "--target",
        "y",
        says="t.csv",
        files={"t.csv": bytes(range(256)) * 4},
    ),
    "python task that raises": case(
        "train", "--task", "{input}/bad.py", says="bad.py", files={"bad.py": "raise RuntimeError('boom')\n"}
    ),
    "python task without a task": case("train", "--task", "{input}/empty.py", says="empty.py", files={"empty.py": ""}),
    "module that does not exist": case("train", "--task", "no_such_pkg.mod:task", says="no_such_pkg"),
    "missing data root": case("train", "--dataset", "mnist", "--data-root", "{input}/none", says="mnist"),
}

STORES = {
    "tracking uri no scheme store": case(
        "train", says="MLflow tracking store", env={"MLFLOW_TRACKING_URI": "notascheme:abc"}
    ),
    "tracking uri ftp": case("train", says="MLflow tracking store", env={"MLFLOW_TRACKING_URI": "ftp://host/x"}),
    "tracking uri folder store": case(
        "train", says="MLflow tracking store", env={"MLFLOW_TRACKING_URI": "file://{input}/runs"}
    ),
    "tracking db is a folder": case(
        "train", says="is a folder", env={"MLFLOW_TRACKING_URI": "sqlite:///{input}"}, files={"x": ""}
    ),
    "tracking db not a database": case(
        "train",
        says="not a readable SQLite database",
        env={"MLFLOW_TRACKING_URI": "sqlite:///{input}/text.db"},
        files={"text.db": "hello, not a database\n" * 100},
    ),
    "tracking server not answering": case(
        "train", says="does not answer", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    ),
    "tracking db in memory": case("train", says="in-memory", env={"MLFLOW_TRACKING_URI": "sqlite:///:memory:"}),
    "experiment name too long": case("train", "--experiment", "e" * 501, says="at most 500"),
    "storage not a url": case("tune", "--storage", "optuna.db", says="is not a database URL"),
    "storage in memory": case("tune", "--storage", "sqlite:///:memory:", says="in-memory"),
    "storage unknown dialect": case("tune", "--storage", "nosuchdb://u@h/d", says="Optuna storage"),
    "storage folder missing": case("tune", "--storage", "sqlite:///{input}/no/such/dir/o.db", says="does not exist"),
    "storage is a folder": case("tune", "--storage", "sqlite:///{input}", says="is a folder", files={"x": ""}),
    "storage server refuses": case("tune", "--storage", "postgresql://u:pw@127.0.0.1:9/db", says="cannot use"),
}


def all_cases() -> dict[str, Case]:
    return PARSED | SETTINGS | TASKS | STORES


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A folder of the case's own: its input files, an MLflow store and an Optuna storage that must
    not appear, a Prefect home that must stay empty; `local_prefect` fails the case if reached."""
    (tmp_path / "input").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "stores").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("FEDHPO_SPOOL", str(tmp_path / "spool"))

    @contextlib.contextmanager
    def tripwire():
        raise AssertionError("not refused: the command went on to start its flow")
        yield

    monkeypatch.setattr(cli.main, "local_prefect", tripwire)
    return tmp_path


def written(root: Path) -> list[Path]:
    """What a command left outside its inputs: store files, a Prefect home, spools, artifacts."""
    return sorted(p for p in root.rglob("*") if p.is_file() and "input" not in p.relative_to(root).parts)


@pytest.mark.parametrize("name", sorted(all_cases()))
def test_a_refusal_is_one_line_exit_2_and_writes_nothing(name, sandbox, capsys, monkeypatch):
    spec = all_cases()[name]
    given = sandbox / "input"
    for file, content in spec.files.items():
        path = given / file
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    for variable, value in spec.env.items():
        monkeypatch.setenv(variable, value.replace("{input}", str(given)))
    argv = [arg.replace("{input}", str(given)) for arg in spec.argv]
    started = time.monotonic()
    with pytest.raises(SystemExit) as ended:
        main(argv)
    took = time.monotonic() - started
    out, err = capsys.readouterr()
    command = f"fedhpo {argv[0]}" if argv and argv[0] in ("train", "tune", "compare", "server", "methods") else "fedhpo"
    assert ended.value.code == 2, err
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{command}: error: ") and spec.says in err, err
    assert written(sandbox) == []
    assert took < ONE_CASE_S


def test_there_are_at_least_150_cases_across_the_classes():
    assert len(all_cases()) >= 150
    assert min(map(len, (PARSED, SETTINGS, TASKS, STORES))) >= 8


# Bounds on what can exhaust the machine: real processes, their peak memory measured.
PEAK_MEMORY_BYTES = 1_500 * 2**20  # the command's imports take about 700 MB; the inputs measured took 1.5-7 GB
BOUNDED = {
    "batch size beyond the data": ("train", "--batch-size", "100000"),
    "local epochs beyond the bound": ("train", "--local-epochs", "1000000000"),
    "dask workers beyond the machine": ("train", "--task-runner", "dask", "--dask-workers", "1000"),
}


# The command in a process that writes its peak resident memory (VmHWM) at exit to the file named
# first: wait4's ru_maxrss would count the test session's memory, which a forked child inherits.
MEASURED = (
    "import atexit, sys\n"
    "from pathlib import Path\n"
    "peak = Path(sys.argv.pop(1))\n"
    "status = lambda: Path('/proc/self/status').read_text().splitlines()\n"
    "atexit.register(lambda: peak.write_text(next(l for l in status() if l.startswith('VmHWM:')).split()[1]))\n"
    "from cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def peak_memory_of(argv: list[str], env: dict, cwd: Path, timeout: float) -> tuple[int, str, int]:
    """Run the command `argv` to its end (killed past `timeout`): exit status, stderr, peak resident memory."""
    measured = cwd.parent / f"{cwd.name}-peak"
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, str(measured), *argv],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stderr, int(measured.read_text()) * 1024


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_a_setting_that_would_exhaust_the_machine_is_refused_within_bounded_memory(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHPO_")}
    env |= {"FEDHPO_WARM": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect")}
    started = time.monotonic()
    code, err, peak = peak_memory_of(list(BOUNDED[name]), env, tmp_path, 120)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert time.monotonic() - started < 60
    assert peak < PEAK_MEMORY_BYTES, f"{peak / 2**20:.0f} MB"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
