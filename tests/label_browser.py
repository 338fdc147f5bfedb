"""Driving `align label` as people do: the server as a separate process, the page in a real headless Chromium
(Debian's `chromium` and `chromium-driver`, through Selenium; nothing is downloaded)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")


def require_browser() -> None:
    """Skip without a browser on a developer's machine; in CI (`CI` set) a missing browser is a failure."""
    if CHROMIUM and CHROMEDRIVER:
        return
    message = "no chromium/chromedriver: `apt-get install chromium chromium-driver` (scripts/test.sh does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Server:
    """`align label ... --port PORT` (default: any free one) in its own process; `url` is the address it printed."""

    def __init__(self, *args: str, log: Path, port: int = 0):
        self.args = [sys.executable, "-m", "align.cli", "label", *map(str, args), "--port", str(port)]
        self.log = log
        self.process = None
        self.url = None

    def start(self, timeout: float = 60) -> Server:
        self.handle = open(self.log, "a")  # noqa: SIM115 - closed in stop()
        seen = self.handle.tell()  # a restart appends to the same log: read only what this run prints
        self.url = None
        # Ctrl-C as a terminal sends it: a test run started in the background (`cmd &`) ignores SIGINT, and a child
        # would inherit that, so the server gets the default disposition back
        self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=self.handle, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)},
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + timeout
        while self.url is None:
            found = re.findall(r"open (http://\S+) to rank", self.log.read_text()[seen:])
            if found:
                self.url = found[-1]
                break
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, "the server did not print its address"
            time.sleep(0.05)
        return self

    @property
    def port(self) -> int:
        return int(re.search(r":(\d+)/", self.url).group(1))

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.handle.close()

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self.handle.close()
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(20)
    return driver


class Page:
    """The ranking page, read and operated the way a person does."""

    def __init__(self, driver):
        self.driver = driver

    def wait(self, condition, timeout: float = 15, what: str = "the page"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = condition()
            except Exception:  # noqa: BLE001 - an element replaced between lookups: look again
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; page text: {self.text()[:1500]}")

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def sign_in(self, name: str) -> None:
        field = self.wait(lambda: self.visible("#name-input"), what="the name form")
        field.clear()
        field.send_keys(name)
        field.submit()

    def visible(self, selector: str):
        elements = [e for e in self.driver.find_elements("css selector", selector) if e.is_displayed()]
        return elements[0] if elements else None

    def item_id(self) -> str | None:
        element = self.visible("#item-id")
        return element.text.strip("()") if element else None

    def wait_item(self, other_than: str | None = None) -> str:
        return self.wait(lambda: (i := self.item_id()) and i != other_than and self.cards() and i,
                         what=f"an item other than {other_than}")

    def cards(self, where: str = "") -> list[dict]:
        """The response cards (`#ranked` / `#unranked`, or both) in display order."""
        script = """return [...document.querySelectorAll(arguments[0] + ' .card')].map(c => ({
            index: Number(c.dataset.index), text: c.querySelector('.text').textContent,
            badge: c.querySelector('.badge').firstChild.textContent, tied: c.classList.contains('tied')}))"""
        return self.driver.execute_script(script, where or "")

    def keys(self, *keys: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        chain = ActionChains(self.driver)
        for key in keys:
            chain.send_keys(key)
        chain.perform()

    def card_element(self, text: str):
        for element in self.driver.find_elements("css selector", ".card"):
            if element.find_element("css selector", ".text").text == text:
                return element
        raise AssertionError(f"no card with text {text!r}")

    def drag(self, text: str, onto, where: str = "middle") -> None:
        """Press on the card with `text`, move over `onto` (a card's text or an element) and release: at its top
        edge, middle (a tie) or bottom edge."""
        from selenium.webdriver.common.action_chains import ActionChains

        source = self.card_element(text)
        target = self.card_element(onto) if isinstance(onto, str) else onto
        height = target.size["height"]
        offset = {"top": -height // 2 + 3, "middle": 0, "bottom": height // 2 - 3}[where]
        (ActionChains(self.driver).move_to_element(source).click_and_hold()
         .move_by_offset(0, 12).move_to_element_with_offset(target, 0, offset).pause(0.05)
         .move_to_element_with_offset(target, 0, offset).release().perform())


def journal_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
