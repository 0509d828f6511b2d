"""The fleet dashboard in real headless Chromium (Debian's chromium + chromedriver, via selenium):
a viewer key shows the nodes and the rollouts; a bad key is refused. Saves a screenshot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.conftest import Fleet, wait_until
from tests.e2e.test_rollouts import _enroll, _file_baseline, _push_file, _wait_state

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Set to a folder to keep the screenshot there (docs/img is where the docs show it from).
SCREENSHOT_DIR_ENV = "FIELDLINE_SCREENSHOT_DIR"
PAGE_WAIT_S = 30


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    assert not missing, (
        f"{missing} not installed: `make test` installs chromium and chromium-driver with "
        "apt-get when run as root (or: sudo apt-get install chromium chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def test_dashboard_shows_nodes_and_rollouts_to_a_viewer(
    fleet: Fleet, tmp_path: Path, browser: webdriver.Chrome
) -> None:
    ids = _enroll(fleet, ["edge-a", "edge-b", "edge-c"], {"line": "a"})
    _file_baseline(fleet, tmp_path, list(ids.values()))
    with fleet.admin() as admin:
        _push_file(admin, tmp_path, "2.0")
        done = admin.create_rollout(
            {
                "artifact": "config@2.0",
                "selector": "line=a",
                "waves": "1,100%",
                "gate": {"soak_s": 0.5},
            }
        )
        _wait_state(admin, done["id"], ("succeeded",), 120)
        _push_file(admin, tmp_path, "3.0")
        running = admin.create_rollout(
            {
                "artifact": "config@3.0",
                "selector": "line=a",
                "waves": "1,50%,100%",
                "gate": {"soak_s": 3600},
            }
        )
        wait_until(
            lambda: admin.get_rollout(running["id"])["soak_started_at"], 60, "wave 1 to soak"
        )
        viewer = admin.create_key("viewer", "dashboard")["key"]

    page = httpx.get(fleet.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    browser.get(f"{fleet.url}/?refresh=1#key={viewer}")
    wait = WebDriverWait(browser, PAGE_WAIT_S)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr[data-node]")) == 3)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-rollout]")) == 2)
    wait.until(lambda d: "soaking" in _text(d) and "history" in _text(d))
    text = _text(browser)
    for node_id in ids.values():
        assert node_id in text
    assert done["id"] in text and running["id"] in text
    assert "succeeded" in text and "running" in text
    assert "config@2.0" in text  # active versions
    assert "3 / 3" in text  # nodes online
    assert "#key=" not in browser.current_url  # the key left the address bar
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get(SCREENSHOT_DIR_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "dashboard.png")

    # A wrong key gets the login form and the API's refusal, no data.
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{fleet.url}/#key=flk_wrong")
    wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "board").is_displayed()
