"""`align label` without a browser: loading items, who is given what, the journal, combining rankings,
agreement, the server's guards, and the command's one-line errors."""

from __future__ import annotations

import json
import socket

import pytest

from align import label
from align.core.outputs import read_manifest
from align.preferences import sources
from align.preferences.format import comparisons_dataset
from align.preferences.label_server import create_app
from align.preferences.labeling import (
    Conflict,
    Item,
    LabelError,
    LabelingRound,
    agreement,
    combine_rankings,
    kendall_tau_b,
    preference_agreement,
    summarize,
)
from tests.conftest import write_jsonl


def items(count: int, k: int = 3) -> list[Item]:
    return [Item(f"i{n}", [{"role": "user", "content": f"question {n}"}], [f"answer {n}.{r}" for r in range(k)])
            for n in range(count)]


def judge_everything(labeling: LabelingRound, labelers: list[str], ranks=(0, 1, 2)) -> list[tuple[str, str]]:
    """Let the labelers take turns until nothing is left for any of them; returns (labeler, item) in order."""
    given = []
    while True:
        progressed = False
        for name in labelers:
            view = labeling.next_for(name)["item"]
            if view is not None:
                labeling.submit(name, view["id"], "rank", list(ranks))
                given.append((name, view["id"]))
                progressed = True
        if not progressed:
            return given


# ----------------------------------------------------------------------------- items


