"""The /ui dashboard: a known traffic sample through a gateway over fake backends, then the page rendered by
a real headless Chromium (Debian's `chromium`, driven by its own CLI); the assertions read the DOM the page's
script wrote after fetching /ui/data, not the HTML source. The screenshot is kept (path printed, and copied
to test-artifacts/, git-ignored)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, FakeGuard, bow_embed, fake_settings

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEYS = [{"name": "ops", "sha256": hash_api_key("sk-ops"), "admin": True},
        {"name": "team-a", "sha256": hash_api_key("sk-a")},
        {"name": "team-b", "sha256": hash_api_key("sk-b")}]


def _gateway(live_server, **overrides):
    from gateway.wiring import build_pipeline

    def build(settings):
        pipeline = build_pipeline(settings, backend_factory=FakeFactory(), embed=bow_embed)
        pipeline.guard = FakeGuard()
        return pipeline

    return live_server(create_app(fake_settings(**overrides), pipeline_factory=build))


def _send_sample(base_url: str) -> None:
    """3 routed to the SLM (team-a), 2 to the LLM (team-b), 1 escalated by the cascade, 1 rejected by the guard."""
    sample = [("sk-a", "low", "hello there"), ("sk-a", "low", "good morning"), ("sk-a", "low", "thanks friend"),
              ("sk-b", "high", "prove the lemma"), ("sk-b", "high", "integral of x"),
              ("sk-a", None, "unsure about this"), ("sk-b", None, "how to build a bomb")]
    for i, (key, quality, text) in enumerate(sample, start=1):
        headers = {"authorization": f"Bearer {key}", "x-request-id": f"ui-{i}"}
        if quality:
            headers["x-switchyard-quality"] = quality
        r = httpx.post(base_url + "/v1/chat/completions", headers=headers,
                       json={"model": "auto", "messages": [{"role": "user", "content": text}]})
        assert r.status_code == (400 if "bomb" in text else 200), r.text


# ------------------------------------------------------------------------------------ the rendered DOM


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children).strip()

    def all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Descendants with this tag and these attribute values (``data_name`` → ``data-name``; ``cls`` →
        one of the classes)."""
        out = []
        for child in self.children:
            if isinstance(child, str):
                continue
            want = {k.replace("_", "-"): v for k, v in attrs.items() if k != "cls"}
            if ((tag is None or child.tag == tag) and all(child.attrs.get(k) == v for k, v in want.items())
                    and ("cls" not in attrs or attrs["cls"] in child.attrs.get("class", "").split())):
                out.append(child)
            out.extend(child.all(tag, **attrs))
        return out

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}>"
        return found[0]


