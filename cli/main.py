"""The `fedhpo` command: runs the flows from this machine (a shared local Prefect server, MLflow's store)."""

import argparse
import contextlib
import importlib.metadata
import logging
import os
import queue
import re
import signal
import sys
import types
from contextlib import contextmanager
from dataclasses import MISSING, asdict, fields

from fedhpo_core.search.base import Interrupted
from fedhpo_core.search.study import COMPARISON_PRESETS, TuneSettings
from fedhpo_core.settings import ExecutionSettings, SettingsError, TrainSettings


def _add_settings(parser, settings_class, skip: tuple[str, ...] = ()) -> None:
    """One --flag per settings field, with its type, default and help from the dataclass."""
    for f in fields(settings_class):
        if f.name in skip or f.name == "options":  # a method's options: `_add_method_options`
            continue
        kind = f.type
        if isinstance(kind, types.UnionType):  # `float | None`: parse as float, None stays the default
            kind = next(t for t in kind.__args__ if t is not type(None))
        default = None if f.default is MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"])


OPTION_DEST = "option."  # argparse destination of a method option's flag


def _add_method_options(parser) -> None:
    """A --flag per option name of every declared method (`fedhpo_core.registry`), unset by default:
    the method's own default applies. Methods sharing a name share its flag (one type)."""
    from fedhpo_core.registry import default_of, flag, option_fields, parse_value

    group = parser.add_argument_group("method options (`fedhpo methods` lists each method's)")
    for name, declared in option_fields().items():
        helps = list(dict.fromkeys(f.metadata["help"] for _, f in declared))
        defaults = ", ".join(f"{m.name} {shown(default_of(m, f))}" for m, f in declared)
        kind = type(declared[0][1].default)
        group.add_argument(
            f"--{flag(name)}",
            dest=OPTION_DEST + name,
            metavar=name.upper(),
            type=_parser_of(kind, parse_value),
            default=argparse.SUPPRESS,
            help=f"{'; '.join(helps)} (default: {defaults})",
        )


def _parser_of(kind: type, parse_value):
    """A method option's argparse type, named after its kind: argparse's refusal says "invalid float value"."""

    def parse(text: str):
        return parse_value(kind, text)

    parse.__name__ = kind.__name__
    return parse


def shown(value) -> str:
    """An option's value as a user types it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _given_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line."""
    return {k.removeprefix(OPTION_DEST): v for k, v in vars(args).items() if k.startswith(OPTION_DEST)}


