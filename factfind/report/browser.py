"""A small headless-Chromium driver over the Chrome DevTools Protocol (CDP), standard library only.

Used to check generated reports in a real browser (console errors, network requests, layout,
screenshots). Chromium is started with ``--remote-debugging-pipe``, the transport Puppeteer and
Playwright use: CDP messages are JSON objects ended by a NUL byte, written to the browser on file
descriptor 3 and read from it on descriptor 4. No port, no websocket, no extra package.

A reader thread files responses by message id and keeps every event; :meth:`Browser.wait_event`
waits for one. Every wait has a timeout, and the browser's process group is always killed on
exit. JavaScript dialogs (``alert`` …) are dismissed as they open so a page cannot hang a test;
the ``Page.javascriptDialogOpening`` event is still recorded.

Example::

    with Browser() as browser:
        page = browser.new_page()
        page.goto(Path("report.html").resolve().as_uri())
        title = page.evaluate("document.title")
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Message = dict[str, Any]


class CDPError(RuntimeError):
    """The browser answered a command with an error, or went away."""


#: Flags every headless check starts Chromium with: this module's :class:`Browser` and the
#: Playwright tests and benchmarks (:func:`launch_playwright`). No sandbox (containers), no GPU,
#: and nothing that phones home, so a report check sees only the report's own requests.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run")


def launch_playwright(playwright: Any, executable: str | None = None, **kwargs: Any) -> Any:
    """Start the system Chromium (Debian's ``/usr/bin/chromium`` or what :func:`find_chromium`
    finds) through Playwright for Python, headless, with :data:`CHROMIUM_ARGS`: never a browser
    build that Playwright downloads. ``playwright`` is the object of ``sync_playwright()``.

    Example::

        with sync_playwright() as p:
            browser = launch_playwright(p)
            page = browser.new_page(); page.goto(Path("report.html").resolve().as_uri())
    """
    exe = executable or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium executable on PATH (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS),
                                      headless=True, **kwargs)


def find_chromium() -> str | None:
    """The path of a Chromium executable on PATH (Debian's ``chromium`` first), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """Headless Chromium driven over a CDP pipe; use as a context manager."""

    def __init__(self, executable: str | None = None, *, timeout: float = 30.0,
                 window: tuple[int, int] = (1280, 900)) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise FileNotFoundError("no chromium executable on PATH")
        self.executable, self.timeout, self.window = exe, timeout, window
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile = ""
        self._to_browser = self._from_browser = -1
        self._next_id = 0
        self._responses: dict[int, Message] = {}
        self._events: list[Message] = []
        self._closed = False
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # -- lifecycle

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="factfind-chromium-")
        cmd_r, cmd_w = os.pipe()     # we write commands, the browser reads fd 3
        evt_r, evt_w = os.pipe()     # the browser writes fd 4, we read
        width, height = self.window
        args = [
            self.executable, "--headless", *CHROMIUM_ARGS,
            "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}", "--hide-scrollbars", "--mute-audio",
            "--no-default-browser-check", "--disable-dev-shm-usage", "--disable-extensions",
            "--disable-default-apps", "--disable-domain-reliability",
            "--disable-client-side-phishing-detection", "--no-pings", "--metrics-recording-only",
            "--disable-breakpad", "--disable-crash-reporter",
            "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
            "about:blank",
        ]

        def child() -> None:  # between fork and exec: move the pipe ends to fds 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, evt_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        # keep everything chromium writes (crash-report database, caches) inside the profile
        env = {**os.environ, "HOME": self._profile,
               "XDG_CONFIG_HOME": os.path.join(self._profile, ".config"),
               "XDG_CACHE_HOME": os.path.join(self._profile, ".cache")}
        log = open(os.path.join(self._profile, "stderr.log"), "wb")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, preexec_fn=child,
                # dup2 leaves fds 3 and 4 inheritable; Python opens every other fd close-on-exec
                close_fds=False, start_new_session=True,
            )
        except BaseException:
            for fd in (cmd_r, cmd_w, evt_r, evt_w):
                os.close(fd)
            self._cleanup_profile()
            raise
        finally:
            log.close()
        os.close(cmd_r)
        os.close(evt_w)
        self._to_browser, self._from_browser = cmd_w, evt_r
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        self.send("Browser.getVersion")  # fails fast if the pipe does not work

    def close(self) -> None:
        """Ask the browser to quit, then kill its whole process group; always safe to call."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None and not self._closed:
                with contextlib.suppress(Exception):
                    self.send("Browser.close", timeout=3)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group we created: renderers, zygote…
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for fd in (self._to_browser, self._from_browser):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_browser = self._from_browser = -1
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._cleanup_profile()

    def _cleanup_profile(self) -> None:
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = ""

    def stderr_tail(self, n: int = 2000) -> str:
        """The end of the browser's log, for error messages."""
        try:
            return Path(self._profile, "stderr.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- transport

    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    break
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    self._dispatch(json.loads(raw))
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _dispatch(self, msg: Message) -> None:
        if msg.get("method") == "Page.javascriptDialogOpening":
            # dismiss at once so the page cannot block; tests read the recorded event
            with contextlib.suppress(OSError):
                self._write({"id": -1, "method": "Page.handleJavaScriptDialog",
                             "params": {"accept": False}, "sessionId": msg.get("sessionId")})
        with self._cond:
            if "id" in msg:
                self._responses[msg["id"]] = msg
            else:
                self._events.append(msg)
            self._cond.notify_all()

    def _write(self, msg: Message) -> None:
        data = json.dumps(msg).encode() + b"\0"
        with self._write_lock:
            while data:
                data = data[os.write(self._to_browser, data):]

    def send(self, method: str, params: Message | None = None, *, session_id: str | None = None,
             timeout: float | None = None) -> Message:
        """Send one command and return its ``result``; raises :class:`CDPError` on an error."""
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        msg: Message = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        try:
            self._write(msg)
        except OSError as e:
            raise CDPError(f"{method}: browser pipe closed ({e})\n{self.stderr_tail()}") from e
        reply = self._wait(lambda: self._responses.pop(msg_id, None), timeout, what=method)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _wait(self, found: Callable[[], Message | None], timeout: float | None, *,
              what: str) -> Message:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while True:
                if (hit := found()) is not None:
                    return hit
                if self._closed:
                    raise CDPError(f"browser exited while waiting for {what}\n{self.stderr_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {what}")
                self._cond.wait(left)

    def events(self, method: str | None = None, *, session_id: str | None = None) -> list[Message]:
        """Every event received so far, optionally only one method's or one session's."""
        with self._cond:
            return [e for e in self._events
                    if (method is None or e.get("method") == method)
                    and (session_id is None or e.get("sessionId") == session_id)]

    def wait_event(self, method: str, *, session_id: str | None = None,
                   predicate: Callable[[Message], bool] | None = None, since: int = 0,
                   timeout: float | None = None) -> Message:
        """Wait for an event (among those from index ``since`` on) and return it."""
        def found() -> Message | None:
            for e in self._events[since:]:
                if e.get("method") != method:
                    continue
                if session_id is not None and e.get("sessionId") != session_id:
                    continue
                if predicate is None or predicate(e.get("params", {})):
                    return e
            return None
        return self._wait(found, timeout, what=method)

    def new_page(self) -> Page:
        """Open a blank tab, attach to it and enable the Page, Runtime, Log and Network domains."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, session["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.send(f"{domain}.enable")
        return page


class Page:
    """One tab, addressed by its flat CDP session."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser, self.session_id = browser, session_id

    def send(self, method: str, params: Message | None = None, **kw: Any) -> Message:
        return self.browser.send(method, params, session_id=self.session_id, **kw)

    def events(self, method: str | None = None) -> list[Message]:
        return self.browser.events(method, session_id=self.session_id)

    def goto(self, url: str, *, timeout: float | None = None) -> None:
        """Navigate and wait for the load event."""
        since = len(self.browser.events())
        reply = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if reply.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {reply['errorText']}")
        self.browser.wait_event("Page.loadEventFired", session_id=self.session_id, since=since,
                                timeout=timeout)

    def evaluate(self, expression: str, *, timeout: float | None = None) -> Any:
        """Evaluate JavaScript (promises awaited) and return its value as JSON."""
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                               "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in reply:
            raise CDPError(f"JavaScript error: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def mouse_move(self, x: float, y: float) -> None:
        """Move the real mouse pointer to viewport coordinates (fires hover events)."""
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def screenshot(self, path: str | os.PathLike[str], *, full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or the whole page)."""
        params: Message = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                              "height": min(size["height"], 16000), "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out
