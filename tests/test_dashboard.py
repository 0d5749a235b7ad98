"""The account dashboard (`GET /dashboard`, docs/protocol.md, Dashboard) on a real gateway, in
a real browser.

Headless Chromium is driven over the Chrome DevTools Protocol with the `websockets` package the
project already depends on (no selenium / chromedriver). No browser is a failure, not a skip:
install it (Debian: `apt-get install -y chromium`) or point MESHRT_TEST_CHROMIUM at one.
"""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest
from browser import Browser
from browser import find_chromium
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from websockets.sync.client import connect as ws_connect

from meshrt.shared.money import Money


def usd_shown(amount: str) -> str:
    """How the dashboard shows an API decimal string: as the CLI does (Money.display)."""
    return Money.from_usd(amount).display()


def exact_shown(amount: str) -> str:
    """The exact amount, in the element's title: as is, `$`, thousands separators."""
    sign, digits = ("-", amount[1:]) if amount.startswith("-") else ("", amount)
    whole, _, frac = digits.partition(".")
    return f"{sign}${int(whole):,}" + (f".{frac}" if frac else "")


# Amounts whose display takes each branch of the rule: sign, rounding half away from zero,
# thousands, and the tiny amount shown exact rather than as zero.
DISPLAY_CASES = ["-0.0001648", "0", "0.0000005", "-0.0000005", "0.0000004", "0.001983333333", "1234567.8999995"]