def _fail(command: str, message: str):
    """A one-line error and exit status 2 (as argparse does), before any work starts."""
    print(f"fedhpo {command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _settings(command: str, settings_class, args: argparse.Namespace, **values):
    values = {f.name: getattr(args, f.name) for f in fields(settings_class) if hasattr(args, f.name)} | values
    try:
        return settings_class(**values)
    except SettingsError as error:
        _fail(command, str(error))


def _prepared(command: str, settings: TrainSettings) -> TrainSettings:
    """The task imported, its data loaded (cached for the flow) and checked up front, so a task
    that cannot be used fails in one line before Prefect starts."""
    from fedhpo_core.task import prepared

    try:
        return prepared(settings)
    except (SettingsError, FileNotFoundError) as error:
        _fail(command, str(error))


def _check_stores(command: str, experiment: str, storage: str | None = None) -> None:
    """MLflow's tracking store (and that it takes the experiment's name), and the Optuna storage if
    given, can be used, each a store of its kind (checked in seconds, before anything is created)."""
    from fedhpo_core.stores import check_database
    from fedhpo_core.tracking import check_tracking_store

    try:
        check_tracking_store(experiment)
        if storage:
            check_database(storage, "Optuna storage", "Optuna")
    except SettingsError as error:
        _fail(command, str(error))


def train_command(args: argparse.Namespace) -> int:
    settings = _settings("train", TrainSettings, args)
    execution = _settings("train", ExecutionSettings, args)
    settings = _prepared("train", settings)
    _check_stores("train", settings.experiment)
    from cli.progress import live_bar
    from fedhpo_core.stores import masked
    from fedhpo_core.tracking import browse_lines, tracking_uri
    from flows.training import federated_training

    with local_prefect(), live_bar():
        summary = federated_training(**asdict(settings), **asdict(execution))
    score = summary["score"]
    if summary["diverged_round"] is not None:
        print(f"Diverged at round {summary['diverged_round']}: the loss turned non-finite (try a smaller --lr).")
        print("Recorded in MLflow as tag fedhpo.diverged=true and metric diverged=1.")
    elif summary["frozen"]:
        print(
            f"Frozen: none of {summary['rounds_completed']} rounds changed the global model, its update underflows "
            "(try a larger --lr or --server-lr, or a smaller --tau)."
        )
        print("Recorded in MLflow as tag fedhpo.frozen=true and metric frozen=1; no model logged.")
    else:
        print(
            f"Trained {summary['rounds_completed']} rounds in {summary['wall_time_s']:.1f} s: "
            f"val_{score} {summary[f'final_val_{score}']:.4f}, test_{score} {summary[f'final_test_{score}']:.4f}; "
            f"{summary['sim_time_s']:.1f} simulated seconds on the {settings.devices} devices"
        )
    if "time_to_target_s" in summary:
        print(f"Validation {score} reached {settings.target_acc} after {summary['time_to_target_s']:.1f} simulated s")
    elif settings.target_acc:
        print(f"Validation {score} did not reach {settings.target_acc}")
    print(f"MLflow run {summary['run_id']} (experiment {settings.experiment!r}) in {masked(tracking_uri())}")
    print(*browse_lines(summary["experiment_id"], summary["run_id"]), sep="\n")
    return 0


def tune_command(args: argparse.Namespace) -> int:
    from fedhpo_core.search.study import (
        StudyFinished,
        check_study,
        default_storage,
        limits_text,
        study_definition,
    )
    from fedhpo_core.stores import masked, without_password
    from fedhpo_core.tracking import browse_lines, tracking_uri

    fixed = _settings("tune", TrainSettings, args)
    tune = _settings("tune", TuneSettings, args, options=_given_options(args))
    execution = _settings("tune", ExecutionSettings, args)
    method = tune.search_method()
    fixed = _prepared("tune", fixed)
    try:
        from fedhpo_core.task import scoring_metric

        method.use_score(scoring_metric(fixed))
        tune.check_with(fixed)
        space = tune.space()
        method.sampler(space.parameters(tune.scope, fixed.clients), 0)  # grid needs categoricals
    except SettingsError as error:
        _fail("tune", str(error))
    storage = tune.storage or default_storage(tracking_uri())
    _check_stores("tune", fixed.experiment, storage)
    try:
        check_study(storage, tune.name_for(fixed), method, study_definition(tune, fixed), tune.resume, tune.join)
    except StudyFinished as finished:  # nothing to do is not an error
        print(finished)
        return 0
    except SettingsError as error:
        _fail("tune", str(error))
    from cli.progress import live_bar
    from flows.study import hpo_study

    hidden = {"storage": without_password(tune.storage)}  # the password stays out of Prefect's parameters
    with local_prefect(), live_bar():
        summary = hpo_study(**asdict(tune) | hidden, **asdict(execution), train=asdict(fixed))
    if summary["best_trial"] is None:
        limits = limits_text(method.limits)
        print(f"Study {summary['study_name']}: no trial within {limits}; {spent_text(summary, tune)} used")
    else:
        print(
            f"Study {summary['study_name']}: best trial {summary['best_trial']} "
            f"({OBJECTIVE_LABELS.get(tune.objective, 'validation')} {summary['score']} "
            f"{summary['best_val_score']:.4f}), "
            f"{spent_text(summary, tune)} used"
        )
    test = f"final_test_{summary['score']}"
    if test in summary:
        personal = f"final_personal_{summary['score']}"
        mean, worst = summary.get(personal), summary.get(f"{personal}_worst10")
        clients = f"; personalized {summary['score']} {mean:.4f}, worst tenth {worst:.4f}" if mean is not None else ""
        if summary.get("final_frozen"):
            print(
                f"Best configuration retrained for {tune.final_rounds} rounds froze: no round changed the global "
                "model (tag fedhpo.frozen=true on its final run; no model logged)"
            )
        else:
            print(
                f"Best configuration retrained for {tune.final_rounds} rounds: {test[6:]} {summary[test]:.4f}{clients}"
            )
    if "model_version" in summary:
        print(f"Its model registered as models:/{tune.register_model}/{summary['model_version']}")
    storage, tracking = masked(summary["storage"]), masked(tracking_uri())
    print(f"Optuna study in {storage}; MLflow run {summary['run_id']} in {tracking}")
    print(*browse_lines(summary["experiment_id"], summary["run_id"]), sep="\n")
    print(f"  and its trials, round by round: optuna-dashboard {storage} --host 127.0.0.1")
    return 0


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from error

    return parse


def compare_command(args: argparse.Namespace) -> int:
    from flows.comparison import check_comparison

    fixed = _settings("compare", TrainSettings, args)
    tune = _settings("compare", TuneSettings, args)
    execution = _settings("compare", ExecutionSettings, args)
    options = _given_options(args)
    fixed = _prepared("compare", fixed)
    try:
        check_comparison(args.methods, args.seeds, args.budgets, tune, fixed, args.reference, options)
    except SettingsError as error:
        _fail("compare", str(error))
    from fedhpo_core.search.study import default_storage
    from fedhpo_core.tracking import tracking_uri

    _check_stores("compare", fixed.experiment, tune.storage or default_storage(tracking_uri()))
    from cli.progress import live_bar
    from fedhpo_core.stores import masked, without_password
    from fedhpo_core.tracking import browse_lines, tracking_uri
    from flows.comparison import method_comparison

    tune_values = {k: v for k, v in asdict(tune).items() if k not in COMPARISON_SKIPS}
    tune_values["storage"] = without_password(tune.storage)  # the password stays out of Prefect's parameters
    with local_prefect(), live_bar():
        summary = method_comparison(
            methods=args.methods,
            seeds=args.seeds,
            budgets=args.budgets,
            reference=args.reference,
            options=options,
            train=asdict(fixed),
            **tune_values,
            **asdict(execution),
        )
    print(
        f"final_test_{summary['score']} ({summary['direction']}), mean ± std over seeds, "
        "and the paired difference from the reference method:"
    )
    print(summary["table"])
    for column, table in summary["personalized_tables"].items():
        worst = "the worst tenth of clients" if column.endswith("worst10") else "the mean over clients"
        print(f"{column}: personalized {summary['score']} on the clients' validation splits, {worst}:")
        print(table)
    if "champion" in summary:
        print(f"Winner: {summary['champion']}")
    if "champion_version" in summary:
        print(f"Its model: models:/{tune.register_model}@champion (version {summary['champion_version']})")
    print(f"MLflow run {summary['run_id']} in {masked(tracking_uri())}")
    print(*browse_lines(summary["experiment_id"], summary["run_id"]), sep="\n")
    return 0


OBJECTIVE_LABELS = {"personalized": "personalized", "personalized-worst": "worst-tenth personalized"}
LOCAL_SERVER_RETRIES = 3
USER_SERVER_RETRIES = 6


# Set per study by the comparison (a method's options: those of the compared methods that declare them).
def spent_text(summary: dict, tune) -> str:
    """What a study spent of its budget, as a user reads it: "24 of 30 rounds", or in its unit."""
    if tune.budget_unit == "rounds":
        return f"{summary['rounds_used']} of {tune.budget} rounds"
    return f"{summary['budget_spent']:g} of {tune.budget} {tune.budget_unit} ({summary['rounds_used']} rounds)"


# A comparison's studies are its own: never joined or resumed, so leases and checkpoints keep their defaults.
COMPARISON_SKIPS = (
    *("method", "budget", "study_name", "resume", "join", "options"),
    *("checkpoint_every", "lease_s", "lease_grace_s"),
)


class OneLineParser(argparse.ArgumentParser):
    """argparse's refusals in one line, as every other refusal (`_fail`): the usage is `--help`'s.
    A flag is spelled in full. A negative number in scientific notation (`--weight-decay -1e-4`) is
    a value, as `-0.0001` is, for the settings' checks to refuse, not a flag argparse does not know."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, allow_abbrev=False)  # `--round 5` is a typo, not --rounds
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        command = self.prog.removeprefix("fedhpo").strip()
        hint = f"fedhpo {command} --help".replace("  ", " ")
        print(f"{self.prog}: error: {' '.join(message.split())} (see {hint})", file=sys.stderr)
        sys.exit(2)


def build_parser(preset: dict | None = None) -> argparse.ArgumentParser:
    """The command line; `preset` (a `COMPARISON_PRESETS` entry) sets defaults of `compare`."""
    parser = OneLineParser(prog="fedhpo", description="Federated hyperparameter optimization.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('fedhpo')}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    parser.set_defaults(commands=commands.choices)
    train = commands.add_parser(
        "train",
        help="run one federated training (Prefect flow federated-training)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_settings(train, TrainSettings)
    _add_settings(train.add_argument_group("execution"), ExecutionSettings)
    train.set_defaults(handler=train_command)
    tune = commands.add_parser(
        "tune",
        help="search hyperparameters under a round budget (Prefect flow hpo-study)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_settings(tune, TuneSettings)
    _add_method_options(tune)
    _add_settings(tune.add_argument_group("fixed settings of every trial"), TrainSettings)
    _add_settings(tune.add_argument_group("execution"), ExecutionSettings)
    tune.set_defaults(handler=tune_command)

    compare = commands.add_parser(
        "compare",
        help="compare search methods over seeds and budgets (Prefect flow method-comparison)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    compare.add_argument(
        "--methods", type=_csv(str), default=["random", "hyperband", "tpe"], help="methods, comma-separated"
    )
    compare.add_argument(
        "--seeds", type=_csv(int), default=[0, 1, 2], help="seeds, comma-separated (paired across methods)"
    )
    compare.add_argument("--budgets", type=_csv(int), default=[30, 60], help="budgets in rounds, comma-separated")
    compare.add_argument(
        "--reference", default=None, help="method the others are compared with seed by seed (default: the first)"
    )
    compare.add_argument(
        "--preset",
        choices=sorted(COMPARISON_PRESETS),
        help="named defaults; flags given explicitly still win. "
        + "; ".join(
            f"{name}: " + " ".join(f"--{k.replace('_', '-')} {_flag_value(v)}" for k, v in preset.items())
            for name, preset in COMPARISON_PRESETS.items()
        ),
    )
    _add_settings(compare, TuneSettings, skip=COMPARISON_SKIPS)
    _add_method_options(compare)
    _add_settings(compare.add_argument_group("fixed settings of every trial"), TrainSettings)
    _add_settings(compare.add_argument_group("execution"), ExecutionSettings)
    compare.set_defaults(handler=compare_command, **(preset or {}))

    server = commands.add_parser(
        "server",
        help="the background processes fedhpo commands share: local Prefect servers and warm runners",
        description="fedhpo commands without PREFECT_API_URL share one Prefect server on 127.0.0.1 per "
        "PREFECT_HOME, started in the background by the first of them and kept for the next ones (its "
        "database and log in PREFECT_HOME) until FEDHPO_SERVER_IDLE_S idle; the `fedhpo` command hands "
        "commands to a warm runner, one per environment and checkout, until FEDHPO_RUNNER_IDLE_S idle. "
        "start: start this PREFECT_HOME's server now; status: its address, and every server and runner of "
        "yours with its pid, memory, age and idle time; stop: stop this PREFECT_HOME's server and this "
        "checkout's runner (after the commands it runs), --all: every one.",
    )
    server.add_argument("action", choices=["start", "status", "stop"])
    server.add_argument("--all", action="store_true", help="with stop: every server and runner of yours")
    server.set_defaults(handler=server_command)

    listing = commands.add_parser(
        "methods",
        help="list the search methods: kind, paper, options with their defaults",
        description="Every declared search method (fedhpo_core/registry.py): its kind, paper, summary, options "
        "(flags of `fedhpo tune` and `fedhpo compare`) with their defaults, and what it reports.",
    )
    listing.add_argument("names", nargs="*", help="methods to describe (default: all)")
    listing.set_defaults(handler=methods_command)

    listing = commands.add_parser(
        "tasks",
        help="list the bundled tasks and those of installed plugins, and how to name any other",
        description="Tasks `--task` can name: bundled datasets, installed plugins (entry-point group fedhpo.tasks), "
        "and any package.module:attribute, .py file, .csv/.parquet table or folder with a subfolder per client.",
    )
    listing.set_defaults(handler=tasks_command)

    sync = commands.add_parser(
        "sync",
        help="send MLflow writes that commands left unsent in their spools (./fedhpo-spool) to their tracking servers",
        description="A fedhpo command that ends while its MLflow tracking server is away leaves what it could not "
        "send in a spool (./fedhpo-spool, or FEDHPO_SPOOL); this sends every such spool to the server it was for, "
        "in order, each write once. The next fedhpo command on that server does the same.",
    )
    sync.set_defaults(handler=sync_command)
    return parser


def methods_command(args: argparse.Namespace) -> int:
    from fedhpo_core.registry import ROUND, TRIAL, default_of, flag, method, methods

    try:
        chosen = [method(name) for name in args.names] or list(methods().values())
    except SettingsError as error:
        _fail("methods", str(error))
    kinds = {
        TRIAL: "Trial-level: each trial trains one configuration; the study compares them.",
        ROUND: "Round-level: one federated run whose configurations change round by round.",
    }
    for kind, title in kinds.items():
        listed = [m for m in chosen if m.kind == kind]
        if not listed:
            continue
        print(title)
        for m in listed:
            print(f"  {m.name:<16} {m.summary}")
            print(f"  {'':<16} paper: {m.paper}")
            for f in fields(m.options):
                print(f"  {'':<16} --{flag(f.name)} {shown(default_of(m, f))}: {f.metadata['help']}")
            notes = {
                "parallel trials (--workers, --join)": m.parallel,
                "asks every client for": ", ".join(s.name for s in m.statistics if s.on_client),
                "drawn by the server in each client's name, charged as uploads": ", ".join(
                    s.name for s in m.statistics if not s.on_client
                ),
                "reports": ", ".join(m.reports),
                "trial attributes": ", ".join(m.attributes),
            }
            for label, value in notes.items():
                if value:
                    print(f"  {'':<16} {label}" + ("" if value is True else f": {value}"))
    return 0


def tasks_command(args: argparse.Namespace) -> int:
    from fedhpo_core.data import DATASETS
    from fedhpo_core.models import MODELS
    from fedhpo_core.task import ENTRY_POINTS, installed_tasks

    print(f"Bundled (--task NAME or --dataset NAME; --model {', '.join(MODELS)}):")
    for name, spec in DATASETS.items():
        print(f"  {name:<16} {spec.num_train} training images, {spec.num_classes} classes, scored by accuracy")
    plugins = installed_tasks()
    print(f"Installed (entry-point group {ENTRY_POINTS}):" + ("" if plugins else " none"))
    for name, entry in sorted(plugins.items()):
        print(f"  {name:<16} {entry.value}" + (f" ({entry.dist.name})" if entry.dist else ""))
    print("Any other:")
    print("  --task package.module:attribute   a Task, a Task subclass or a function returning one")
    print("  --task path/to/file.py[:attribute]")
    print("  --task data.csv|data.parquet --client-column COLUMN --target COLUMN [--task-type regression]")
    print("  --task folder/                      one subfolder per client, images in class subfolders")
    return 0


def sync_command(args: argparse.Namespace) -> int:
    """A line per spool sent, set aside (on stderr) or left to its running process; exit status 1
    when any spool was set aside, else 0."""
    from fedhpo_core.outbox import shown, spools
    from fedhpo_core.tracking import spool_root, sync

    left = {str(spool.folder) for spool in spools(spool_root())}
    if not left:
        print(f"Nothing to send: no spool in {spool_root()}.")
        return 0
    replay = sync()
    for folder, count in replay.sent.items():
        print(f"Sent {count} MLflow writes from {shown(folder)}.")
    for refused in replay.set_aside:
        print(f"fedhpo sync: {refused.line()}", file=sys.stderr)
    for folder in sorted(left - set(replay.sent) - {str(refused.folder) for refused in replay.set_aside}):
        print(f"Left {shown(folder)}: the process that writes it is still running (or ran on another machine).")
    return 1 if replay.set_aside else 0


@contextmanager
def local_prefect():
    """Prefect set up for a run from this machine: against PREFECT_API_URL where it is set, else
    against the local server that `fedhpo` commands share (`cli.local_server`), whose address Dask
    workers are given too (else each would start a server of its own). An outage of the server is
    one line each way (`cli.prefect_outages`)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from an offline run
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # not every step of a local cluster's start
    from prefect.events.worker import EventsWorker
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)  # one line per round, not per task
    # MLflow's client retries say so once per retry; the outbox says once that the server is away.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    if not os.environ.get("FEDHPO_DEBUG"):
        _console_without_tracebacks()
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")  # and so on Dask workers
    from cli import local_server, prefect_outages

    settings = get_current_settings()
    if settings.api.url is not None:
        # A server of the user's own may be restarted under a run: the client's retries (backing off
        # 2, 4, 8... s) ride out about two minutes of it, where the user did not set their number.
        url, server_up = settings.api.url, lambda: not outage.ongoing
        chosen = "max_retries" in settings.client.model_fields_set
        updates = {} if chosen else {PREFECT_CLIENT_MAX_RETRIES: USER_SERVER_RETRIES}
    else:
        # Heartbeats let a server mark crashed runs, but joining the heartbeat thread added up to a
        # second to every flow run; runs against a server of the user's own keep them. A server on
        # this machine that refuses a connection is gone, not slow, while one that answers 503 is busy
        # (its SQLite database locked by the commands sharing it, seen in CI): three retries (2, 4, 8 s)
        # ride out the busy server, not Prefect's five (which held a run whose server was stopped for ~3
        # minutes of retries).
        url, server_up = local_server.api_url(), local_server.status
        updates = {
            PREFECT_API_URL: url,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
            PREFECT_CLIENT_MAX_RETRIES: LOCAL_SERVER_RETRIES,
        }
    with temporary_settings(updates=updates), prefect_outages.watch(url) as outage:
        try:
            yield
        finally:
            if server_up():
                # The last task-run events, before this process ends (the warm runner's commands
                # skip the interpreter's exit, where Prefect would deliver them).
                EventsWorker.drain_all()
            else:
                _abandon_deliveries()


