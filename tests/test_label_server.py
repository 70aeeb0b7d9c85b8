"""rlhfkit label as people and programs meet it: the real server in a subprocess on a free loopback
port, driven over HTTP (parallel submissions, malformed requests, the token and Host guard,
SIGKILL mid-burst, a torn line) and through its page in a real headless Chromium (Debian's
chromium + chromium-driver, driven by Selenium): ranking with a tie by drag and by keyboard,
reload, resume, undo, two annotators at once, and the resulting file through rank-import.

``RLHFKIT_SCREENSHOT=docs/images/label_page.png`` makes the first browser test save the README's
screenshot of the page.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlhfkit.data.records import parse_samples
from rlhfkit.label.tasks import blind_order, build_tasks

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# --- the server in a subprocess ---------------------------------------------------------------------


class Server:
    """``rlhfkit label SAMPLES --out OUT --port 0 ARGS...`` in a subprocess, stderr in a file."""

    def __init__(self, tmp_path: Path, samples: Path, out: Path, *args: str):
        self.log = tmp_path / f"server-{time.monotonic_ns()}.log"
        self.stderr = open(self.log, "w")
        command = [sys.executable, "-m", "rlhfkit", "label", str(samples), "--out", str(out), "--port", "0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        deadline = time.monotonic() + 30
        while not (match := re.search(r"open http://127\.0\.0\.1:(\d+)/(\S*)", self.log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}/"
        self.first_url = self.url + match.group(2)

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None):
        """(status, JSON or text, response headers)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        conn.request(method, path, raw if raw is not None else None if body is None else json.dumps(body).encode(), all_headers)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        try:
            data = json.loads(payload)
        except ValueError:
            data = payload.decode("utf-8", "replace")
        return response.status, data, response.headers

    def stop(self) -> str:
        """SIGINT (Ctrl-C): the server finishes and prints its result; returns stdout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.stderr.close()
        return out or ""


@pytest.fixture()
def start(tmp_path):
    servers: list[Server] = []

    def start_server(samples: Path, out: Path, *args: str) -> Server:
        servers.append(Server(tmp_path, samples, out, *args))
        return servers[-1]

    yield start_server
    for server in servers:
        server.stop()


def _samples(n: int = 3, k: int = 4, chat: bool = True) -> list[dict]:
    answers = [
        "Canberra.",
        "Sydney is the capital.",
        "The capital of Australia is Canberra. Hope this helps!",
        "Canberra, since 1913.",
    ]
    out = []
    for i in range(n):
        prompt: object = f"Question {i + 1}: what is the capital of Australia?"
        if chat and i == 0:
            prompt = [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of Australia?"},
            ]
        completions = [{"id": f"p{i + 1}-{j}", "text": answers[j % 4] if j < 4 else f"Answer {j}.",
                        "policy": "sft" if j % 2 else "ppo", "finish_reason": "length" if j == 3 else "stop"}
                       for j in range(k)]  # fmt: skip
        out.append({"prompt_id": f"p{i + 1}", "prompt": prompt, "completions": completions})
    return out


def _write_samples(tmp_path: Path, samples: list[dict]) -> Path:
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _tasks(samples: list[dict], mode: str = "rank"):
    return build_tasks([parse_samples(s) for s in samples], mode)[0]


def _expected_pairs(annotator: str, order: list[str], ranks: list[int]) -> set[tuple[str, str, str]]:
    """(annotator, better, worse) for every couple of a ranking given by positions (equal ranks: no pair)."""
    return {(annotator, order[i], order[j]) for i in range(len(order)) for j in range(len(order)) if ranks[i] < ranks[j]}


def _rank_import(cli, tmp_path: Path, samples: Path, rankings: Path) -> tuple[dict, set[tuple[str, str, str]], int]:
    out = tmp_path / "pairs.jsonl"
    result = cli("rank-import", rankings, "--samples", samples, "--out", out, "--bootstrap", "20")
    assert result.exit_code == 0, result.stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    return json.loads(result.stdout), {(p["annotator"], p["chosen_id"], p["rejected_id"]) for p in pairs}, len(pairs)


# --- API ----------------------------------------------------------------------------------------------


def test_fifty_parallel_submissions_from_two_annotators_lose_nothing(cli, tmp_path, start):
    samples = _samples(n=25, k=3, chat=False)
    samples_path, out = _write_samples(tmp_path, samples), tmp_path / "rankings.jsonl"
    server = start(samples_path, out)
    tasks = _tasks(samples)
    jobs = [(name, t.index) for name in ("alice", "bob") for t in tasks]
    jobs += jobs[::5]  # 10 of them sent twice at the same time: exactly one may win

    def submit(job):
        name, index = job
        ranks = [1, 2, 3] if name == "alice" else [3, 1, 2]
        return job, server.call(
            "POST", "/api/submit", {"annotator": name, "index": index, "prompt_id": tasks[index].prompt_id, "ranks": ranks}
        )[0]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(submit, jobs))
    statuses: dict[tuple, list[int]] = {}
    for job, status in results:
        statuses.setdefault(job, []).append(status)
    assert all(sorted(s) in ([200], [200, 409]) for s in statuses.values()), statuses
    assert sum(s.count(409) for s in statuses.values()) == 10

    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole JSON
    assert len(records) == 50 and len({(r["annotator"], r["prompt_id"]) for r in records}) == 50
    assert server.call("GET", "/api/task?annotator=bob")[1]["progress"] == {"done": 25, "total": 25}
    expected = set()
    for t in tasks:
        expected |= _expected_pairs("alice", blind_order(0, "alice", t), [1, 2, 3])
        expected |= _expected_pairs("bob", blind_order(0, "bob", t), [3, 1, 2])
    summary, pairs, count = _rank_import(cli, tmp_path, samples_path, out)
    assert pairs == expected and count == 150 and summary["judgements"] == 50
    assert json.loads(server.stop()) == {"out": str(out), "records": 50, "annotators": {"alice": 25, "bob": 25}}


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(tmp_path, start):
    samples = _samples(n=2)
    out = tmp_path / "rankings.jsonl"
    server = start(_write_samples(tmp_path, samples), out, "--annotator", "alice", "--annotator", "bob", "--overlap", "1")
    good = {"annotator": "alice", "index": 0, "prompt_id": "p1", "ranks": [1, 2, 3, 4]}
    json_headers = {"Content-Type": "application/json"}
    cases = [
        ("POST", "/api/submit", b"ranks=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("POST", "/api/submit", b"{not json", json_headers, 400),
        ("POST", "/api/submit", b"\xff\xfe", json_headers, 400),
        ("POST", "/api/submit", b"[" * 40000 + b"]" * 40000, json_headers, 413),
        ("POST", "/api/submit", b"[" * 20000 + b"]" * 20000, json_headers, 400),
        ("POST", "/api/submit", b"[1, 2]", json_headers, 400),
        ("POST", "/api/submit", json.dumps({**good, "annotator": None}).encode(), json_headers, 400),
        ("POST", "/api/submit", json.dumps({**good, "annotator": "carol"}).encode(), json_headers, 403),
        ("POST", "/api/submit", json.dumps({**good, "annotator": "bob"}).encode(), json_headers, 403),  # p1 is alice's
        ("POST", "/api/submit", json.dumps({**good, "index": "0"}).encode(), json_headers, 400),
        ("POST", "/api/submit", json.dumps({**good, "index": 7}).encode(), json_headers, 404),
        ("POST", "/api/submit", json.dumps({**good, "ranks": "1,2,3,4"}).encode(), json_headers, 400),
        ("POST", "/api/submit", json.dumps({**good, "ranks": [1, 2, 3, 9]}).encode(), json_headers, 400),
        ("POST", "/api/submit", json.dumps({**good, "prompt_id": "p2"}).encode(), json_headers, 409),
        ("POST", "/api/submit", json.dumps({**good, "flag": ["x"]}).encode(), json_headers, 400),
        ("POST", "/api/undo", json.dumps({"annotator": "alice"}).encode(), json_headers, 409),  # nothing to undo yet
        ("GET", "/api/submit", None, {}, 405),
        ("GET", "/api/task", None, {}, 400),
        ("GET", "/api/task?annotator=a%20b", None, {}, 403),
        ("GET", "/static/../__init__.py", None, {}, 404),
        ("GET", "/static/index.html", None, {}, 404),  # only the page's own assets
        ("GET", "/etc/passwd", None, {}, 404),
    ]
    for method, path, raw, headers, expected in cases:
        status, data, _ = server.call(method, path, raw=raw, headers=headers)
        assert status == expected and isinstance(data, dict) and data.get("error"), (path, raw and raw[:40], status, data)
    assert not out.exists()  # nothing was written

    status, data, _ = server.call("POST", "/api/submit", good)
    assert status == 200 and data["progress"] == {"done": 1, "total": 1} and data["task"] is None  # alice: p1 only
    status, data, _ = server.call("GET", "/api/task?annotator=bob")
    assert (
        status == 200
        and data["task"]["prompt_id"] == "p2"
        and "policy" not in json.dumps(data)
        and "p2-0" not in json.dumps(data)
    )

    # undo: the latest record goes, its task comes back with the judgement to show again
    status, data, _ = server.call("POST", "/api/undo", {"annotator": "alice"})
    assert status == 200 and data["task"]["prompt_id"] == "p1" and data["previous"] == {"comment": "", "ranks": [1, 2, 3, 4]}
    assert out.read_text() == "" and data["progress"]["done"] == 0 and not data["can_undo"]
    assert server.call("POST", "/api/undo", {"annotator": "alice"})[0] == 409
    status, page, headers = server.call("GET", "/?annotator=alice")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"] and '"mode": "rank"' in page


def test_token_is_required_on_every_request_and_host_is_checked(tmp_path, start):
    samples_path, out = _write_samples(tmp_path, _samples(n=1)), tmp_path / "rankings.jsonl"
    server = start(samples_path, out, "--token", "s3cret")
    assert "token=s3cret" in server.first_url
    for path in ("/", "/static/app.js", "/api/task?annotator=x"):
        assert server.call("GET", path)[0] == 401
    assert server.call("GET", "/api/task?annotator=x", headers={"Authorization": "Bearer nope"})[0] == 401
    assert server.call("GET", "/api/task?annotator=x", headers={"Authorization": "Bearer s3cret"})[0] == 200
    status, _, headers = server.call("GET", "/?token=s3cret")
    assert status == 200 and "rlhfkit_label_token=s3cret" in headers["set-cookie"] and "httponly" in headers["set-cookie"].lower()
    assert server.call("GET", "/static/app.css", headers={"Cookie": "rlhfkit_label_token=s3cret"})[0] == 200
    body = {"annotator": "x", "index": 0, "prompt_id": "p1", "ranks": [1, 1, 2, 2]}
    assert server.call("POST", "/api/submit", body)[0] == 401 and not out.exists()
    server.stop()

    server = start(samples_path, out, "--token", "auto")  # generated, printed once in the URL
    token = re.search(r"token=([\w-]+)", server.first_url).group(1)
    assert len(token) >= 20 and server.call("GET", f"/?token={token}")[0] == 200 and server.call("GET", "/")[0] == 401
    server.stop()

    server = start(samples_path, out)  # loopback, no token: DNS rebinding is refused by the Host check
    assert server.call("GET", "/", headers={"Host": "attacker.example:8765"})[0] == 421
    assert server.call("GET", "/", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_sigkill_mid_burst_keeps_every_acknowledged_judgement_and_a_torn_line_is_cut(cli, tmp_path, start):
    samples = _samples(n=40, k=3, chat=False)
    samples_path, out = _write_samples(tmp_path, samples), tmp_path / "rankings.jsonl"
    server = start(samples_path, out)
    tasks = _tasks(samples)
    acknowledged: list[tuple[str, str]] = []
    lock = threading.Lock()

    def labeler(name: str) -> None:
        for t in tasks:
            try:
                status = server.call(
                    "POST", "/api/submit", {"annotator": name, "index": t.index, "prompt_id": t.prompt_id, "ranks": [2, 1, 3]}
                )[0]
            except OSError:  # the server is gone
                return
            if status == 200:
                with lock:
                    acknowledged.append((name, t.prompt_id))

    threads = [threading.Thread(target=labeler, args=(name,)) for name in ("alice", "bob")]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 20 and time.monotonic() < deadline:
        time.sleep(0.002)
    server.proc.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=30)
    written = [json.loads(line) for line in out.read_text().splitlines()]  # no torn line
    assert set(acknowledged) <= {(r["annotator"], r["prompt_id"]) for r in written} and len(written) < 80
    summary, _, count = _rank_import(cli, tmp_path, samples_path, out)
    assert summary["judgements"] == len(written) and count == 3 * len(written)

    # a power loss mid-line would leave a torn line: the restarted server cuts it off and carries on
    torn = b'{"prompt_id": "p40", "ranking": ["p40-1", "p4'
    with open(out, "ab") as f:
        f.write(torn)
    server = start(samples_path, out)
    assert f"cut off a torn last line ({len(torn)} bytes" in server.log.read_text()
    status, data, _ = server.call("GET", "/api/task?annotator=alice")
    done = sum(r["annotator"] == "alice" for r in written)
    assert status == 200 and data["progress"] == {"done": done, "total": 40} and data["task"]["index"] == done  # resumed
    t = tasks[done]
    judgement = {"annotator": "alice", "index": t.index, "prompt_id": t.prompt_id, "ranks": [1, 2, 3]}
    assert server.call("POST", "/api/submit", judgement)[0] == 200
    summary, _, count = _rank_import(cli, tmp_path, samples_path, out)
    assert summary["judgements"] == len(written) + 1 and count == 3 * (len(written) + 1)


# --- the page in a real browser ---------------------------------------------------------------------


# CI (.ci/run) installs both, and there a missing browser fails the tests instead of skipping them
needs_browser = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get("CI"),
    reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1366,900",
                 "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Page:
    """The labeling page in the browser, in the words a labeler would use."""

    def __init__(self, driver):
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.By, self.ActionChains = driver, By, ActionChains
        self.wait = WebDriverWait(driver, 15, poll_frequency=0.02)

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait_for(lambda: not self.find("#work").get_attribute("hidden") or not self.find("#finished").get_attribute("hidden")
                      or not self.find("#login").get_attribute("hidden"))  # fmt: skip

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def wait_for(self, condition) -> None:
        self.wait.until(lambda _: condition())

    def progress(self) -> str:
        return self.find("#progress-text").text

    def prompt(self) -> str:
        return self.find("#prompt").text

    def keys(self, *keys: str) -> None:
        for key in keys:
            self.driver.switch_to.active_element.send_keys(key)

    def drag(self, letter: str, rank: int) -> None:
        chip = next(c for c in self.find_all("#strip .chip") if c.text == letter)
        slot = self.find(f'#strip .slot[data-rank="{rank}"]')
        chain = self.ActionChains(self.driver, duration=20).click_and_hold(chip).move_by_offset(8, 8)
        chain.move_to_element(slot).release().perform()
        self.wait_for(lambda: letter in [c.text for c in self.find_all(f'#strip .slot[data-rank="{rank}"] .chip')])

    def ranks(self) -> list[int]:
        """The rank pressed on each card, 0 where none."""
        out = []
        for card in self.find_all("#completions .card"):
            pressed = [p.text for p in card.find_elements(self.By.CSS_SELECTOR, '.pill[aria-pressed="true"]')]
            out.append(int(pressed[0]) if pressed else 0)
        return out

    def submit_and_wait(self, press_enter: bool = False) -> None:
        before = self.progress()
        if press_enter:
            self.keys("\ue007")  # Enter
        else:
            self.find("#submit").click()
        self.wait_for(lambda: self.progress() != before)

    def errors(self) -> list[str]:
        """Severe console messages: script errors, CSP violations, missing assets (an API call the
        server refused on purpose, shown to the labeler, is logged by Chromium too and left out)."""
        return [
            e["message"]
            for e in self.driver.get_log("browser")
            if e["level"] == "SEVERE" and not ("/api/" in e["message"] and "Failed to load resource" in e["message"])
        ]


@needs_browser
def test_rank_with_a_tie_by_drag_and_by_keyboard_then_reload_resume_undo(cli, tmp_path, start, browser):
    samples = _samples(n=3)
    tasks = _tasks(samples)
    # texts that make the ranked page read sensibly in the README's screenshot (ids, hence orders, unchanged)
    texts = [
        "Canberra.",
        "Canberra, since 1913.",
        "It is Canberra, not Sydney.",
        "Sydney is the capital of Australia and its largest",
    ]
    shown = {cid: i for i, cid in enumerate(blind_order(0, "alice", tasks[0]))}
    for c in samples[0]["completions"]:
        c["text"], c["finish_reason"] = texts[shown[c["id"]]], "length" if shown[c["id"]] == 3 else "stop"
    samples_path, out = _write_samples(tmp_path, samples), tmp_path / "rankings.jsonl"
    guide = tmp_path / "guide.md"
    guide.write_text("# How to rank\n- **Correct** beats fluent.\n- Same rank = *tie*: you cannot prefer either.\n"
                     "- A response marked *cut off* stopped at the length limit.\n")  # fmt: skip
    server = start(samples_path, out, "--guidelines", str(guide))
    page = Page(browser)
    page.open(server.url + "?annotator=alice")
    assert (
        page.progress() == "0 / 3" and "What is the capital of Australia?" in page.prompt() and "SYSTEM" in page.prompt().upper()
    )
    assert page.find(".guide-text strong").text == "Correct" and len(page.find_all("#completions .card")) == 4

    # 1. by drag: A best, B and C tied second, D third
    page.drag("A", 1)
    page.drag("B", 2)
    page.drag("C", 2)
    assert page.ranks() == [1, 2, 2, 0] and page.find("#submit").get_attribute("disabled")
    assert [c.get_attribute("class").count("tied") for c in page.find_all("#completions .card")] == [0, 1, 1, 0]
    if os.environ.get("RLHFKIT_SCREENSHOT"):
        page.find("#comment").send_keys("B and C say the same thing.")
        page.find("#completions .card").click()
        browser.save_screenshot(os.environ["RLHFKIT_SCREENSHOT"])
        page.find("#comment").clear()
    page.drag("D", 3)
    assert page.ranks() == [1, 2, 2, 3] and not page.find("#submit").get_attribute("disabled")
    page.submit_and_wait()
    assert page.progress() == "1 / 3" and len(out.read_text().splitlines()) == 1

    # 2. by keyboard only: the first card has focus; numbers set ranks, arrows move and adjust
    assert browser.switch_to.active_element.get_attribute("data-pos") == "0"
    page.keys("3", "\ue015", "1", "\ue015", "3", "\ue015", "1", "\ue014")  # A=3, ↓ B=1, ↓ C=3 (tie), ↓ D=1, → D=2
    assert page.ranks() == [3, 1, 3, 2]
    page.submit_and_wait(press_enter=True)
    assert page.progress() == "2 / 3" and len(out.read_text().splitlines()) == 2

    # 3. reload: the page resumes at the third prompt
    browser.refresh()
    page.wait_for(lambda: page.progress() == "2 / 3")
    assert "Question 3" in page.prompt()

    # 4. undo (key U): the second judgement comes back, is changed (D from 2 to 4) and submitted again
    page.keys("u")
    page.wait_for(lambda: page.progress() == "1 / 3")
    assert "Question 2" in page.prompt() and page.ranks() == [3, 1, 3, 2] and len(out.read_text().splitlines()) == 1
    page.keys("\ue015", "\ue015", "\ue015", "4", "\ue007")  # ↓↓↓ to D, 4, Enter
    page.wait_for(lambda: page.progress() == "2 / 3")
    assert len(out.read_text().splitlines()) == 2

    # 5. resume: a new server on the same files, the same page
    server.stop()
    server = start(samples_path, out, "--guidelines", str(guide))
    page.open(server.url + "?annotator=alice")
    assert page.progress() == "2 / 3" and "Question 3" in page.prompt()
    assert page.errors() == []

    expected = _expected_pairs("alice", blind_order(0, "alice", tasks[0]), [1, 2, 2, 3])
    expected |= _expected_pairs("alice", blind_order(0, "alice", tasks[1]), [3, 1, 3, 4])
    summary, pairs, count = _rank_import(cli, tmp_path, samples_path, out)
    assert pairs == expected and count == 5 + 5 and summary["judgements"] == 2


@needs_browser
def test_two_annotators_at_once(cli, tmp_path, start, browser):
    samples = _samples(n=3)
    samples_path, out = _write_samples(tmp_path, samples), tmp_path / "rankings.jsonl"
    server = start(samples_path, out, "--annotator", "alice", "--annotator", "bob")
    tasks = _tasks(samples)
    page = Page(browser)

    # a name that is not on the list gets the login prompt with the reason; the right name gets in
    page.open(server.url + "?annotator=carol")
    assert "not one of this session's annotators" in page.find("#login-error").text
    page.find("#name").clear()
    page.find("#name").send_keys("bob\n")
    page.wait_for(lambda: page.find("#who").text == "bob")
    bob = browser.current_window_handle
    browser.switch_to.new_window("tab")
    alice = browser.current_window_handle
    page.open(server.url + "?annotator=alice")

    # alice ranks the first prompt, then bob (whose page was open all along), then alice the second
    page.keys("1", "\ue015", "2", "\ue015", "3", "\ue015", "4", "\ue007")
    page.wait_for(lambda: page.progress() == "1 / 3")
    browser.switch_to.window(bob)
    assert page.progress() == "0 / 3"
    page.keys("4", "\ue015", "3", "\ue015", "2", "\ue015", "1", "\ue007")
    page.wait_for(lambda: page.progress() == "1 / 3")
    browser.switch_to.window(alice)
    page.keys("1", "\ue015", "1", "\ue015", "2", "\ue015", "2", "\ue007")
    page.wait_for(lambda: page.progress() == "2 / 3")
    browser.switch_to.window(bob)
    browser.refresh()
    page.wait_for(lambda: page.progress() == "1 / 3")
    assert page.errors() == []
    browser.close()
    browser.switch_to.window(alice)

    expected = _expected_pairs("alice", blind_order(0, "alice", tasks[0]), [1, 2, 3, 4])
    expected |= _expected_pairs("bob", blind_order(0, "bob", tasks[0]), [4, 3, 2, 1])
    expected |= _expected_pairs("alice", blind_order(0, "alice", tasks[1]), [1, 1, 2, 2])
    summary, pairs, count = _rank_import(cli, tmp_path, samples_path, out)
    assert pairs == expected and count == 6 + 6 + 4
    assert summary["judgements"] == 3 and summary["agreement"]["pairwise"] is not None


@needs_browser
def test_model_text_is_shown_as_text_and_flag_and_best_of_k_work(cli, tmp_path, start, browser):
    samples = _samples(n=2, k=3, chat=False)
    samples[0]["completions"][0]["text"] = '<img src=x onerror="document.title=\'pwned\'"><b>bold?</b>'
    samples_path, out = _write_samples(tmp_path, samples), tmp_path / "rankings.jsonl"
    server = start(samples_path, out, "--mode", "best-of-k")
    tasks = _tasks(samples, "best-of-k")
    page = Page(browser)
    page.open(server.url + "?annotator=zoe")
    texts = [c.text for c in page.find_all("#completions .card .text")]
    assert samples[0]["completions"][0]["text"] in texts
    assert page.find_all("#completions img, #completions b") == [] and browser.title == "rlhfkit label"

    page.keys("f")  # can't judge: the reason box takes the focus; Enter submits
    page.wait_for(lambda: browser.switch_to.active_element.get_attribute("id") == "flag-reason")
    page.keys("Two answers are the same", "\ue007")
    page.wait_for(lambda: page.progress() == "1 / 2")
    page.keys("2")  # best-of-k: 2 picks B
    assert [c.get_attribute("class").count("chosen") for c in page.find_all("#completions .card")] == [0, 1, 0]
    page.submit_and_wait(press_enter=True)
    page.wait_for(lambda: not page.find("#finished").get_attribute("hidden"))
    assert page.errors() == []

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["ranking"] == [] and records[0]["flag"] == "Two answers are the same"
    best = blind_order(0, "zoe", tasks[1])[1]
    assert records[1]["best"] == best
    summary, pairs, count = _rank_import(cli, tmp_path, samples_path, out)
    assert summary["records"] == 2 and summary["judgements"] == 1  # the flagged prompt made no pairs
    assert pairs == {("zoe", best, other) for other in tasks[1].completion_ids if other != best} and count == 2