def test_dashboard_is_one_page_with_strict_headers(shared_gateway):
    page = httpx.get(f"{shared_gateway.http_url}/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["x-request-id"].startswith("req_")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = httpx.get(f"{shared_gateway.http_url}/dashboard/{asset}", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert response.headers["content-security-policy"] == csp
    # self-contained: nothing fetched from anywhere else
    for text in (
        page.text,
        httpx.get(f"{shared_gateway.http_url}/dashboard/dashboard.js").text,
        httpx.get(f"{shared_gateway.http_url}/dashboard/dashboard.css").text,
    ):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
        assert "//cdn" not in text


@pytest.fixture(scope="session")
def chromium() -> str:
    return find_chromium()


def test_dashboard_in_a_real_browser(chromium, shared_gateway, make_tenant, tmp_path):
    gw = shared_gateway
    tenant = make_tenant(balance="25", max_concurrent_sessions=4)
    auth = {"Authorization": f"Bearer {tenant.key}"}

    async def billed_sessions(n: int):
        for _ in range(n):
            async with connect_ws(gw.ws_url, key=tenant.key, query="sim_response_ms=200") as ws:
                assert (await recv_json(ws))["type"] == "session.created"
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")

    run(billed_sessions(3), 90)

    def three_records():
        page = httpx.get(f"{gw.http_url}/v1/usage", params={"limit": 100}, headers=auth, timeout=10).json()
        return page if len(page["data"]) == 3 else None

    usage = wait_for(three_records, 30, 0.1, "three usage records")["data"]
    assert all(Money.from_usd(r["cost"]["amount"]) > Money(0) for r in usage)
    total = sum((Money.from_usd(r["cost"]["amount"]) for r in usage), Money(0))

    # one session held open, so "live sessions" has something to show
    held = ws_connect(f"{gw.ws_url}?model=gpt-realtime", additional_headers=auth, open_timeout=15)
    browser = None
    try:
        assert json.loads(held.recv(timeout=10))["type"] == "session.created"

        def one_live():
            account = httpx.get(f"{gw.http_url}/v1/account", headers=auth, timeout=10).json()
            return account if account["live_sessions"] == 1 else None

        account = wait_for(one_live, 15, 0.1, "the held session to count as live")

        browser = Browser(chromium, tmp_path / "chromium-profile", tmp_path / "chromium.log")
        page = browser.page()
        page.call("Page.navigate", url=f"{gw.http_url}/dashboard?limit=2")
        page.wait("document.readyState === 'complete' && document.body.dataset.state === 'login'", what="the key form")
        assert page.visible("login") and not page.visible("dashboard")

        page.type_into("key-input", tenant.key)
        page.click("login-button")
        page.wait("['ready', 'failed', 'rejected'].includes(document.body.dataset.state)", what="the dashboard")
        assert page.js("document.body.dataset.state") == "ready", page.text("#error")
        assert page.visible("dashboard") and not page.visible("login") and not page.visible("error")

        # the key: in this tab's sessionStorage, in no URL, not left in the page
        assert tenant.key not in page.js("location.href")
        assert page.js("sessionStorage.getItem('meshrt.dashboard.key')") == tenant.key
        assert page.js("localStorage.length") == 0
        assert tenant.key not in page.js("document.documentElement.outerHTML")
        assert page.js("document.getElementById('key-input').value") == ""

        assert page.text("#balance") == usd_shown(account["balance"])
        # what the live session holds for its next response is shown apart from the balance
        assert re.fullmatch(r"\$[\d,.]+ available · \$[\d,.]+ reserved", page.text("#balance-sub")), page.text(
            "#balance-sub"
        )
        assert page.text("#live") == "1 / 4"
        assert page.text("#account-name") == account["name"]

        # the table: a page of 2, then "load more" through the cursor
        assert page.js("[...document.querySelectorAll('#usage-rows tr')].map(r => r.dataset.id)") == [
            r["id"] for r in usage[:2]
        ]
        assert page.texts("#usage-rows td.cost") == [usd_shown(r["cost"]["amount"]) for r in usage[:2]]
        assert page.texts("#usage-rows td.model") == [r["model"] for r in usage[:2]]
        assert page.texts("#usage-rows td.reason") == [r["end_reason"] for r in usage[:2]]
        first_tokens = page.text("#usage-rows tr:first-child td:nth-child(4)")
        assert first_tokens.startswith(f"{usage[0]['usage']['total_tokens']:,}")
        assert page.visible("load-more")
        page.click("load-more")
        page.wait("document.querySelectorAll('#usage-rows tr').length === 3", what="the second page of rows")
        assert page.js("[...document.querySelectorAll('#usage-rows tr')].map(r => r.dataset.id)") == [
            r["id"] for r in usage
        ]
        assert page.texts("#usage-rows td.cost") == [usd_shown(r["cost"]["amount"]) for r in usage]
        page.wait("document.getElementById('load-more').hidden", what="no more pages")

        # the chart: bars whose exact amounts add up to the API's costs
        bars = page.js("[...document.querySelectorAll('#chart svg rect.bar')].map(b => b.dataset.amount)")
        assert 1 <= len(bars) <= 2  # the three sessions ended today (or across one UTC midnight)
        assert sum((Money.from_usd(a) for a in bars), Money(0)) == total
        assert page.text("#total-30d") == usd_shown(total.usd_str())
        assert page.js("document.querySelectorAll('#chart svg rect.bar, #chart svg rect.hit').length") == 30

        # the page's money arithmetic is exact (BigInt picodollars), not binary floats
        assert page.js("(m => m.formatPico(m.parsePico('0.1') + m.parsePico('0.2')))(meshrtDashboard)") == "0.300000"
        assert (
            page.js(
                "(m => m.formatPico(m.parsePico('9007199254740993.000000000001') - m.parsePico('0.5')))"
                "(meshrtDashboard)"
            )
            == "9,007,199,254,740,992.500000000001"
        )
        assert page.js("(m => m.formatPico(m.parsePico('-0.000316') * 3n))(meshrtDashboard)") == "-0.000948"
        # and shows amounts by the CLI's rule, sign before the dollar
        shown = page.js(f"{DISPLAY_CASES!r}.map(a => meshrtDashboard.money(meshrtDashboard.parsePico(a)))")
        assert shown == [Money.from_usd(a).display() for a in DISPLAY_CASES]
        assert shown[0] == "-$0.000165"
        assert page.js("document.getElementById('balance').title") == "exactly " + exact_shown(account["balance"])

        assert page.problems() == []
        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        (tmp_path / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))  # for a person to look at

        # a bad key: the API's own error message, the form again, nothing kept
        bad_key = "rsk_" + "Z" * 40
        expected = httpx.get(
            f"{gw.http_url}/v1/account", headers={"Authorization": f"Bearer {bad_key}"}, timeout=10
        ).json()["error"]
        page.click("signout")
        page.wait("document.body.dataset.state === 'login'", what="the key form after forgetting the key")
        assert page.js("sessionStorage.getItem('meshrt.dashboard.key')") is None
        page.type_into("key-input", bad_key)
        page.click("login-button")
        page.wait("document.body.dataset.state === 'rejected'", what="the bad key to be refused")
        assert page.visible("error") and page.visible("login") and not page.visible("dashboard")
        assert page.text("#error strong") == expected["message"]
        assert expected["code"] in page.text("#error .error-meta")
        assert page.js("sessionStorage.getItem('meshrt.dashboard.key')") is None
        page.close()
    finally:
        if browser is not None:
            browser.close()
        held.close()