def _abandon_deliveries() -> None:
    """Drop Prefect's undelivered events and logs: the server that would take them is gone, and at
    exit Prefect would try each again, one failed connection at a time (minutes for a few
    thousand events; a `fedhpo train` whose server was stopped took 10 minutes to exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    from cli import prefect_outages

    prefect_outages.silence_abandoned()  # an item in flight as the workers stop fails after the command's last line
    for service in (EventsWorker, APILogWorker):
        for worker in list(service._instances.values()):
            with contextlib.suppress(queue.Empty):
                while True:
                    worker._queue.get_nowait()
            worker._stop()


class WithoutTraceback(logging.Formatter):
    """A console formatter that leaves out a record's traceback: a failure is one line in the
    terminal (`main`); the traceback stays in the flow run's log in Prefect."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text:
            record = logging.makeLogRecord(record.__dict__ | {"exc_info": None, "exc_text": None})
        return self.inner.format(record)


def _console_without_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if hasattr(v, "handlers"))]
    for handler in {h for logger in loggers for h in logger.handlers}:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, WithoutTraceback):
            handler.setFormatter(WithoutTraceback(handler.formatter))


def server_command(args: argparse.Namespace) -> int:
    """What the `fedhpo` client answers itself for status and stop (`cli.warm`), run here too."""
    from cli import background, local_server

    if args.action != "start":
        return background.command(args.action, every=args.all)
    url = local_server.api_url().removesuffix("/api")
    idle = local_server.idle_exit_s()
    after = f", or {idle:g} s without a command or an active flow run" if idle > 0 else ""
    print(f"Local Prefect server at {url} (UI and API); `fedhpo server stop` stops it{after}.")
    return 0


