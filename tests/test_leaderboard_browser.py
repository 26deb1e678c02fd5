"""The rendered leaderboard page in a real headless Chromium: visible, sortable, escaped.

Chromium is driven through the Chrome DevTools Protocol over `--remote-debugging-pipe`
(NUL-separated JSON on file descriptors 3 and 4), so no Python package beyond the
standard library is needed. Needs the Debian package `chromium` (/usr/bin/chromium, or
the path in $MUSE_BENCH_CHROMIUM); skipped without it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from muse_bench.leaderboard import page as lb_page
from muse_bench.leaderboard import rows as lb

CHROMIUM = os.environ.get("MUSE_BENCH_CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)",
)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    "--remote-debugging-pipe",
)

# knowmem_r sorts differently as numbers (9.5 < 23 < 55.2 < 100) and as text.
ROWS = [
    ("target", "target", 58.4, -99.8, 63.9, 55.2),
    ("retrain", "retrain", 20.8, 0.0, 33.1, 100.0),
    ("GA", "ga", 0.0, 150.0, 0.0, 9.5),
    ("<img src=x onerror=alert(1)>", "npo", 12.0, -5.0, 30.0, 23.0),
]


def _high_fd(fd: int) -> int:
    """A close-on-exec duplicate of `fd` numbered 10 or more; `fd` itself is closed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """A minimal CDP client over Chromium's debugging pipe."""

    def __init__(self, user_data_dir: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Move the child's ends above 4 so that dup2 onto 3 and 4 never hits its own source
        # (dup2(fd, fd) would keep the close-on-exec flag and Chromium would get no pipe).
        to_chrome_r, from_chrome_w = (_high_fd(to_chrome_r), _high_fd(from_chrome_w))

        def to_fds_3_and_4() -> None:  # runs in the child before exec
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=to_fds_3_and_4,
            close_fds=False,  # fds 3 and 4 must survive exec; Python's own fds are CLOEXEC
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the debugging pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 20
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 20) -> dict[str, Any]:
        """Wait for (and consume) the first event named `method`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


class Page:
    """One tab, attached in flat mode."""

    def __init__(self, cdp: DevTools) -> None:
        self.cdp = cdp
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.cdp.send(method, params, self.session)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.cdp.wait_event("Page.loadEventFired")
        deadline = time.monotonic() + 20  # the load event may have been about:blank's
        while self.js("location.href + ' ' + document.readyState") != f"{url} complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.05)

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the centre of the element."""
        box = self.js(
            f"(function(){{var e=document.querySelector({json.dumps(selector)});"
            "e.scrollIntoView({block:'center'});var r=e.getBoundingClientRect();"
            "return {x:r.left+r.width/2,y:r.top+r.height/2};})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    csv_path = root / "news.csv"
    for i, (name, algo, vf, pl, kf, kr) in enumerate(ROWS):
        report = {
            "name": name,
            "benchmark": "muse-news@test",
            "corpus": "news",
            "algo": algo,
            "params": {} if algo in ("target", "retrain") else {"lr": 1e-5},
            "seed": 0,
            "metrics": {"verbmem_f": vf, "privleak": pl, "knowmem_f": kf, "knowmem_r": kr},
            "versions": {"muse_bench": "0.1.0"},
            "created": "2025-01-01T00:00:00+00:00",
            "run_id": f"run-{i}",
        }
        assert lb.append_row(csv_path, lb.row_from_report(report))
    lb_page.render([csv_path], root / "out")
    return root / "out" / "index.html"


@pytest.fixture(scope="module")
def page(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    cdp = DevTools(tmp_path_factory.mktemp("chromium-profile"))
    try:
        tab = Page(cdp)
        tab.goto(site.as_uri())
        yield tab
    finally:
        cdp.close()


def column_values(page: Page, column: str) -> list[str]:
    return page.js(
        "(function(){var t=document.querySelector('table.leaderboard');"
        f"var i=Array.prototype.findIndex.call(t.tHead.rows[0].cells,function(c){{return c.dataset.column==={json.dumps(column)};}});"
        "return Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[i].getAttribute('data-sort')||r.cells[i].textContent;});})()"
    )


def test_table_is_visible_and_escaped(page: Page) -> None:
    state = page.js(
        "(function(){var t=document.querySelector('table.leaderboard');var r=t.getBoundingClientRect();"
        "var s=getComputedStyle(t);return {w:r.width,h:r.height,vis:s.visibility,disp:s.display,"
        "rows:t.tBodies[0].rows.length,injected:document.querySelectorAll('td img').length,"
        "names:Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[0].textContent;})};})()"
    )
    assert state["w"] > 0 and state["h"] > 0
    assert state["vis"] == "visible" and state["disp"] != "none"
    assert state["rows"] == len(ROWS)
    assert state["injected"] == 0  # the name stays text, not markup
    assert "<img src=x onerror=alert(1)>" in state["names"]


def test_plots_load(page: Page) -> None:
    images = page.js(
        "Array.prototype.map.call(document.images,function(i){return [i.getAttribute('src'),i.naturalWidth];})"
    )
    assert images, "the page shows no plots"
    assert all(width > 0 for _, width in images), images  # relative PNGs load under the CSP


def test_clicking_headers_sorts_numerically(page: Page) -> None:
    selector = 'th[data-column="knowmem_r"] button'
    page.click(selector)
    assert [float(v) for v in column_values(page, "knowmem_r")] == [9.5, 23.0, 55.2, 100.0]
    assert (
        page.js("document.querySelector('th[data-column=\"knowmem_r\"]').getAttribute('aria-sort')")
        == "ascending"
    )
    page.click(selector)
    assert [float(v) for v in column_values(page, "knowmem_r")] == [100.0, 55.2, 23.0, 9.5]
    assert (
        page.js("document.querySelector('th[data-column=\"knowmem_r\"]').getAttribute('aria-sort')")
        == "descending"
    )

    page.click('th[data-column="privleak"] button')
    assert [float(v) for v in column_values(page, "privleak")] == [-99.8, -5.0, 0.0, 150.0]
    sorted_heads = page.js(
        "Array.prototype.map.call(document.querySelectorAll('th[aria-sort]'),function(h){return h.dataset.column;})"
    )
    assert sorted_heads == ["privleak"]  # only one column is marked as sorted


def test_clicking_text_header_sorts_alphabetically(page: Page) -> None:
    page.click('th[data-column="algo"] button')
    assert column_values(page, "algo") == ["ga", "npo", "retrain", "target"]


def test_no_script_errors_and_screenshot(page: Page, tmp_path: Path) -> None:
    errors = [e for e in page.cdp.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not errors, errors
    shot = page.send("Page.captureScreenshot", {"format": "png"})
    path = tmp_path / "leaderboard.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
