"""A real headless Chromium, driven over its DevTools protocol: open a page, wait until it shows
what a test looks for, read what it rendered, take a screenshot."""

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import servers
from websockets.sync.client import connect

# MLflow 3.17's UI opens its Assistant panel over the right third of the page on a first visit from
# localhost; these keys of its localStorage say it was seen and closed.
MLFLOW_ASSISTANT_CLOSED = {
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
}


class Page:
    """The browser's one tab."""

    def __init__(self, socket):
        self.socket, self.calls = socket, 0

    def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events arriving meanwhile are skipped)."""
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def open(self, url: str, until: str = "true", timeout: float = 90) -> str:
        """Go to `url` and wait until the JavaScript expression `until` holds; the page's text then."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"document.readyState === 'complete' && Boolean({until})"):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}: not {until} after {timeout} s; the page shows:\n{self.text()[:2000]}")
            time.sleep(0.5)
        return self.text()

    def click(self, element: str) -> None:
        """A mouse click on the middle of the element the JavaScript expression `element` gives."""
        box = self.evaluate(f"(r => [r.x, r.y, r.width, r.height])(({element}).getBoundingClientRect())")
        x, y = box[0] + box[2] / 2, box[1] + box[3] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, text: str) -> None:
        """Text typed into the focused element."""
        self.call("Input.insertText", text=text)

    def press(self, key: str, code: int) -> None:
        """A key (`key` as the DOM names it, `code` its Windows virtual key code) pressed and released."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def html(self) -> str:
        return self.evaluate("document.documentElement.outerHTML") or ""

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def set_local_storage(self, origin: str, items: dict[str, str]) -> None:
        """Items of `origin`'s localStorage, set from a page of that origin that is not the app."""
        self.open(f"{origin.rstrip('/')}/health")
        for key, value in items.items():
            self.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")


@contextlib.contextmanager
def chromium(profile: Path, width: int = 1400, height: int = 900) -> Iterator[Page]:
    """Debian's headless Chromium with a fresh profile, its window `width` x `height`; stopped on exit."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        servers.skip_or_fail("no chromium on PATH")
    port = servers.free_port()
    command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
    command += ["--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}"]
    command += [f"--window-size={width},{height}", f"--remote-debugging-port={port}", "about:blank"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{servers.LOCALHOST}:{port}/json", timeout=2) as answer:
                    tabs = json.load(answer)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError(f"chromium gave no DevTools endpoint on port {port}") from None
                time.sleep(0.2)
        address = next(tab["webSocketDebuggerUrl"] for tab in tabs if tab["type"] == "page")
        with connect(address, max_size=2**28) as socket:
            page = Page(socket)
            page.call("Page.enable")
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            page.call("Emulation.setDeviceMetricsOverride", **metrics)
            yield page
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
