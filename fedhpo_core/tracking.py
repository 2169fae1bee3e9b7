"""Experiment tracking: the one module that talks to MLflow.

A `Tracker` is one MLflow run. Each call writes one batch: a round's ~70 metrics cost ~22 ms
in SQLite here, about the same per row whether batched per round or per run, and MLflow's
asynchronous logging left a backlog that competed with training for the cores and took longer
to drain at the end than writing as we go. `MLFLOW_TRACKING_URI` chooses the store; MLflow's
default is `sqlite:///mlflow.db` in the working directory.

Every write goes through the store's `Outbox`: with a tracking server, writes made while it is
away are kept (in memory, then in a spool folder) and sent in order when it is back; calls that
need its answer (a new run, a read) wait for it. MLflow's own retries are shortened to a few
seconds (`MLFLOW_RETRIES`; the user's settings win): the outbox rides out longer outages.
"""

import functools
import http.client
import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import HTTPError, RetryError, Timeout

from fedhpo_core.locking import file_lock
from fedhpo_core.outbox import Outbox, Replay, replay_spools
from fedhpo_core.settings import SettingsError
from fedhpo_core.stores import CONNECT_TIMEOUT_S, check_database, check_folder, is_database_url, masked, one_line

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
# MLflow 3's UI opens an experiment on its GenAI overview unless the URL asks for the model-training
# view (the `workflowType` parameter; the experiment tag alone does not change the landing in 3.17).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description: its Overview renders it as Markdown
MAX_METRICS_PER_BATCH = 1000


