"""End to end in a real headless browser (Debian's chromium + chromedriver, installed by .ci/run):
two readers answer by keyboard and mouse, the server process is killed and restarted mid-study, and the
organiser's export holds every answer exactly once. Saves a screenshot of the reader page under figures/.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from busgen_lib.evaluate.turing import read_turing_export, turing_table
from busgen_lib.reader_study.create import reader_path
from busgen_lib.reader_study.store import DB_NAME

from reader_study_fixtures import export_frame, phantom_pair, turing_study

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "figures" / "reader_study" / "reader_page.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("BUSGEN_REQUIRE_BROWSER", "") == "1"  # .ci/run sets it: a missing browser fails CI

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not REQUIRED,
    reason="needs chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run installs them)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m busgen_lib reader-study serve` as a real subprocess on a loopback port."""

    def __init__(self, study: Path, port: int):
        self.study, self.port, self.process = study, port, None
        self.base = f"http://127.0.0.1:{port}"

    def start(self, probe: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([sys.executable, "-m", "busgen_lib", "reader-study", "serve", "--study",
                                         str(self.study), "--port", str(self.port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + probe, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError("the reader-study server did not start within 30 s")

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown handler runs, as in a crash
        self.process.wait(timeout=10)


def _status(base: str, method: str, path: str, body: dict | None = None) -> int:
    """The HTTP status of a raw request (the path is sent exactly as given, no normalisation)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    data = urllib.parse.urlencode(body) if body else None
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    connection.request(method, path, body=data, headers=headers)
    status = connection.getresponse().status
    connection.close()
    return status


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1100",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _state(driver) -> tuple[str | None, str | None]:
    """(position, image_id) of the page's form, or (None, None) on a page without one."""
    return tuple(driver.execute_script(
        "var f = document.getElementById('answer-form');"
        "return f ? [f.position.value, f.image_id.value] : [null, null];"))


def _answer(driver, how: str, answer: str, confidence: str) -> tuple[str, str, str]:
    """Answer the current image by keyboard or mouse; wait for the next page; (image_id, answer, confidence)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "var i = document.getElementById('study-image'); return i.complete && i.naturalWidth > 0;"))
    position, image_id = _state(driver)
    if how == "keyboard":
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys({"real": "r", "generated": "g"}[answer])
        body.send_keys(confidence)
        body.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.CSS_SELECTOR, f"input[name=answer][value={answer}]").click()
        driver.find_element(By.CSS_SELECTOR, f"input[name=confidence][value='{confidence}']").click()
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: _state(d)[0] != position)
    return image_id, answer, confidence


def test_two_readers_a_server_crash_and_an_export_with_every_answer_once(tmp_path, browser):
    from selenium.webdriver.common.by import By

    started = time.monotonic()
    made = turing_study(tmp_path, phantom_pair(tmp_path / "phantoms"))
    alice, bob = made.reader_tokens["alice"], made.reader_tokens["bob"]
    organiser = f"/o/{made.organiser_token}"
    server = Server(made.folder, _free_port())
    server.start(organiser)
    given: dict[tuple[str, str], tuple[str, str]] = {}

    def answer(reader: str, how: str, guess: str, confidence: str) -> None:
        image_id, guess, confidence = _answer(browser, how, guess, confidence)
        assert (reader, image_id) not in given
        given[(reader, image_id)] = (guess, confidence)

    try:
        browser.get(server.base + reader_path(alice))
        answer("alice", "keyboard", "generated", "4")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
        answer("alice", "mouse", "real", "2")
        answer("alice", "keyboard", "real", "5")
        stale_form = {"position": "0", "image_id": next(i for (r, i) in given if r == "alice"), "stage": "first",
                      "answer": "real", "confidence": "1"}
        browser.get(server.base + reader_path(bob))
        answer("bob", "mouse", "generated", "3")
        answer("bob", "keyboard", "real", "1")

        server.kill()  # mid-study crash; then the same server again
        server.start(organiser)

        browser.get(server.base + reader_path(alice))
        assert "Image 4 of 6 (3 answered)" in browser.find_element(By.ID, "progress-text").text
        assert _status(server.base, "POST", f"{reader_path(alice)}/answer", stale_form) == 409  # replayed
        for k in range(3):
            answer("alice", "keyboard", "generated" if k % 2 else "real", str(k + 1))
        assert "All images are answered" in browser.find_element(By.ID, "done").text
        browser.get(server.base + reader_path(bob))
        assert "Image 3 of 6 (2 answered)" in browser.find_element(By.ID, "progress-text").text
        for k in range(4):
            answer("bob", "mouse", "real" if k % 2 else "generated", "3")

        bad = "A" * 43
        assert _status(server.base, "GET", f"/r/{bad}") == 404
        assert _status(server.base, "GET", f"/o/{alice}/export.csv") == 404
        for attempt in (f"../{DB_NAME}", f"..%2F{DB_NAME}", f"../../{DB_NAME}"):
            assert _status(server.base, "GET", f"{reader_path(alice)}/image/{attempt}") == 404
        assert _status(server.base, "POST", f"{reader_path(bob)}/answer", {"answer": "real"}) == 400
        browser.get(f"{server.base}/r/{bad}")
        assert "This link is not valid" in browser.page_source

        with urllib.request.urlopen(f"{server.base}{organiser}/export.csv", timeout=10) as response:
            export = response.read().decode()
    finally:
        server.kill()
    df = export_frame(export)
    assert len(df) == 12 and not df.duplicated(["reader", "image_id"]).any()
    assert {(r, i): (a, c) for r, i, a, c in zip(df["reader"], df["image_id"], df["answer"], df["confidence"])} \
        == given
    (tmp_path / "export.csv").write_text(export)
    table = turing_table(read_turing_export(tmp_path / "export.csv")).set_index("reader")
    assert table.loc["alice", "n"] == table.loc["bob", "n"] == 6
    print(f"\nbrowser end-to-end test: {time.monotonic() - started:.1f} s; screenshot {SCREENSHOT}")
