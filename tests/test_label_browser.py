"""`align label` in a real headless Chromium: ranking by keyboard and by drag, a reload mid-item, a SIGKILL of the
server mid-session, skip and flag, an HTML response that must stay inert, and the access token beyond loopback.
The journal and the published dataset must hold exactly what was submitted."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request

import pytest
from datasets import load_from_disk

from align.core.outputs import read_manifest
from tests.conftest import run_align, write_jsonl
from tests.label_browser import Page, Server, browser, journal_records, require_browser

WORDS = {"best": 1, "fine": 2, "poor": 3}  # what each response deserves, written in its text
XSS = ['<script>window.__xss = 1</script>', '<img src=x onerror="window.__xss = 2">', "plain <b>text</b>"]


@pytest.fixture
def driver():
    require_browser()
    driver = browser()
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deserved(text: str) -> int:
    return WORDS[text.split()[-1]]


def test_a_round_by_keyboard_and_drag_survives_a_reload_and_a_killed_server(driver, tmp_path):
    items = [{"id": f"q{n}", "prompt": f"Question {n}?", "responses": [f"answer {n} {w}" for w in WORDS]}
             for n in range(6)]
    write_jsonl(tmp_path / "items.jsonl", items)
    port = free_port()
    args = ["--input", tmp_path / "items.jsonl", "--output_dir", tmp_path / "labels"]
    server = Server(*args, port=port, log=tmp_path / "server.log").start()
    page = Page(driver)
    expected = {}  # item -> the action and ranks the journal must hold
    try:
        driver.get(server.url)
        page.sign_in("ann")

        # 1. keyboard alone: focus starts on the first response; each digit ranks one and moves on; Enter submits
        item = page.wait_item()
        page.keys(*[str(deserved(card["text"])) for card in page.cards()])
        assert [card["badge"] for card in page.cards("#ranked")] == ["1", "2", "3"]
        page.keys("\ue007")  # Enter
        expected[item] = ("rank", [0, 1, 2])

        # 2. by drag: best into the empty ranking, poor below it, fine dropped onto poor = a tie; submit by mouse
        item = page.wait_item(other_than=item)
        text = {deserved(card["text"]): card["text"] for card in page.cards()}
        page.drag(text[1], driver.find_element("id", "ranked-zone"))
        page.drag(text[3], text[1], "bottom")
        page.drag(text[2], text[3], "middle")
        ranked = page.cards("#ranked")
        assert [(c["text"], c["badge"], c["tied"]) for c in ranked] == [
            (text[1], "1", False), (text[2], "2", True), (text[3], "2", True)] or \
            [(c["text"], c["badge"], c["tied"]) for c in ranked] == [
            (text[1], "1", False), (text[3], "2", True), (text[2], "2", True)]
        driver.find_element("id", "submit").click()
        expected[item] = ("rank", [0, 1, 1])

        # 3. a reload mid-item shows the same item with what was already ranked
        item = page.wait_item(other_than=item)
        first = page.cards()[0]
        page.keys(str(deserved(first["text"])))
        driver.refresh()
        assert page.wait_item() == item
        restored = page.wait(lambda: page.cards("#ranked"), what="the restored draft")
        assert [(c["text"], c["badge"]) for c in restored] == [(first["text"], str(deserved(first["text"])))]
        page.keys(*[str(deserved(card["text"])) for card in page.cards("#unranked")])
        page.keys("\ue007")
        expected[item] = ("rank", [0, 1, 2])

        # 4. skip, 5. flag with a reason
        item = page.wait_item(other_than=item)
        page.keys("s")
        expected[item] = ("skip", None)
        item = page.wait_item(other_than=item)
        page.keys("f")
        driver.find_element("css selector", 'input[name="flag-reason"][value="unsafe"]').click()
        note = driver.find_element("id", "flag-note")
        note.click()
        note.send_keys("asks for something harmful\ue007")
        expected[item] = ("flag", None)

        # 6. SIGKILL the server with an item half ranked; the same command resumes it
        item = page.wait_item(other_than=item)
        page.keys(str(deserved(page.cards()[0]["text"])))
        server.kill()
        server.start()
        driver.refresh()
        assert page.wait_item() == item
        page.keys(*[str(deserved(card["text"])) for card in page.cards("#unranked")])
        page.keys("\ue007")
        expected[item] = ("rank", [0, 1, 2])
        page.wait(lambda: "Nothing left for you to rank" in page.text(), what="the end of ann's items")
        assert "5 of 6 items complete" in page.text()  # the skipped one waits for someone else

        server.process.send_signal(signal.SIGINT)
        assert server.wait() == 130
    finally:
        server.stop()

    journal = journal_records(tmp_path / "labels.partial" / "journal.jsonl")
    assert len(journal) == 6 and {r["labeler"] for r in journal} == {"ann"}
    by_item = {r["item"]: r for r in journal}
    responses = {i["id"]: i["responses"] for i in items}
    for item, (action, want) in expected.items():
        record = by_item[item]
        assert record["action"] == action
        if action == "rank":  # the journal keeps ranks in the input's response order
            assert [want[deserved(responses[item][i]) - 1] for i in range(3)] == record["ranks"], record
    flag = next(r for r in journal if r["action"] == "flag")
    assert flag["reason"] == "unsafe" and flag["note"] == "asks for something harmful"

    finished = run_align("label", *args, "--finish", "true")
    assert finished.returncode == 0, finished.stderr
    rows = load_from_disk(str(tmp_path / "labels" / "dataset"))["train"]
    assert sorted(rows["source_id"]) == sorted(i for i, (a, _) in expected.items() if a == "rank")
    for row in rows:
        assert [deserved(t) for t in row["responses"]] == [1, 2, 3]  # best first
        assert row["ranks"] == list(expected[row["source_id"]][1]) and row["labeler"] == "ann"
    metrics = read_manifest(tmp_path / "labels")["metrics"]
    assert (metrics["rankings"], metrics["skips"], metrics["flags"]) == (4, 1, 1)
    assert json.loads((tmp_path / "labels" / "flagged.jsonl").read_text())["reason"] == "unsafe"

    reward = run_align("reward", "--config", "configs/tiny/reward.yaml", "--dataset_name", tmp_path / "labels",
                       "--output_dir", tmp_path / "reward", "--max_steps", "2")
    assert reward.returncode == 0, reward.stderr[-2000:]  # `align reward` trains on it as it is


def test_html_in_a_response_stays_text_and_beyond_loopback_the_token_is_required(driver, tmp_path):
    prompt = [{"role": "user", "content": "Say <i>hello</i> <script>window.__xss = 3</script>"}]
    write_jsonl(tmp_path / "items.jsonl", [{"id": "x1", "prompt": prompt, "responses": XSS}])
    server = Server("--input", tmp_path / "items.jsonl", "--output_dir", tmp_path / "labels", "--host", "0.0.0.0",
                    log=tmp_path / "server.log").start()
    try:
        assert "?token=" in server.url
        base = f"http://127.0.0.1:{server.port}"
        for request in (urllib.request.Request(base + "/"),
                        urllib.request.Request(base + "/api/next", data=b'{"labeler": "eve"}', method="POST",
                                               headers={"Content-Type": "application/json"})):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 403

        driver.get(base + "/?" + server.url.split("?")[1])
        assert "token" not in driver.current_url  # the token does not stay in the address bar
        page = Page(driver)
        page.sign_in("ann")
        assert page.wait_item() == "x1"
        assert sorted(card["text"] for card in page.cards()) == sorted(XSS)
        assert "Say <i>hello</i> <script>window.__xss = 3</script>" in page.text()
        assert driver.execute_script("return document.querySelectorAll('#item img, #item script, #item i').length") \
            == 0
        page.keys(*[str(XSS.index(card["text"]) + 1) for card in page.cards()])
        page.keys("\ue007")
        page.wait(lambda: "Every item is ranked" in page.text(), what="the end of the round")
        assert driver.execute_script("return window.__xss === undefined")
        assert server.wait(timeout=180) == 0  # complete: the server publishes and stops by itself (slow when shared)
    finally:
        server.stop()
    rows = load_from_disk(str(tmp_path / "labels" / "dataset"))["train"]
    assert rows["responses"] == [XSS] and rows["ranks"] == [[0, 1, 2]]
