"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

An operator logs in, watches a running campaign advance as simulated
vehicles report (:mod:`tests.simulated_fleet`: real keys, real signed
manifests over HTTP) without reloading the page, reaches the pause button
with the keyboard and pauses the campaign, then opens a failing vehicle and
reads why it failed. A viewer sees no action button and is refused (403)
when it posts the action anyway. Every page passes a contrast check
(WCAG AA, 4.5:1, on the browser's computed colours) and shows a focus ring.

Screenshots of every page are saved under ``test-artifacts/dashboard/``
(``$UPTAKE_TEST_ARTIFACTS`` to move it); the path is printed.

Never a downloaded browser: ``/usr/bin/chromium`` from Debian (``.ci/run``
installs it), with the flags that keep it off the network.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_fixtures import CampaignDeployment
from tests.simulated_fleet import SimVehicle
from tests.uptake_fixtures import ServerProcess

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = (
    Path(
        os.environ.get(
            "UPTAKE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"
        )
    )
    / "dashboard"
)
CAMPAIGN = "browser-rollout"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)

#: Every visible text's colour against the background it is drawn on: the pairs under 4.5:1.
CONTRAST_SCRIPT = """
() => {
  function rgba(text) {
    const m = text.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return [0, 0, 0, 0];
    const p = m[1].split(',').map(s => parseFloat(s));
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  }
  function lum(c) {
    const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
  }
  function background(el) {
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c[3] > 0.5) return c;
    }
    return [255, 255, 255, 1];
  }
  const failures = [];
  let checked = 0;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || !node.textContent.trim()) continue;
    const rect = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (rect.width === 0 || rect.height === 0 || style.visibility === 'hidden' || el.closest('title, desc')) continue;
    const isSvg = el instanceof SVGElement;
    const fg = rgba(isSvg ? style.fill : style.color);
    const bg = background(isSvg ? el.closest('svg') : el);
    const a = lum(fg), b = lum(bg);
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    checked++;
    if (ratio < 4.5) failures.push(`${ratio.toFixed(2)}: "${node.textContent.trim().slice(0, 40)}" ${style.color} on ${bg}`);
  }
  return {checked, failures};
}
"""


def _shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def _check_contrast(page: Any) -> None:
    result = page.evaluate(CONTRAST_SCRIPT)
    assert result["checked"] > 5
    assert not result["failures"], f"{page.url}: text under 4.5:1: {result['failures']}"


def _wait_until(page: Any, expression: str, timeout_ms: int = TIMEOUT_MS) -> None:
    """Poll ``expression`` in the page (Playwright's wait_for_function evaluates strings with
    ``new Function``, which the dashboard's CSP forbids, as it should)."""
    for _ in range(timeout_ms // 200):
        if page.evaluate(expression):
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"{page.url}: never true: {expression}")


def _engine_reaches(rollout: Rollout, done: Any, timeout: float = 120) -> dict[str, Any]:
    """Wait (on the API, not the page) until the campaign engine got there."""
    deadline = time.monotonic() + timeout
    while True:
        record = rollout.d.show(CAMPAIGN)
        if done(record):
            return record
        assert time.monotonic() < deadline, f"the campaign did not get there: {record}"
        time.sleep(0.5)