class _DomParser(HTMLParser):
    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "col", "source", "area", "base", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.root = self.node = Element("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.node)
        self.node.children.append(element)
        if tag not in self.VOID:
            self.node = element

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def _chromium(url: str, profile: Path, *args: str) -> str:
    """Chromium's stdout after loading ``url`` and letting its scripts run (virtual time: the page's fetches
    finish before the budget ends; its 5 s refresh timer does not matter)."""
    proc = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-proxy-server",
                           "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1900",
                           "--hide-scrollbars", "--virtual-time-budget=4000", *args, url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rendered(url: str, profile: Path) -> Element:
    parser = _DomParser()
    parser.feed(_chromium(url, profile, "--dump-dom"))
    return parser.root


def _bars(dom: Element, svg_id: str) -> dict[str, str]:
    return {g.attrs["data-name"]: g.one("text", cls="count").text() for g in dom.one(id=svg_id).all("g", cls="bar")}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`make tools` installs Debian's chromium)")
def test_dashboard_renders_the_numbers_of_a_known_traffic_sample(live_server, tmp_path):
    server = _gateway(live_server, api_keys=KEYS)
    _send_sample(server.base_url)

    # No key: the page loads (it holds no data), /ui/data says 401, and the page says so.
    dom = _rendered(server.base_url + "/ui", tmp_path / "profile-anonymous")
    assert dom.one("body").attrs["data-state"] == "auth"
    assert dom.one(id="status").text().startswith("401: Missing API key")
    assert dom.one(id="total-requests").text() == "–"
    assert dom.one("table", id="decisions").one("tbody").all("tr") == []

    # The admin key in the fragment (never sent to the server): the numbers of the sample.
    dom = _rendered(server.base_url + "/ui#key=sk-ops", tmp_path / "profile-admin")
    assert dom.one("body").attrs["data-state"] == "ready", dom.one(id="status").text()
    assert dom.one(id="total-requests").text() == "7"
    assert dom.one(id="error-requests").text().startswith("1 ended with an error status")
    assert _bars(dom, "by-route") == {"slm": "3", "llm": "2", "slm_then_escalate": "1", "error": "1"}
    assert _bars(dom, "by-pool") == {"slm": "3", "llm": "3", "-": "1"}  # the escalated answer came from the LLM
    assert _bars(dom, "by-guard") == {"domain": "6", "unsafe": "1"}
    assert dom.one("g", data_name="-").one("text", cls="name").text() == "(none: refused)"
    # the cascade judged the 3 route-slm answers and the slm_then_escalate one, and escalated one of them
    assert dom.one(id="escalation-rate").text() == "25.0 %"
    assert dom.one(id="escalation-detail").text().startswith("1 of 4 SLM answers judged")

    data = httpx.get(server.base_url + "/ui/data", headers={"authorization": "Bearer sk-ops"}).json()
    keys = {tr.attrs["data-key"]: {td.attrs["data-field"]: td.text() for td in tr.all("td")}
            for tr in dom.one("table", id="keys").all("tr") if "data-key" in tr.attrs}
    assert set(keys) == {"team-a", "team-b"}  # the admin key sent no traffic
    assert keys["team-b"]["saved"] == "$0.00"  # everything it asked went to the LLM: nothing saved
    assert keys["team-a"]["saved"].startswith("$") and keys["team-a"]["saved"] != "$0.00"
    assert data["keys"]["team-a"]["saved_usd"] > 0
    assert keys["team-a"]["completion_tokens"] == str(int(data["keys"]["team-a"]["completion_tokens"]))
    spend_line = dom.one("polyline", data_key="team-a", data_series="spend_usd")
    assert float(spend_line.attrs["data-last"]) == pytest.approx(data["keys"]["team-a"]["spend_usd"])
    assert {li.attrs["data-key"] for li in dom.one(id="spend-legend").all("li")} == {"total", "team-a", "team-b"}

    rows = dom.one("table", id="decisions").one("tbody").all("tr")
    fields = [{td.attrs["data-field"]: td.text() for td in tr.all("td")} for tr in rows]
    assert [f["request_id"] for f in fields] == [f"ui-{i}" for i in range(7, 0, -1)]  # newest first
    rejected, escalated = fields[0], fields[1]
    assert (rejected["status"], rejected["route"], rejected["guard"], rejected["key"]) == ("400", "error", "unsafe",
                                                                                          "team-b")
    assert "err" in rows[0].attrs["class"].split()
    assert (escalated["route"], escalated["pool"], escalated["escalated"], escalated["key"]) == (
        "slm_then_escalate", "llm", "yes", "team-a")
    assert (fields[-1]["route"], fields[-1]["pool"], fields[-1]["escalated"], fields[-1]["guard"]) == (
        "slm", "slm", "no", "domain")
    assert fields[3]["pool"] == "llm" and fields[3]["route"] == "llm"

    screenshot = tmp_path / "ui-dashboard.png"
    _chromium(server.base_url + "/ui#key=sk-ops", tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / screenshot.name
    shutil.copyfile(screenshot, kept)
    print(f"dashboard screenshot: {screenshot} (kept: {kept})")


def test_ui_data_needs_an_admin_key_and_the_page_holds_no_data(live_server):
    server = _gateway(live_server, api_keys=KEYS)
    _send_sample(server.base_url)
    url = server.base_url + "/ui/data"
    for headers, status, code in [({}, 401, "missing_api_key"), ({"authorization": "Bearer sk-nope"}, 401,
                                                                   "invalid_api_key"),
                                  ({"authorization": "Bearer sk-a"}, 403, "admin_required"),
                                  ({"x-api-key": "sk-b"}, 403, "admin_required")]:
        r = httpx.get(url, headers=headers)
        assert r.status_code == status, (headers, r.text)
        error = r.json()["error"]  # OpenAI's envelope
        assert error["code"] == code and error["type"] in ("authentication_error", "permission_error")
        assert "team-a" not in r.text or code == "admin_required"
    r = httpx.get(url, headers={"authorization": "Bearer sk-ops"})
    assert r.status_code == 200 and r.json()["requests"]["total"] == 7
    assert r.headers["cache-control"] == "no-store"
    page = httpx.get(server.base_url + "/ui")  # static: anyone may load it, it shows nothing without the key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "ui-1" not in page.text and "team-a" not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    schema = httpx.get(server.base_url + "/openapi.json").json()["paths"]["/ui/data"]["get"]
    assert {"401", "403"} <= set(schema["responses"]) and schema["security"] == [{"bearer": []}]


def test_open_gateway_serves_the_data_without_a_key(live_server):
    server = _gateway(live_server)
    _send_sample(server.base_url)
    data = httpx.get(server.base_url + "/ui/data").json()
    assert data["requests"]["by_route"] == {"slm": 3, "llm": 2, "slm_then_escalate": 1, "error": 1}
    assert data["keys"] == {} and data["spend"]["saved_usd"] > 0
    assert [d["request_id"] for d in data["decisions"]][:2] == ["ui-7", "ui-6"]
    assert data["timeline"]["points"][-1]["spend_usd"]["total"] == pytest.approx(data["spend"]["cost_usd"])


def test_decision_ring_keeps_the_latest_records_without_a_path():
    from gateway.decision_log import DecisionLog

    log = DecisionLog(None, keep=3)
    for i in range(5):
        log.write({"request_id": str(i)})
    assert [r["request_id"] for r in log.latest(10)] == ["4", "3", "2"]
    assert [r["request_id"] for r in log.latest(2)] == ["4", "3"]
    log.latest(1)[0]["request_id"] = "changed"
    assert log.latest(1)[0]["request_id"] == "4"  # copies: the dashboard cannot change the log


def test_dashboard_samples_per_period_and_keeps_the_last_ones():
    from gateway.dashboard import Dashboard
    from gateway.metrics import Metrics

    now = [600.0]
    metrics = Metrics()
    dashboard = Dashboard(metrics, _NoDecisions(), period_s=60, keep=3, clock=lambda: now[0])
    for minute in range(5):
        metrics.child(metrics.key_spend, "k").inc(1.0)
        metrics.child(metrics.key_always_llm_cost, "k").inc(3.0)
        now[0] = 600.0 + 60 * minute
        dashboard.sample()
    points = dashboard.data()["timeline"]["points"]
    assert [p["ts"] for p in points] == [720.0, 780.0, 840.0, 840.0]  # the last 3 samples, then now
    assert [p["spend_usd"]["keys"]["k"] for p in points] == [3.0, 4.0, 5.0, 5.0]
    assert points[-1]["saved_usd"]["keys"]["k"] == 10.0


class _NoDecisions:
    def latest(self, n: int) -> list:
        return []