def torch_version() -> str:
    """torch's release, without the build's local label (+cu130): what a model needs installed."""
    return torch.__version__.split("+")[0]


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def health_url(uri: str) -> str:
    """A tracking server's health check, without the credentials its URI may carry (urllib reads them as the host)."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))


def check_tracking_store(experiment: str | None = None) -> None:
    """MLflow's tracking store can be used (`fedhpo_core.stores`): a local folder we can write (if
    MLflow allows one), a database of its own we can open, or a tracking server that answers its
    health check; and `experiment` is a name it takes."""
    uri = tracking_uri()
    what = f"MLflow tracking store {masked(uri)}"
    if experiment is not None and len(experiment) > MAX_EXPERIMENT_NAME_LENGTH:
        raise SettingsError(
            f"--experiment: a name of {len(experiment)} characters; MLflow takes at most {MAX_EXPERIMENT_NAME_LENGTH}"
        )
    parts = urllib.parse.urlparse(uri)
    if parts.scheme in ("", "file"):
        if parts.netloc not in ("", "localhost"):
            raise SettingsError(f"{what}: a folder store is on this machine (file:///path), not on {parts.netloc!r}")
        path = Path(parts.path if parts.scheme else uri).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise SettingsError(f"{what}: {path} is a file; a file store is a folder (for SQLite: sqlite:///{path})")
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise SettingsError(
                f"{what}: MLflow refuses a folder store unless MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///path/mlflow.db"
            )
        check_folder(path, what)
    elif parts.scheme in ("http", "https"):
        try:  # through the proxies the environment names, as MLflow's own client goes
            urllib.request.urlopen(health_url(uri), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise SettingsError(f"{what}: the tracking server does not answer ({one_line(error)})") from error
    elif is_database_url(uri):
        check_database(uri, "MLflow tracking store", "MLflow")
    else:
        raise SettingsError(
            f"{what}: unknown scheme {parts.scheme!r}; use sqlite:///, postgresql://, http(s)://, or a folder"
        )


_prepared: set[str] = set()
_outboxes: dict[str, Outbox] = {}
# MLflow's client retries: two, after 0 and 2 s (plus jitter), not seven over ~4 minutes; the outbox does the rest.
MLFLOW_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
HEALTH_TIMEOUT_S = 2.0
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # a request of the API any server answers
SPOOL_ROOT = "fedhpo-spool"  # in the working directory, beside the default stores; FEDHPO_SPOOL overrides
log = logging.getLogger("fedhpo.tracking")
# fedhpo's MLflow run tags, all of them here.
ROLE_TAG = "fedhpo.role"  # what a run is: train, study, trial, final, comparison
STUDY_TAG = "fedhpo.study"  # the study a study or trial run belongs to
TRIAL_TAG = "fedhpo.trial"  # a trial run's Optuna trial number
TRIAL_START_TAG = "fedhpo.trial_start"  # when its Optuna trial was created: with the two above, which trial
PROCESS_TAG = "fedhpo.process"  # host:pid:start time of the process that writes a run
ORPHANED_TAG = "fedhpo.orphaned"  # set on a run closed because its process was gone


def process_identity(pid: int) -> str | None:
    """host:pid:start time (clock ticks after boot) of a running process; None when none runs.
    The start time tells a process from a later one given the same pid."""
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{socket.gethostname()}:{pid}:{started}"


def is_server(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def server_answers(uri: str) -> bool:
    """Whether the tracking server at `uri` answers its health check (through the environment's proxies, as MLflow)."""
    try:
        urllib.request.urlopen(health_url(uri), timeout=HEALTH_TIMEOUT_S).close()
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False


def api_failure(uri: str) -> str | None:
    """What the tracking server at `uri` does instead of answering a request to its API ('HTTP 503',
    'TimeoutError'); None when it answers (any status but a server error: a refusal is an answer).
    Its health check alone does not tell: a server may answer it and fail every request."""
    probe = health_url(uri).removesuffix("/health") + API_PROBE
    try:
        urllib.request.urlopen(probe, timeout=HEALTH_TIMEOUT_S).close()
        return None
    except urllib.error.HTTPError as error:
        return None if error.code < 500 else f"HTTP {error.code}"
    except (OSError, ValueError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        return reason if isinstance(reason, str) else type(reason).__name__


def absence(uri: str, error: BaseException) -> str:
    """How the tracking server at `uri` is away, said once when it goes: unreachable, or answering
    its health check but not its API (and what the API does instead)."""
    if not server_answers(uri):
        return f"unreachable ({type(error).__name__})"
    return f"answers its health check but not its API ({api_failure(uri) or type(error).__name__})"


def server_away(uri: str, error: BaseException) -> bool:
    """Whether `error` says the tracking server at `uri` is away (not reached, or answering only
    errors while its API fails other requests too), rather than refusing a request it understood."""
    if not is_server(uri):
        return False
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RestException):
            return False  # the server answered, with a reason
        if isinstance(seen, (RequestsConnectionError, Timeout, ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, (RetryError, HTTPError)):
            return api_failure(uri) is not None
        if isinstance(seen, MlflowException) and seen.get_http_status_code() >= 500:
            return api_failure(uri) is not None  # a server error once MLflow's retries (maybe none) are spent
        seen = seen.__cause__ or seen.__context__
    return False


def send_to(uri: str):
    """How a kept write (`Outbox`) is made on the store at `uri`. The client is made at the first
    write: making one opens the store, which `prepare_store` must do first (a new SQLite store is
    created under its lock)."""
    client_once = functools.cache(lambda: MlflowClient(uri))

    def send(record: dict, file: Path | None) -> None:
        kind, run_id, client = record["op"], record.get("run_id"), client_once()
        if kind == "log_batch":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])]
            params = [Param(k, v) for k, v in record.get("params", [])]
            tags = [RunTag(k, v) for k, v in record.get("tags", [])]
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        elif kind == "set_status":
            client.update_run(run_id, status=record["status"])
        elif kind == "set_terminated":
            client.set_terminated(run_id, record["status"], end_time=record["end_time"])
        elif kind == "log_artifact":
            client.log_artifact(run_id, str(file), record["artifact_path"] or None)
        elif kind == "set_experiment_tag":
            client.set_experiment_tag(record["experiment_id"], record["key"], record["value"])
        else:
            raise ValueError(f"unknown tracking write {kind!r}")

    return send


# The writes `send_to` makes: each kind's fields and their types (`check_write`).
WRITE_FIELDS = {
    "log_batch": {"run_id": str},
    "set_status": {"run_id": str, "status": str},
    "set_terminated": {"run_id": str, "status": str, "end_time": int},
    "log_artifact": {"run_id": str, "artifact_path": str, "file": str},
    "set_experiment_tag": {"experiment_id": str, "key": str, "value": str},
}
BATCH_ITEMS = {"metrics": (str, int | float, int, int), "params": (str, str), "tags": (str, str)}