def _flag_value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _interrupt(number: int, _frame) -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C: what finished is recorded and the rest marked."""
    raise Interrupted(number)


def parsed(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments; one a command does not know is refused by that command (`fedhpo train: error: ...`)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run a command; an interrupt (Ctrl-C, SIGTERM, SIGHUP) or a failure mid-run ends it with one line
    (the traceback with FEDHPO_DEBUG=1) and exit status 128 + the signal's number, or 1."""
    args = parsed(build_parser(), argv)
    if getattr(args, "preset", None):
        args = parsed(build_parser(COMPARISON_PRESETS[args.preset]), argv)
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return args.handler(args)
    except KeyboardInterrupt as interrupt:
        from cli.interrupts import left_behind

        number = getattr(interrupt, "number", signal.SIGINT)
        print(f"fedhpo {args.command}: interrupted; {left_behind(args)}", file=sys.stderr)
        return 128 + number
    except BrokenPipeError:  # `fedhpo methods | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more at exit either
        return 128 + signal.SIGPIPE
    except SettingsError as error:  # a refusal found after the checks up front: the same one line
        print(f"fedhpo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if os.environ.get("FEDHPO_DEBUG"):
            raise
        from fedhpo_core.stores import one_line

        print(f"fedhpo {args.command}: failed: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _set_aside_unsent()


def _set_aside_unsent() -> None:
    """Writes the MLflow tracking server did not take before the command ended: to the spool, in one line."""
    if "fedhpo_core.tracking" in sys.modules:
        from fedhpo_core.tracking import set_aside_unsent

        for line in set_aside_unsent():
            print(f"fedhpo: {line}", file=sys.stderr)
