"""Headless Chromium driven over the Chrome DevTools Protocol with the `websockets` package the
project already depends on (no selenium / chromedriver): the dashboard's browser test and the
WebRTC call from a real browser use it. No browser is a failure, not a skip: install it
(Debian: `apt-get install -y chromium`) or point MESHRT_TEST_CHROMIUM at one."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from websockets.sync.client import connect as ws_connect

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,1000",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def find_chromium() -> str:
    for name in (
        os.environ.get("MESHRT_TEST_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ):
        path = name and shutil.which(name)
        if path:
            return path
    pytest.fail(
        "the dashboard test needs a real browser and found none: install Chromium "
        "(Debian/Ubuntu: `apt-get install -y chromium`) or set MESHRT_TEST_CHROMIUM=/path/to/chrome",
        pytrace=False,
    )


class Page:
    """One browser tab over CDP: call methods, evaluate JS, keep the events seen meanwhile."""

    def __init__(self, ws_url: str):
        self.ws = ws_connect(ws_url, max_size=None, open_timeout=15, compression=None)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == message_id:
                if "error" in message:
                    raise AssertionError(f"CDP {method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"JS {expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30, what: str | None = None):
        return wait_for(lambda: self.js(expression), timeout, 0.05, what or expression)

    def text(self, selector: str) -> str:
        return self.js(f"document.querySelector({json.dumps(selector)}).textContent.trim()")

    def texts(self, selector: str) -> list[str]:
        return self.js(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent.trim())")

    def visible(self, element_id: str) -> bool:
        return self.js(
            f"(e => !!e && !e.closest('[hidden]') && e.getClientRects().length > 0)"
            f"(document.getElementById({json.dumps(element_id)}))"
        )

    def type_into(self, element_id: str, text: str) -> None:
        self.js(f"document.getElementById({json.dumps(element_id)}).focus()")
        self.call("Input.insertText", text=text)

    def click(self, element_id: str) -> None:
        self.js(f"document.getElementById({json.dumps(element_id)}).click()")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and CSP violations seen so far."""
        self.call("Runtime.evaluate", expression="0")  # drain pending events
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry'].get('text')}")
        return found

    def close(self) -> None:
        self.ws.close()


class Browser:
    def __init__(self, executable: str, profile: Path, log: Path, extra_flags: tuple[str, ...] = ()):
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, *extra_flags, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "ab"),
            start_new_session=True,
        )
        active = profile / "DevToolsActivePort"

        def port():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"Chromium exited with {self.proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
                )
            lines = active.read_text().splitlines() if active.exists() else []
            return int(lines[0]) if len(lines) >= 2 else None

        self.port = wait_for(port, 30, 0.05, "Chromium's DevTools port")

    def page(self) -> Page:
        def first_page():
            targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=5).json()
            return next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)

        page = Page(wait_for(first_page, 15, 0.05, "a Chromium tab"))
        page.call("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
        for domain in ("Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group: the browser's helpers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