def check_write(record: dict) -> None:
    """A write `send_to` can make, whole; else ValueError saying what is wrong (a spool read back
    may be damaged or planted)."""
    kind = record.get("op")
    if kind not in WRITE_FIELDS:
        raise ValueError(f"unknown kind of write {str(kind)[:50]!r}")
    for name, kind_of in WRITE_FIELDS[kind].items():
        if not isinstance(record.get(name), kind_of):
            raise ValueError(f"a {kind} write without {name} ({kind_of.__name__})")
    for name, types in BATCH_ITEMS.items() if kind == "log_batch" else ():
        items = record.get(name, [])
        if not isinstance(items, list) or not all(
            isinstance(item, list) and len(item) == len(types) and all(map(isinstance, item, types)) for item in items
        ):
            raise ValueError(f"a log_batch write whose {name} are not lists of {len(types)} values of their types")


def spool_root() -> Path:
    return Path(os.environ.get("FEDHPO_SPOOL", SPOOL_ROOT)).absolute()


def outbox() -> Outbox:
    """The outbox of the tracking store in use (one per store and process)."""
    uri = tracking_uri()
    if uri not in _outboxes:
        identity = process_identity(os.getpid()) or f"{socket.gethostname()}:{os.getpid()}:0"
        _outboxes[uri] = Outbox(
            uri,
            spool_root() / identity,
            send_to(uri),
            is_outage=lambda error: server_away(uri, error),
            reachable=lambda: api_failure(uri) is None,
            absence=lambda error: absence(uri, error),
            say=log.warning,
        )
    return _outboxes[uri]


def process_gone(folder_name: str) -> bool:
    """Whether the process a spool folder is named for (host:pid:start) no longer runs here; a folder
    of this host named otherwise is no running process's."""
    host, _, rest = folder_name.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and not (pid.isdigit() and process_identity(int(pid)) == folder_name)


def sync(uri: str | None = None) -> Replay:
    """Send the spools left by processes that ended with writes unsent (those for `uri` only, if
    given); a spool that cannot be sent as it is, is set aside (`outbox.replay_spools`). Raises what
    the server's absence raises."""
    shorten_retries()
    return replay_spools(
        spool_root(),
        uri,
        send_to,
        alive=lambda name: not process_gone(name),
        is_outage=server_away,
        check_write=check_write,
    )


def shorten_retries() -> None:
    """MLflow's client retries as `MLFLOW_RETRIES` sets them, unless the environment sets them."""
    for name, value in MLFLOW_RETRIES.items():
        os.environ.setdefault(name, value)


def set_aside_unsent() -> list[str]:
    """At the end of a command: writes no server took go to their spools; a line naming each."""
    return [line for box in _outboxes.values() if (line := box.set_aside())]