def _login(page: Any, base: str, token: str) -> None:
    page.goto(f"{base}/dashboard/")
    assert "/dashboard/login" in page.url
    page.fill("#token", token)
    page.click("text=Log in with token")
    page.wait_for_url(re.compile(r".*/dashboard/(fleet|releases)$"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Rollout:
    """A running campaign: 12 vehicles install, 3 fail, 5 wait for consent (never completes)."""

    def __init__(self, deployment: CampaignDeployment) -> None:
        self.d = deployment
        self.good = deployment.enrol(12, "GOOD", model="roadster", region="eu")
        self.bad = deployment.enrol(3, "BAD", behaviour="fail", model="roadster", region="eu")
        self.waiting = deployment.enrol(5, "WAIT", behaviour="postpone", model="roadster")
        deployment.start_campaign(CAMPAIGN, [
            {"percent": 40, "success_threshold": 0.3, "failure_threshold": 0.9},
            # 100 % success is never met while vehicles wait for consent: it stays running
            {"percent": 100, "success_threshold": 1.0, "failure_threshold": 0.9},
        ])  # fmt: skip
        deployment.wait(CAMPAIGN, lambda c: c["sweep"]["phase_covered"] >= 0, [])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def vehicles(self) -> list[SimVehicle]:
        return self.good + self.bad + self.waiting

    def report_in_background(self) -> None:
        def run() -> None:
            while not self._stop.is_set():
                if not self.d.cycle(self.vehicles):
                    self._stop.wait(0.5)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    srv = ServerProcess(tmp_path_factory.mktemp("browser"))
    try:
        r = Rollout(CampaignDeployment(srv))
        yield r
        r.stop()
    finally:
        srv.stop()


def test_operator_watches_pauses_and_reads_a_failure(
    browser: Any, rollout: Rollout, capsys: pytest.CaptureFixture[str]
) -> None:
    d = rollout.d
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{d.url}/dashboard/login")
    _shoot(page, "login")
    _check_contrast(page)
    _login(page, d.url, d.token)

    page.goto(f"{d.url}/dashboard/campaigns/{CAMPAIGN}")
    assert page.text_content("[data-campaign-state]") == "running"
    assert page.get_attribute("#progress-0", "value") == "0"
    page.evaluate("window.notReloaded = true")
    rollout.report_in_background()
    # the page updates itself as vehicles report: successes, the next phase, the failures
    _wait_until(page, "Number(document.querySelector('#progress-0').value) > 0")
    record = _engine_reaches(rollout, lambda c: c["current_phase"] >= 1 and c["totals"]["failed"])
    _wait_until(
        page,
        "document.querySelector('#phase-1') && "
        "document.querySelector('#phase-1').textContent.includes('current')",
    )
    _wait_until(
        page, "[...document.querySelectorAll('a[href^=\"/dashboard/vehicles/BAD\"]')].length > 0"
    )
    assert record["state"] == "running"
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("svg polyline").count() == 2
    rollout.stop()
    _shoot(page, "campaign-running")
    _check_contrast(page)

    # the keyboard reaches the pause button (skip link first, focus ring visible) and presses it;
    # a live update meanwhile keeps the focus where it was
    page.goto(f"{d.url}/dashboard/campaigns/{CAMPAIGN}")
    _wait_until(page, "document.getElementById('main').hasAttribute('data-live-updated')")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip-link"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.dataset.action") == "pause":
            break
    else:
        raise AssertionError("Tab never reached the pause button")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "the focused button shows no focus ring"
    with page.expect_navigation():  # the form posts, the server answers 303 to the campaign
        page.keyboard.press("Enter")
    assert page.text_content("[data-campaign-state]") == "paused"
    assert d.show(CAMPAIGN)["state"] == "paused"
    assert page.locator("button[data-action=resume]").count() == 1
    _shoot(page, "campaign-paused")

    # open a failing vehicle from the campaign and read why it failed
    page.click('a[href^="/dashboard/vehicles/BAD"]')
    page.wait_for_url(re.compile(r".*/dashboard/vehicles/BAD\d+$"))
    assert "flash failed" in (page.text_content("[data-part-reason]") or "")
    assert page.text_content("[data-part-state]") == "failed"
    ledger = page.text_content("section[aria-labelledby=ledger-h]") or ""
    assert "install_result" in ledger and "flash failed" in ledger  # its history, from the ledger
    assert page.locator("pre.manifest").count() == 1  # and the last manifest it signed
    _shoot(page, "vehicle-failed")
    _check_contrast(page)

    for name, path in (("fleet", "/dashboard/fleet"), ("vehicles", "/dashboard/vehicles"),
                       ("campaigns", "/dashboard/campaigns"), ("releases", "/dashboard/releases"),
                       ("audit", "/dashboard/audit")):  # fmt: skip
        page.goto(d.url + path)
        assert page.locator("h1").count() == 1
        _shoot(page, name)
        _check_contrast(page)
    assert "intact" in (page.text_content("#main") or "")
    context.close()
    with capsys.disabled():  # shown without -s too
        print(f"\ndashboard screenshots: {ARTIFACTS}")


def test_viewer_sees_no_pause_button_and_is_refused(browser: Any, rollout: Rollout) -> None:
    d = rollout.d
    token = d.new_token("browser-viewer", "viewer")
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    _login(page, d.url, token)
    page.goto(f"{d.url}/dashboard/campaigns/{CAMPAIGN}")
    assert page.locator("[data-campaign-state]").count() == 1
    assert page.locator("button[data-action]").count() == 0
    _shoot(page, "campaign-as-viewer")
    state_before = d.show(CAMPAIGN)["state"]
    csrf = page.get_attribute("input[name=csrf]", "value")  # the logout form's: a valid token
    action = "resume" if state_before == "paused" else "pause"
    answer = page.request.post(
        f"{d.url}/dashboard/campaigns/{CAMPAIGN}/{action}",
        form={"csrf": csrf or ""},
        headers={"Origin": d.url},
        max_redirects=0,
    )
    assert answer.status == 403
    assert "viewer role" in answer.text()
    assert d.show(CAMPAIGN)["state"] == state_before
    context.close()