def test_items_come_from_each_kind_of_input(tmp_path):
    """A prompt+responses JSONL, a ranking sheet, a comparisons output (its test split stays test) and the
    sheet an `align comparisons --ranker human` output holds all become the same kind of items."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"},
            {"role": "user", "content": "go"}]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "What is 2+2?", "responses": ["4", "5"]},
                                                   {"id": "chat", "prompt": chat, "responses": ["a", "b", "c"]}])
    loaded = label.load_items(str(plain), None)
    assert [(i.id, i.prompt[-1]["content"], i.responses) for i in loaded] == [
        ("line-1", "What is 2+2?", ["4", "5"]), ("chat", "go", ["a", "b", "c"])]

    rows = [{"id": "s1", "prompt": chat, "responses": ["x", "y", "z"]}]
    sources.write_sheet(rows, tmp_path / "to_rank" / "sheet.jsonl", seed=0)
    for source in (tmp_path / "to_rank", tmp_path / "to_rank" / "sheet.jsonl"):
        (item,) = label.load_items(str(source), None)
        assert item.id == "s1" and item.prompt == chat and sorted(item.responses) == ["x", "y", "z"]

    row = {"prompt": chat, "responses": ["best", "worst"], "ranks": [0, 1], "ranker": "human", "source": "oasst"}
    comparisons_dataset({"train": [{**row, "source_id": "t1"}], "test": [{**row, "source_id": "t2"}]}).save_to_disk(
        str(tmp_path / "comparisons" / "dataset"))
    loaded = label.load_items(str(tmp_path / "comparisons"), None)
    assert [(i.id, i.split, i.source) for i in loaded] == [("t1", "train", "oasst"), ("t2", "test", "oasst")]
    assert [i.id for i in label.load_items(str(tmp_path / "comparisons"), "test")] == ["t2"]


# ----------------------------------------------------------------------------- who is given what


def test_each_item_gets_the_judgements_it_needs_and_no_more(tmp_path):
    """With overlap 0.3 of 10 items, three people taking turns: the 3 overlapping items are judged by 2 people,
    the others by exactly 1, nobody judges an item twice, and the round is then complete."""
    labeling = LabelingRound(items(10), tmp_path / "journal.jsonl", overlap=0.3, seed=1)
    assert sorted(labeling.needed.values()) == [1] * 7 + [2] * 3
    given = judge_everything(labeling, ["ann", "bob", "cy"])
    per_item = {i.id: [name for name, item in given if item == i.id] for i in labeling.items}
    assert {item: len(names) for item, names in per_item.items()} == labeling.needed
    assert all(len(set(names)) == len(names) for names in per_item.values())
    assert labeling.complete() and labeling.next_for("dee")["item"] is None
    assert len(labeling.journal.read_text().splitlines()) == 13


def test_an_open_item_is_leased_and_a_skip_passes_it_on(tmp_path):
    labeling = LabelingRound(items(2), tmp_path / "journal.jsonl")
    first = labeling.next_for("ann")["item"]["id"]
    assert labeling.next_for("ann")["item"]["id"] == first  # a reload shows the same item
    second = labeling.next_for("bob")["item"]["id"]
    assert second != first  # ann has the first one open
    assert labeling.next_for("cy")["item"] is None  # both are open on someone's screen
    after_skip = labeling.submit("ann", first, "skip")
    assert after_skip["item"] is None and not after_skip["finished"]  # ann never sees it again...
    assert labeling.next_for("cy")["item"]["id"] == first  # ...someone else does
    labeling.lease_seconds = 0  # a lease lapses: an abandoned screen does not hold an item for ever
    assert labeling.next_for("dee")["item"] is not None


def test_bad_and_repeated_submissions_are_refused_and_not_journaled(tmp_path):
    labeling = LabelingRound(items(1), tmp_path / "journal.jsonl")
    for kwargs, message in [
        ({"item_id": "nope", "action": "rank", "ranks": [0, 1, 2]}, "unknown item"),
        ({"item_id": "i0", "action": "rank", "ranks": [0, 1]}, "2 ranks for 3 responses"),
        ({"item_id": "i0", "action": "rank", "ranks": [1, 1, 1]}, "all 3 responses are tied"),
        ({"item_id": "i0", "action": "flag"}, "a flag needs a reason"),
        ({"item_id": "i0", "action": "delete"}, "action must be one of"),
    ]:
        with pytest.raises(LabelError, match=message):
            labeling.submit("ann", **kwargs)
    with pytest.raises(LabelError, match="name"):
        labeling.next_for("bad\u0000name")
    labeling.submit("ann", "i0", "rank", [3, 1, 1])  # any numbers: stored as dense ranks
    with pytest.raises(Conflict):
        labeling.submit("ann", "i0", "rank", [0, 1, 2])
    (record,) = [json.loads(line) for line in labeling.journal.read_text().splitlines()]
    assert record["ranks"] == [1, 0, 0] and record["labeler"] == "ann"


def test_a_restart_replays_the_journal_and_drops_a_torn_last_line(tmp_path):
    journal = tmp_path / "journal.jsonl"
    labeling = LabelingRound(items(3), journal, seed=3)
    judged = [labeling.next_for("ann")["item"]["id"] for _ in range(1)]
    labeling.submit("ann", judged[0], "rank", [0, 1, 2])
    following = labeling.next_for("ann")["item"]["id"]
    labeling.submit("ann", following, "flag", reason="unsafe", note="instructions for harm")
    with open(journal, "a") as handle:
        handle.write('{"item": "i2", "labeler": "ann", "act')  # SIGKILL mid-write
    again = LabelingRound(items(3), journal, seed=3)
    assert again.dropped == 1 and len(again.submissions) == 2
    assert journal.read_text().count("\n") == 2 and journal.read_text().endswith("\n")
    last = again.next_for("ann")["item"]["id"]
    assert last not in (judged[0], following)  # resumes with the one item ann has not judged


# ----------------------------------------------------------------------------- what the rankings add up to


def test_rankings_combine_by_borda_and_agreement_is_measured():
    assert combine_rankings([[0, 1, 2]]) == [0, 1, 2]
    assert combine_rankings([[0, 1, 2], [1, 0, 2]]) == [0, 0, 1]  # disagreement on the top two: a tie
    assert combine_rankings([[0, 1, 2], [0, 2, 1], [1, 0, 2]]) == [0, 1, 2]
    assert combine_rankings([[0, 1, 1], [0, 1, 2], [2, 1, 0]]) == [0, 1, 1]
    assert kendall_tau_b([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert kendall_tau_b([0, 1, 2], [2, 1, 0]) == pytest.approx(-1.0)
    assert kendall_tau_b([0, 1, 2, 3], [0, 2, 1, 3]) == pytest.approx(4 / 6)
    assert preference_agreement([0, 1, 2], [0, 2, 1]) == (2, 3)
    assert preference_agreement([0, 0, 1], [0, 1, 2]) == (2, 2)  # a tie is no strict pair
    stats = agreement({"a": [[0, 1, 2], [0, 1, 2]], "b": [[0, 1, 2], [2, 1, 0]], "c": [[0, 1]]})
    assert stats["items"] == 2 and stats["kendall_tau_b"] == pytest.approx(0.0)
    assert stats["pairwise_agreement"] == pytest.approx(0.5) and stats["pairs_compared"] == 6


def test_the_summary_has_one_row_per_usable_item(tmp_path):
    """Two people agree on one item and cancel out on another; a flagged and an unranked item stay out."""
    labeling = LabelingRound(items(4), tmp_path / "journal.jsonl", overlap=1.0)
    labeling.submit("ann", "i0", "rank", [0, 1, 2])
    labeling.submit("bob", "i0", "rank", [0, 2, 1])
    labeling.submit("ann", "i1", "rank", [0, 1, 2])
    labeling.submit("bob", "i1", "rank", [2, 1, 0])
    labeling.submit("ann", "i2", "rank", [0, 1, 2])
    labeling.submit("bob", "i2", "flag", reason="unusable")
    labeling.submit("ann", "i3", "skip")
    splits, metrics = summarize(labeling)
    (row,) = splits["train"]
    assert row["source_id"] == "i0" and row["responses"] == ["answer 0.0", "answer 0.1", "answer 0.2"]
    assert row["ranks"] == [0, 1, 1] and row["labeler"] == "ann,bob" and row["num_labelers"] == 2
    assert metrics["left_out_flagged"] == 1 and metrics["left_out_unranked"] == 1
    assert metrics["left_out_rankings_cancel_out"] == 1
    assert (metrics["rankings"], metrics["skips"], metrics["flags"]) == (5, 1, 1)
    assert metrics["agreement"]["items"] == 2 and metrics["agreement"]["pairs_compared"] == 6


# ----------------------------------------------------------------------------- the server's guards


def client(tmp_path, token=None, loopback=True):
    labeling = LabelingRound(items(2), tmp_path / "journal.jsonl")
    app = create_app(labeling, 8765, token, loopback)
    csrf = app.test_client().get("/", base_url="http://127.0.0.1:8765").get_data(as_text=True) if not token else ""
    return app.test_client(), labeling, csrf.split('name="csrf-token" content="')[1].split('"')[0] if csrf else ""


def test_state_changes_need_the_pages_token_and_its_origin(tmp_path):
    web, labeling, csrf = client(tmp_path)
    base = "http://127.0.0.1:8765"
    good = {"X-CSRF-Token": csrf}
    assert web.post("/api/next", json={"labeler": "ann"}, base_url=base).status_code == 403  # no token
    assert web.post("/api/next", data="labeler=ann", headers=good, base_url=base,
                    content_type="application/x-www-form-urlencoded").status_code == 403  # a form post
    evil = {**good, "Origin": "http://evil.example"}
    assert web.post("/api/next", json={"labeler": "ann"}, headers=evil, base_url=base).status_code == 403
    assert web.get("/", base_url="http://evil.example:8765").status_code == 403  # DNS rebinding
    answer = web.post("/api/next", json={"labeler": "ann"}, headers={**good, "Origin": base}, base_url=base)
    assert answer.status_code == 200 and answer.json["item"]["id"] in ("i0", "i1")
    assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
    bad = web.post("/api/submit", json={"labeler": "ann", "item": "i0", "action": "rank", "ranks": [0, 0, 0]},
                   headers=good, base_url=base)
    assert bad.status_code == 400 and "tied" in bad.json["error"]
    assert not labeling.journal.exists()


def test_nothing_but_the_page_is_served(tmp_path):
    web, _, _ = client(tmp_path)
    base = "http://127.0.0.1:8765"
    assert web.get("/static/label.js", base_url=base).status_code == 200
    for path in ("/static/../labeling.py", "/static/%2e%2e/labeling.py", "/static/index.html", "/journal.jsonl",
                 "/../../etc/passwd", "/static/..%2f..%2fetc%2fpasswd"):
        answer = web.get(path, base_url=base)
        assert answer.status_code == 404, path
        assert b"import" not in answer.data and b"root:" not in answer.data


def test_beyond_loopback_every_request_needs_the_access_token(tmp_path):
    web, _, _ = client(tmp_path, token="s3cret-token", loopback=False)
    base = "http://labs.example:8765"
    assert web.get("/", base_url=base).status_code == 403
    assert web.get("/static/label.js", base_url=base).status_code == 403
    assert web.post("/api/next", json={"labeler": "ann"}, base_url=base).status_code == 403
    assert web.get("/?token=wrong", base_url=base).status_code == 403
    entry = web.get("/?token=s3cret-token", base_url=base)
    assert entry.status_code == 303 and entry.headers["Location"].endswith("/")  # the token leaves the address
    cookie = entry.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert web.get("/", base_url=base).status_code == 200  # the cookie now carries it


# ----------------------------------------------------------------------------- the command


@pytest.mark.parametrize("rows, extra, message", [
    (None, ["--input", "missing.jsonl"], "not found"),
    ([{"prompt": "q", "responses": ["only one"]}], [], "has 1 responses"),
    ([{"prompt": "q", "responses": [str(n) for n in range(10)]}], [], "has 10 responses"),
    ([{"id": "x", "prompt": "q", "responses": ["a", "b"]}] * 2, [], "the same id 'x'"),
    ([{"prompt": "q", "responses": "ab"}], [], "must be a list of strings"),
    ([{"prompt": "q", "responses": ["a", "b"]}], ["--overlap", "1.5"], "--overlap must be in [0, 1]"),
    ([{"prompt": "q", "responses": ["a", "b"]}], ["--finish", "true"], "nothing has been ranked"),
])
def test_bad_input_is_one_line_and_nothing_on_disk(rows, extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if rows is not None:
        write_jsonl(tmp_path / "items.jsonl", rows)
    assert label.cli(["--input", "items.jsonl", "--output_dir", "out", "--port", "0", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: label: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["items.jsonl"] if rows is not None else [])


def test_a_busy_port_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "items.jsonl", [{"prompt": "q", "responses": ["a", "b"]}])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert label.cli(["--input", "items.jsonl", "--output_dir", "out", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0] and "--port" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_finish_publishes_what_is_ranked_with_agreement(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "items.jsonl", [{"id": f"q{n}", "prompt": f"question {n}", "responses": ["a", "b", "c"]}
                                           for n in range(6)])
    partial = tmp_path / "out.partial"
    partial.mkdir()
    labeling = LabelingRound(label.load_items("items.jsonl", None), partial / "journal.jsonl", overlap=0.5, seed=42)
    judge_everything(labeling, ["ann", "bob"])
    assert label.cli(["--input", "items.jsonl", "--output_dir", "out", "--overlap", "0.5", "--finish", "true"]) == 0
    manifest = read_manifest(tmp_path / "out")
    metrics = manifest["metrics"]
    assert metrics["rows"] == {"train": 6} and metrics["items_with_overlap"] == 3 and metrics["rankings"] == 9
    assert metrics["agreement"] == {"items": 3, "kendall_tau_b": 1.0, "kendall_tau_b_interval": [1.0, 1.0],
                                    "pairwise_agreement": 1.0, "pairs_compared": 9}
    assert set(metrics["labelers"]) == {"ann", "bob"}
    assert not partial.exists() and (tmp_path / "out" / "journal.jsonl").exists()


def test_one_server_per_round(tmp_path, capsys, monkeypatch):
    """A second `align label` on a round being served (or `--finish` during it) names the running server and
    changes nothing; once that server is gone, the round is free again."""
    from tests.label_browser import Server

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "items.jsonl", [{"prompt": "q", "responses": ["a", "b"]}])
    args = ["--input", str(tmp_path / "items.jsonl"), "--output_dir", str(tmp_path / "out")]
    server = Server(*args, log=tmp_path / "server.log").start()
    try:
        for extra in ([], ["--finish", "true"]):
            assert label.cli([*args, "--port", "0", *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            holder = f"being served by `align label` (pid {server.process.pid}) at {server.url}"
            assert len(err) == 1 and holder in err[0]
    finally:
        server.kill()
    assert label.cli([*args, "--finish", "true"]) == 2
    assert "nothing has been ranked" in capsys.readouterr().err