def close_orphaned_runs(client: MlflowClient) -> list[str]:
    """Runs left RUNNING by a process of this machine that no longer runs (killed: SIGKILL, a
    power cut) end KILLED, tagged `fedhpo.orphaned`; their ids."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    running = client.search_runs(
        experiments, f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` LIKE '{host}:%'", max_results=1000
    )
    orphaned = []
    for run in running:
        recorded = run.data.tags[PROCESS_TAG]
        if process_identity(int(recorded.split(":")[1])) != recorded:
            client.set_tag(run.info.run_id, ORPHANED_TAG, "true")
            client.set_terminated(run.info.run_id, "KILLED")
            orphaned.append(run.info.run_id)
    return orphaned


def prepare_store() -> None:
    """Open the MLflow store once per process, creating it where missing (for SQLite under a lock
    file beside the database: a new SQLite store is migrated at first use, and two processes doing
    so at once race: one dies), send what ended processes left in their spools for it, and close
    the runs killed processes left RUNNING."""
    uri = tracking_uri()
    if uri in _prepared:
        return
    shorten_retries()
    if uri.startswith("sqlite:///"):
        with file_lock(Path(uri.removeprefix("sqlite:///") + ".lock")):
            MlflowClient().search_experiments(max_results=1)
    if is_server(uri):
        replay = outbox().call(sync, uri)
        for folder, sent in replay.sent.items():
            log.warning("sent %d MLflow writes a stopped process left in %s", sent, folder)
        for refused in replay.set_aside:
            log.warning("%s", refused.line())
    outbox().call(close_orphaned_runs, MlflowClient())
    _prepared.add(uri)


class Tracker:
    """An MLflow run, written through the client API (no global active run, so safe in threads) and
    the store's `Outbox`: writes are sent, or kept through an outage; reads wait it out."""

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent: "Tracker | None" = None,
        run_id: str | None = None,
    ):
        """A new run (nested under `parent` if given), or with `run_id` that run reopened."""
        prepare_store()
        self.client = MlflowClient()
        self.outbox = outbox()
        if run_id:
            run = self.outbox.call(self.client.get_run, run_id)
            self.run_id, self.experiment_id = run_id, run.info.experiment_id
            self.params = dict(run.data.params)
            self.outbox.write({"op": "set_status", "run_id": run_id, "status": "RUNNING"})
            if identity := process_identity(os.getpid()):
                self.set_tags({PROCESS_TAG: identity})
            return
        self.params = {}
        self.experiment_id = self.outbox.call(self._experiment_id, experiment)
        tags = dict(tags or {}) | ({"mlflow.parentRunId": parent.run_id} if parent else {})
        if identity := process_identity(os.getpid()):  # where /proc tells (Linux); else no sweep
            tags[PROCESS_TAG] = identity
        run = self.outbox.call(self.client.create_run, self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, creating it if missing; another process may create it first."""
        if found := self.client.get_experiment_by_name(name):
            return found.experiment_id
        try:
            return self.client.create_experiment(name, tags=EXPERIMENT_KIND)
        except MlflowException:
            if found := self.client.get_experiment_by_name(name):
                return found.experiment_id
            raise

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """FINISHED; FAILED on an error (an Exception); KILLED when the process is being stopped (a
        BaseException that is not one: Ctrl-C's KeyboardInterrupt, Prefect's SIGTERM signal)."""
        if error is None:
            self.finish("FINISHED")
        else:
            self.finish("FAILED" if isinstance(error, Exception) else "KILLED")

    def _log_batch(self, metrics=(), params=(), tags=()) -> None:
        """One write of MLflow's log_batch (metrics as (key, value, timestamp, step))."""
        record = {"op": "log_batch", "run_id": self.run_id}
        for name, items in (("metrics", metrics), ("params", params), ("tags", tags)):
            if items:
                record[name] = [list(item) for item in items]
        self.outbox.write(record)

    def log_params(self, params: Mapping[str, object]) -> None:
        items = [(k, str(v)) for k, v in params.items()]
        self.params |= dict(items)
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._log_batch(params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_history({step: metrics})

    def log_metric_history(self, history: Mapping[int, Mapping[str, float]]) -> None:
        """Metrics of many steps ({step: {key: value}}) in as few batches as MLflow allows."""
        now = int(time.time() * 1000)
        items = [(k, float(v), now, step) for step, metrics in history.items() for k, v in metrics.items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._log_batch(metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def log_client_configs(self, trajectory) -> None:
        """The clients' configurations over the run (`reports.ConfigTrajectory`): settings that never
        changed as params (unless the run holds them already), the others as
        `trajectory/client_hyperparameters.csv` and `.png` and per-round `hp/<name>/mean|min|max`
        (and `clients_sampled` where the number of clients per round changed)."""
        self.log_params({name: value for name, value in trajectory.constant().items() if name not in self.params})
        table = trajectory.table()
        if not table.empty:
            self.log_table(table, "trajectory/client_hyperparameters.csv")
            self.log_figure(trajectory.figure(), "trajectory/client_hyperparameters.png")
        self.log_metric_history(trajectory.summaries())

    def describe(self, markdown: str) -> None:
        """The run's description, shown on its Overview."""
        self.set_tags({DESCRIPTION_TAG: markdown})

    def share_view(self, key: str, state: Mapping[str, object]) -> None:
        """A view of the experiment's runs table (filter, columns, sort, grouping) that the UI opens
        at `view_url(..., key)`: MLflow 3 keeps shared views as experiment tags."""
        value = json.dumps(dict(state))
        record = {"op": "set_experiment_tag", "experiment_id": self.experiment_id, "value": value}
        self.outbox.write(record | {"key": f"mlflow.sharedViewState.{key}"})

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self._log_batch(tags=[(k, str(v)) for k, v in tags.items()])

    def log_file(self, write, artifact_file: str) -> None:
        """The artifact `artifact_file` that `write(path)` writes."""
        folder_name = str(Path(artifact_file).parent)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(artifact_file).name
            write(path)
            under = "" if folder_name == "." else folder_name
            record = {"op": "log_artifact", "run_id": self.run_id, "artifact_path": under}
            self.outbox.write(record, path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.log_file(lambda path: path.write_text(text), artifact_file)

    def log_table(self, table: pd.DataFrame, artifact_file: str) -> None:
        self.log_text(table.to_csv(index=False), artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.log_file(figure.savefig, artifact_file)

    def log_state(self, state: Mapping[str, object], artifact_file: str) -> str:
        """Tensors and numbers (a `FederationState`'s fields) as a torch file; returns the URI any
        process of the study reads it back from (`load_state`)."""
        self.log_file(lambda path: torch.save(dict(state), path), artifact_file)
        return f"runs:/{self.run_id}/{artifact_file}"

    def log_model(self, model, input_example, name: str = "model") -> str:
        """The model through `mlflow.pytorch.log_model` in its default 'pt2' format (pickled, with one
        warning line, where torch.export cannot trace it).

        pt2 needs `input_example` (without it the logged model ends FAILED) and fixes any example
        dimension of size 1, so the example needs a batch of several. Naming the requirement
        skips MLflow's inference of it, which re-imports the model in a subprocess (~7 s here).
        """
        if len(input_example) < 2:
            raise ValueError("input_example needs a batch of at least 2 so the batch size stays dynamic")

        def send() -> str:
            with mlflow.start_run(run_id=self.run_id):  # so the model is filed under the run's experiment
                requirements = [f"torch=={torch_version()}"]
                try:
                    return mlflow.pytorch.log_model(
                        model, name=name, input_example=input_example, pip_requirements=requirements
                    ).model_uri
                except Exception as error:  # torch.export cannot trace some models (control flow on the data)
                    if not type(error).__module__.startswith("torch"):
                        raise
                    log.warning(
                        "model %s is logged pickled: torch.export cannot trace it (%s)", name, one_line(error)[:200]
                    )
                    return mlflow.pytorch.log_model(
                        model, name=name, serialization_format="pickle", pip_requirements=requirements
                    ).model_uri

        return self.outbox.call(send)

    def register_model(self, model_uri: str, name: str, tags: Mapping[str, object]) -> str:
        """A new version of registered model `name` (created if missing) from a logged model, with
        `tags` as version tags; the version's number."""
        tags = {k: str(v) for k, v in tags.items()}
        return str(self.outbox.call(mlflow.register_model, model_uri, name, tags=tags).version)

    def search_runs(self, filter_string: str) -> list:
        """Runs of the run's experiment that match `filter_string`."""
        return self.outbox.call(self.client.search_runs, [self.experiment_id], filter_string)

    def finish(self, status: str = "FINISHED", run_id: str | None = None) -> None:
        """End the run (or another, `run_id`) with `status`."""
        record = {"op": "set_terminated", "run_id": run_id or self.run_id, "status": status}
        self.outbox.write(record | {"end_time": int(time.time() * 1000)})


def set_model_alias(name: str, alias: str, version: str) -> None:
    """Point `alias` of registered model `name` at `version` (moved from any version it was on)."""
    outbox().call(MlflowClient().set_registered_model_alias, name, alias, version)


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_base() -> str:
    """Where the MLflow UI of the tracking store is: the tracking server itself, else `mlflow ui`
    started on the store (`browse_lines`); a password in its URI shown as ***, since links are printed and kept."""
    uri = tracking_uri()
    return masked(uri).rstrip("/") if urllib.parse.urlparse(uri).scheme in ("http", "https") else LOCAL_UI


def run_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A run's (or with no run, the experiment's) page in the MLflow UI at `base` ('' for a link
    within the UI), in the model-training view."""
    path = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}{path}?{MODEL_TRAINING_VIEW}"


def view_url(base: str, experiment_id: str, key: str) -> str:
    """The experiment's runs table in the shared view `key` (`Tracker.share_view`)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&{MODEL_TRAINING_VIEW}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of these runs: a parallel-coordinates plot of the params that differ
    between them (the first three, alphabetically) against a metric they share."""
    runs, experiments = (urllib.parse.quote(json.dumps(v, separators=(",", ":"))) for v in (run_ids, [experiment_id]))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}&{MODEL_TRAINING_VIEW}"


def browse_lines(experiment_id: str, run_id: str) -> list[str]:
    """How to open a run in the MLflow UI: its URL, after starting `mlflow ui` where the store is local."""
    url = run_url(ui_base(), experiment_id, run_id)
    if ui_base() != LOCAL_UI:
        return [f"Browse it: {url}"]
    return [f"Browse it: mlflow ui --backend-store-uri {masked(tracking_uri())}", f"  then open {url}"]


def load_state(uri: str, device: torch.device | str = "cpu") -> dict:
    """What `Tracker.log_state` stored at `uri`, its tensors on `device` (without MLflow's download
    progress bar: a study loads a checkpoint per continued trial)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as folder:
        path = outbox().call(mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=folder)
        return torch.load(path, map_location=device, weights_only=True)
