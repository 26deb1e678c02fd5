"""The rendered leaderboard page in a real headless Chromium: visible, escaped, sortable,
filterable, fitting a 1280 px window; writes a full-page screenshot for review.

Chromium is driven through the Chrome DevTools Protocol over `--remote-debugging-pipe`
(NUL-separated JSON on file descriptors 3 and 4), so no Python package beyond the
standard library is needed. Needs the Debian package `chromium` (/usr/bin/chromium, or
the path in $MUSE_BENCH_CHROMIUM); skipped without it. The screenshot goes to the test's
tmp dir and, when $MUSE_SCREENSHOT_DIR is set, there too.
"""

from __future__ import annotations

import base64
import csv
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
    "--window-size=1280,900",
    "--remote-debugging-pipe",
)

NEWS, BOOKS = "muse-news@test", "muse-books@test"
XSS = "<img src=x onerror=alert(1)>"
# knowmem_r sorts differently as numbers (9.5 < 23 < 41 < 100) and as text.
ROWS = [
    ("target", "target", 58.4, -99.8, 63.9, 55.2),
    ("retrain", "retrain", 20.8, 0.0, 33.1, 100.0),
    ("GA", "ga", 0.0, 150.0, 0.0, 9.5),
    (XSS, "npo", 12.0, -5.0, 30.0, 23.0),
    ("NPO+GDR", "npo_gdr", 18.0, -40.0, 31.0, 41.0),
    ("my method", "custom_plugin", 30.0, -70.0, 50.0, 100.0),
]
# Robustness checks and an extra metric on the news board only: (knowmem_f_quant4,
# verbmem_f_quant4, es_f) per row.
NEWS_EXTRA = [(70.0, 60.0, 40.0), (35.0, 22.0, 5.0), (2.0, 1.0, 1.0), (45.0, 30.0, 9.0),
              (33.0, 20.0, 8.0), (55.0, 40.0, 20.0)]  # fmt: skip


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
        """A real mouse click (pressed + released) at the centre of the element (of its
        first line box, for a link that wraps)."""
        box = self.js(
            f"(function(){{var e=document.querySelector({json.dumps(selector)});"
            "e.scrollIntoView({block:'center'});var r=e.getClientRects()[0];"
            "return {x:r.left+r.width/2,y:r.top+r.height/2};})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )


def _write_board(path: Path, benchmark: str, extra: bool) -> None:
    rows = []
    for i, (name, algo, vf, pl, kf, kr) in enumerate(ROWS):
        report = {
            "name": name,
            "benchmark": benchmark,
            "corpus": "news",
            "algo": algo,
            "params": {} if algo in ("target", "retrain") else {"lr": 1e-5, "epochs": 10},
            "seed": 0,
            "selected": "" if algo in ("target", "retrain") else "epoch_3",
            "metrics": {"verbmem_f": vf, "privleak": pl, "knowmem_f": kf, "knowmem_r": kr},
            "ci": {"knowmem_r": [kr * 0.9, min(kr * 1.1, 100.0)]},
            "versions": {"muse_bench": "0.1.0"},
            "created": "2025-01-01T00:00:00+00:00",
            "run_id": f"{benchmark}-run-{i}",
        }
        row = lb.row_from_report(report)
        if extra:
            kq, vq, es = NEWS_EXTRA[i]
            row |= {"knowmem_f_quant4": str(kq), "verbmem_f_quant4": str(vq), "es_f": str(es)}
        rows.append(row)
    with open(path, "w", newline="", encoding="utf-8") as fh:  # as a later schema writes it
        writer = csv.DictWriter(fh, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    assert lb.validate(path) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    _write_board(root / "news.csv", NEWS, extra=True)
    _write_board(root / "books.csv", BOOKS, extra=False)
    lb_page.render([root / "news.csv", root / "books.csv"], root / "out")
    return root / "out" / "index.html"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    cdp = DevTools(tmp_path_factory.mktemp("chromium-profile"))
    try:
        tab = Page(cdp)
        tab.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        yield tab
    finally:
        cdp.close()


@pytest.fixture()
def page(browser: Page, site: Path) -> Page:
    """The page freshly loaded (no sorting, filtering or toggling left from another test)."""
    browser.goto(site.as_uri())
    return browser


def table_js(benchmark: str, body: str) -> str:
    """JS evaluating `body` with `t` bound to the table of `benchmark`."""
    return (
        f'(function(){{var t=document.querySelector(\'section[data-benchmark="{benchmark}"] '
        f"table.leaderboard');{body}}})()"
    )


def column_values(page: Page, column: str, benchmark: str = NEWS) -> list[str]:
    """The data-sort values of a column, in row order, method rows and reference rows."""
    return page.js(
        table_js(
            benchmark,
            "var i=Array.prototype.findIndex.call(t.tHead.rows[0].cells,function(c){"
            f"return c.dataset.column==={json.dumps(column)};}});"
            "return Array.prototype.filter.call(t.tBodies[0].rows,function(r){"
            "return !r.classList.contains('details');}).map(function(r){"
            "return r.cells[i].getAttribute('data-sort');});",
        )
    )


def visible_names(page: Page, benchmark: str = NEWS) -> list[str]:
    return page.js(
        table_js(
            benchmark,
            "return Array.prototype.filter.call(t.querySelectorAll('tbody th.name'),function(c){"
            "return c.offsetParent!==null;}).map(function(c){return c.dataset.sort;});",
        )
    )


def displayed(page: Page, selector: str) -> list[bool]:
    return page.js(
        f"Array.prototype.map.call(document.querySelectorAll({json.dumps(selector)}),"
        "function(e){return getComputedStyle(e).display!=='none'&&e.offsetParent!==null;})"
    )


def test_table_is_visible_and_escaped(page: Page) -> None:
    state = page.js(
        table_js(
            NEWS,
            "var r=t.getBoundingClientRect();var s=getComputedStyle(t);"
            "return {w:r.width,h:r.height,vis:s.visibility,disp:s.display,"
            "rows:t.querySelectorAll('tbody tr:not(.details)').length,"
            "injected:document.querySelectorAll('tbody img').length};",
        )
    )
    assert state["w"] > 0 and state["h"] > 0
    assert state["vis"] == "visible" and state["disp"] != "none"
    assert state["rows"] == len(ROWS)
    assert state["injected"] == 0  # the name stays text, not markup
    assert XSS in visible_names(page)
    # one decimal, the interval on hover
    cell = page.js(
        table_js(
            NEWS,
            "var c=t.querySelector('tr[data-run-id$=\"run-4\"] td[class~=g-muse]:nth-of-type(5)');"
            "return [c.querySelector('.v').textContent, c.title];",
        )
    )
    assert cell == ["41.0", "95% interval 36.9 to 45.1"]


def test_plots_load(page: Page) -> None:
    images = page.js(
        "Array.prototype.map.call(document.images,function(i){return [i.getAttribute('src'),i.naturalWidth];})"
    )
    srcs = [src for src, _ in images]
    assert any(src.startswith("tradeoff_") for src in srcs)
    assert any(src.startswith("robustness_") for src in srcs)
    assert all(width > 0 for _, width in images), images  # relative PNGs load under the CSP


def test_no_horizontal_overflow_at_1280(page: Page) -> None:
    sizes = page.js(
        "({inner:window.innerWidth,doc:document.documentElement.scrollWidth,"
        "tables:Array.prototype.map.call(document.querySelectorAll('.table-wrap'),function(w){"
        "return [w.scrollWidth,w.clientWidth,w.getBoundingClientRect().right];})})"
    )
    assert sizes["inner"] == 1280
    assert sizes["doc"] <= sizes["inner"], sizes
    for scroll_width, client_width, right in sizes["tables"]:
        assert scroll_width <= client_width and right <= 1280, sizes  # no table scrolls either
    # still none with every details view open (long settings wrap)
    page.js("document.querySelectorAll('td.toggle button').forEach(function(b){b.click();})")
    assert page.js("document.documentElement.scrollWidth") <= 1280


def test_clicking_headers_sorts_numerically_references_stay_on_top(page: Page) -> None:
    selector = f'section[data-benchmark="{NEWS}"] th[data-column="knowmem_r"] button'
    page.click(selector)
    values = [float(v) for v in column_values(page, "knowmem_r")]
    assert values == [55.2, 100.0, 9.5, 23.0, 41.0, 100.0]  # target, retrain, then ascending
    aria = f"document.querySelector('{selector[:-7]}').getAttribute('aria-sort')"
    assert page.js(aria) == "ascending"
    page.click(selector)
    assert [float(v) for v in column_values(page, "knowmem_r")] == [55.2, 100.0, 100.0, 41.0,
                                                                    23.0, 9.5]  # fmt: skip
    assert page.js(aria) == "descending"

    page.click(f'section[data-benchmark="{NEWS}"] th[data-column="privleak"] button')
    assert [float(v) for v in column_values(page, "privleak")] == [-99.8, 0.0, -70.0, -40.0,
                                                                   -5.0, 150.0]  # fmt: skip
    sorted_heads = page.js(
        "Array.prototype.map.call(document.querySelectorAll('th[aria-sort]'),function(h){return h.dataset.column;})"
    )
    assert sorted_heads == ["privleak"]  # only one column is marked as sorted
    # each details row still follows its own method row
    pairs = page.js(
        table_js(
            NEWS,
            "return Array.prototype.filter.call(t.tBodies[0].rows,function(r){"
            "return r.classList.contains('details');}).map(function(d){"
            "return [d.previousElementSibling.dataset.runId, d.textContent];});",
        )
    )
    assert all(run_id in text for run_id, text in pairs), pairs


def test_clicking_text_header_sorts_alphabetically(page: Page) -> None:
    page.click(f'section[data-benchmark="{NEWS}"] th[data-column="name"] button')
    assert column_values(page, "name") == ["target", "retrain", XSS, "GA", "my method", "NPO+GDR"]


def test_text_filter_hides_non_matching_rows(page: Page) -> None:
    page.click("#filter")
    page.send("Input.insertText", {"text": "NPO"})
    assert visible_names(page) == ["target", "retrain", XSS, "NPO+GDR"]  # XSS row's algo is npo
    assert visible_names(page, BOOKS) == ["target", "retrain", XSS, "NPO+GDR"]
    assert page.js("document.getElementById('count').textContent") == "4 of 8 methods match"
    page.js(
        "var f=document.getElementById('filter');f.value='gdr';f.dispatchEvent(new Event('input'))"
    )
    assert visible_names(page) == ["target", "retrain", "NPO+GDR"]
    page.js(
        "var f=document.getElementById('filter');f.value='';f.dispatchEvent(new Event('input'))"
    )
    assert len(visible_names(page)) == len(ROWS)


def test_benchmark_selector(page: Page) -> None:
    select = (
        "var s=document.getElementById('benchmark');s.value=%s;s.dispatchEvent(new Event('change'))"
    )
    page.js(select % json.dumps(BOOKS))
    assert displayed(page, "section.benchmark") == [False, True]
    page.js(select % json.dumps(""))
    assert displayed(page, "section.benchmark") == [True, True]


def test_column_group_toggles(page: Page) -> None:
    # the robustness and extra groups exist (news has such columns), shown by default
    assert all(displayed(page, f'section[data-benchmark="{NEWS}"] th.g-robust'))
    assert len(displayed(page, f'section[data-benchmark="{NEWS}"] th.g-robust')) == 2
    assert displayed(page, f'section[data-benchmark="{BOOKS}"] th.g-robust') == []
    page.click('input[data-group="robust"]')
    assert not any(displayed(page, ".g-robust"))
    assert all(displayed(page, ".g-muse")) and all(displayed(page, ".g-extra"))
    page.click('input[data-group="muse"]')
    assert not any(displayed(page, ".g-muse"))
    page.click('input[data-group="robust"]')
    page.click('input[data-group="muse"]')
    assert all(displayed(page, ".g-robust")) and all(displayed(page, ".g-muse"))
    page.click('input[data-group="extra"]')
    assert not any(displayed(page, ".g-extra"))
    # intervals: hidden until asked for
    assert not any(displayed(page, "span.ci"))
    page.click("#show-ci")
    assert any(displayed(page, "span.ci"))


def test_details_view_opens_and_closes(page: Page) -> None:
    row = f'section[data-benchmark="{NEWS}"] tr[data-run-id="{NEWS}-run-2"]'
    details = f"document.querySelector('{row}').nextElementSibling"
    assert page.js(f"{details}.hidden") is True
    page.click(f"{row} td.toggle button")
    assert page.js(f"{details}.hidden") is False
    text = page.js(f"{details}.textContent")
    assert f"{NEWS}-run-2" in text and "epoch_3" in text and "0.1.0" in text and "lr" in text
    page.click(f"{row} td.toggle button")
    assert page.js(f"{details}.hidden") is True


def test_method_names_link_to_papers(page: Page) -> None:
    links = page.js(
        table_js(
            NEWS,
            "return Array.prototype.map.call(t.querySelectorAll('tbody th.name'),function(c){"
            "var a=c.querySelector('a');return [c.dataset.sort,a?a.href:null,a?a.title:null];});",
        )
    )
    by_name = {name: (href, title) for name, href, title in links}
    assert by_name["GA"][0] == "https://arxiv.org/abs/2407.06460"
    assert by_name[XSS][0] == "https://arxiv.org/abs/2404.05868"
    assert by_name[XSS][1].startswith("NPO: L =")
    assert by_name["target"] == (None, None) and by_name["retrain"] == (None, None)
    assert by_name["my method"] == (None, None)  # not a registered unlearner


def test_glossary_is_collapsed_after_the_tables(page: Page) -> None:
    state = page.js(
        "(function(){var g=document.getElementById('glossary');var t=document.querySelectorAll("
        "'table.leaderboard');return {open:g.open,after:t[t.length-1].compareDocumentPosition(g)"
        "===Node.DOCUMENT_POSITION_FOLLOWING};})()"
    )
    assert state == {"open": False, "after": True}
    page.click('a[href="#glossary"]')
    assert page.js("document.getElementById('glossary').open") is True


def test_no_script_errors_and_screenshot(page: Page, tmp_path: Path) -> None:
    errors = [e for e in page.cdp.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not errors, errors
    height = page.js("document.documentElement.scrollHeight")
    shot = page.send(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
        },
    )
    data = base64.b64decode(shot["data"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    targets = [tmp_path]
    if os.environ.get("MUSE_SCREENSHOT_DIR"):
        targets.append(Path(os.environ["MUSE_SCREENSHOT_DIR"]))
    for directory in targets:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "leaderboard.png").write_bytes(data)
