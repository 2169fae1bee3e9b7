"""Start-up: the warm runner that runs `fedhpo` commands and the local Prefect server they share,
with real processes and real signals."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import servers

from cli import background, local_server, warm

FEDHPO = str(Path(sys.executable).with_name("fedhpo"))
SMALL = ["--clients", "3", "--experiment", "startup"]


def fedhpo(*args: str, cwd=None) -> subprocess.Popen:
    return subprocess.Popen(
        [FEDHPO, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the runner's commands), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(lines)[-3000:]}")


def test_two_commands_started_together_on_a_fresh_machine_both_run(tmp_path):
    """A fresh PREFECT_HOME and a fresh MLflow store: both commands race to start the runner and the
    Prefect server and to create the stores; locks let the first do it and the second reuse it."""
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    servers.run_together([[FEDHPO, "train", "--rounds", "1", *SMALL]] * 2, tmp_path, env)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("startup").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)

    url = local_server.read_state(tmp_path / "prefect-home")["url"]  # its UI talks to its own API
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/ui-settings", timeout=10) as answer:
        assert json.load(answer)["api_url"] == f"{url}/api"
    stopped = subprocess.run([FEDHPO, "server", "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and "Stopped the local Prefect server" in stopped.stdout, stopped.stdout
    assert "Stopped the warm runner" in stopped.stdout and local_server.read_state(tmp_path / "prefect-home") is None
    status = subprocess.run(
        [FEDHPO, "server", "status"], env=env | {"FEDHPO_WARM": "0"}, capture_output=True, text=True
    )
    assert "No local Prefect server is running" in status.stdout


def test_the_runner_passes_on_exit_status_and_signals_and_stops_a_command_whose_client_died(tmp_path):
    bad = fedhpo("train", "--seed", "-1", cwd=tmp_path)
    output = bad.communicate(timeout=300)[0]
    assert bad.returncode == 2 and output == "fedhpo train: error: seed must be >= 0, got -1\n", output

    for how in (signal.SIGINT, signal.SIGKILL):
        process = fedhpo("train", "--rounds", "100000", *SMALL, cwd=tmp_path)
        wait_for_line(process, "round 2/")
        [runner] = background.runners(warm.address())
        runner_pid = runner["pid"]
        [command] = children_of(runner_pid)
        if how == signal.SIGINT:  # Ctrl-C: the command is interrupted and its client reports it
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=60)
            assert process.returncode != 0
        else:  # the client killed: its command goes too
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while command in children_of(runner_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert command not in children_of(runner_pid), how


def test_a_change_of_code_gives_another_fingerprint(tmp_path, monkeypatch):
    for package in warm.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(warm, "ROOT", tmp_path)
    before = warm.fingerprint()
    assert warm.fingerprint() == before
    (tmp_path / "flows" / "module.py").write_text("x = 2\n")
    assert warm.fingerprint() != before


@pytest.mark.parametrize("code", [0, 3])
def test_finish_ends_with_the_commands_status_after_exit_handlers(code, tmp_path):
    """`finish` exits without the interpreter's teardown, but after atexit handlers ran."""
    marker = tmp_path / "atexit"
    script = (
        "import atexit, pathlib, sys\n"
        "from cli.warm import finish\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('ran'))\n"
        f"finish(lambda: sys.exit({code}))\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == code and "not reached" not in done.stdout and marker.read_text() == "ran"
