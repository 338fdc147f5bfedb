"""A ranking round for people (`align label`): the items, who ranks what, the journal of every submission,
and what the rankings add up to.

An item is one prompt with its K responses. Each labeler sees the items in one seeded order and each
item's responses in an order shuffled for that labeler, so neither position says anything. An item needs
one judgement, or `labelers_per_overlap_item` from different people when it is among the `overlap`
fraction chosen (seeded) to measure agreement. A judgement is a ranking or a flag (unusable / unsafe); a
skip passes the item on to someone else. While a labeler has an item open it is leased to them, so two
people are not given the same item beyond what it needs; a lease that is not used for `lease_seconds`
lapses.

Every submission is appended to `journal.jsonl` and on disk (fsync) before the page hears back; a
restarted round replays the journal (a torn last line is dropped) and each labeler goes on with the
next item they have not judged.

Several rankings of one item are combined by their Borda scores: each ranking gives a response +1 for every
response it puts below it and -1 for every one above it (ties: 0), divided by K - 1; responses are ordered
by their summed score and equal sums tie. An item flagged by anyone is left out of the dataset.
"""

from __future__ import annotations

import datetime as _dt
import random
import statistics
import threading
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from align.core.journal import JournalWriter, replay
from align.preferences.format import check_ranking, comparison_row, dense_ranks

ACTIONS = ("rank", "skip", "flag")
FLAG_REASONS = ("unusable", "unsafe")
MAX_RESPONSES = 9  # ranks are typed as one digit
MAX_NAME, MAX_NOTE = 60, 500


@dataclass(frozen=True)
class Item:
    """One prompt (chat messages ending with a user turn) and its responses to rank."""

    id: str
    prompt: list[dict]
    responses: list[str]
    split: str = "train"
    source: str = "label"


class LabelError(ValueError):
    """A submission or request the round refuses; the message says why (shown on the page)."""


class Conflict(LabelError):
    """The labeler has already judged this item (a second tab, a double click): nothing is recorded."""


def check_labeler(name: object) -> str:
    """A labeler's name, stripped: 1-60 printable characters."""
    if not isinstance(name, str) or not name.strip():
        raise LabelError("a labeler name is required")
    name = name.strip()
    if len(name) > MAX_NAME or any(unicodedata.category(c).startswith("C") for c in name):
        raise LabelError(f"a labeler name is at most {MAX_NAME} printable characters")
    return name


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Lease:
    item: str
    since: float  # time.monotonic()


@dataclass
class LabelingRound:
    """The state of a round: items, the submissions so far (replayed from `journal`), the open leases.

    Thread-safe: the web server calls `next_for` and `submit` from several threads.
    """

    items: list[Item]
    journal: Path
    overlap: float = 0.0
    labelers_per_overlap_item: int = 2
    seed: int = 42
    lease_seconds: float = 1800.0
    submissions: list[dict] = field(default_factory=list, init=False)

    def __post_init__(self):
        self.by_id = {item.id: item for item in self.items}
        rng = random.Random(self.seed)
        self.order = rng.sample([item.id for item in self.items], len(self.items))
        overlapping = set(rng.sample(self.order, round(self.overlap * len(self.items))))
        self.needed = {i: self.labelers_per_overlap_item if i in overlapping else 1 for i in self.order}
        self._acted: dict[str, dict[str, str]] = defaultdict(dict)  # item -> labeler -> action
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        lines = len(self.journal.read_text(encoding="utf-8").splitlines()) if self.journal.exists() else 0
        self.dropped = lines - replay(self.journal, self._accept)  # a torn last line, a foreign record

    # ------------------------------------------------------------------ the journal

    def _accept(self, record: dict) -> bool:
        self._check(record["item"], check_labeler(record["labeler"]), record["action"], record.get("ranks"),
                    record.get("reason"))
        self._record(record)
        return True

    def _check(self, item_id: object, labeler: str, action: object, ranks: object, reason: object) -> Item:
        item = self.by_id.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise LabelError(f"unknown item {item_id!r}")
        if action not in ACTIONS:
            raise LabelError(f"action must be one of {', '.join(ACTIONS)}")
        if action == "rank":
            if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
                raise LabelError("ranks must be a list of whole numbers, one per response")
            if len(ranks) != len(item.responses):
                raise LabelError(f"{len(ranks)} ranks for {len(item.responses)} responses — rank every response")
            problem = check_ranking(item.responses, dense_ranks(ranks))
            if problem:
                raise LabelError(problem)
        if action == "flag" and reason not in FLAG_REASONS:
            raise LabelError(f"a flag needs a reason: {' or '.join(FLAG_REASONS)}")
        if labeler in self._acted.get(item.id, {}):
            raise Conflict(f"{labeler} has already judged item {item.id}")
        return item

    def _record(self, record: dict) -> None:
        self.submissions.append(record)
        self._acted[record["item"]][record["labeler"]] = record["action"]

    # ------------------------------------------------------------------ serving

    def shown_order(self, item_id: str, labeler: str) -> list[int]:
        """The order this labeler sees the item's responses in (seeded by item and labeler)."""
        count = len(self.by_id[item_id].responses)
        return random.Random(f"{self.seed}:{item_id}:{labeler}").sample(range(count), count)

    def judged(self, item_id: str) -> int:
        """How many people ranked or flagged the item (skips do not count)."""
        return sum(action != "skip" for action in self._acted.get(item_id, {}).values())

    def _open(self, item_id: str, labeler: str, now: float) -> int:
        """Judgements the item has plus leases other labelers hold on it."""
        leased = sum(1 for who, lease in self._leases.items()
                     if who != labeler and lease.item == item_id and now - lease.since < self.lease_seconds)
        return self.judged(item_id) + leased

    def next_for(self, labeler: str) -> dict:
        """The item this labeler should rank now (the one they have open, else the next one free) and the
        progress; `item` is None when nothing is left for them."""
        labeler = check_labeler(labeler)
        with self._lock:
            now = time.monotonic()
            lease = self._leases.get(labeler)
            chosen = None
            if lease is not None and labeler not in self._acted.get(lease.item, {}):
                chosen = lease.item
            else:
                for item_id in self.order:
                    if labeler not in self._acted.get(item_id, {}) and \
                            self._open(item_id, labeler, now) < self.needed[item_id]:
                        chosen = item_id
                        break
            if chosen is None:
                self._leases.pop(labeler, None)
            elif lease is None or lease.item != chosen:
                self._leases[labeler] = _Lease(chosen, now)
            return {"item": None if chosen is None else self._view(chosen, labeler),
                    "progress": self._progress(labeler), "finished": self._complete()}

    def submit(self, labeler: str, item_id: str, action: str, ranks: list[int] | None = None,
               reason: str | None = None, note: str | None = None) -> dict:
        """Record one judgement (on disk before returning) and give the labeler their next item.

        Raises:
            LabelError: an invalid submission; Conflict: the labeler already judged the item.
        """
        labeler = check_labeler(labeler)
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise LabelError(f"a note is at most {MAX_NOTE} characters")
        with self._lock:
            self._check(item_id, labeler, action, ranks, reason)
            lease = self._leases.get(labeler)
            seconds = round(time.monotonic() - lease.since, 1) if lease and lease.item == item_id else None
            record = {"item": item_id, "labeler": labeler, "action": action,
                      "ranks": dense_ranks(ranks) if action == "rank" else None,
                      "reason": reason if action == "flag" else None,
                      "note": (note or None) if action != "rank" else None,
                      "shown": self.shown_order(item_id, labeler), "seconds": seconds, "time": now_iso()}
            with JournalWriter(self.journal) as writer:
                writer.write([record])
            self._record(record)
            if lease and lease.item == item_id:
                del self._leases[labeler]
        return self.next_for(labeler)

    def _view(self, item_id: str, labeler: str) -> dict:
        item = self.by_id[item_id]
        return {"id": item.id, "prompt": item.prompt,
                "responses": [{"index": i, "text": item.responses[i]} for i in self.shown_order(item_id, labeler)]}

    def _progress(self, labeler: str) -> dict:
        mine = Counter(acted[labeler] for acted in self._acted.values() if labeler in acted)
        return {"items": len(self.order), "complete": self._complete_count(), "ranked_by_you": mine["rank"],
                "skipped_by_you": mine["skip"], "flagged_by_you": mine["flag"],
                "judgements_needed": sum(self.needed.values()),
                "judgements": sum(min(self.judged(i), self.needed[i]) for i in self.order)}

    def _complete_count(self) -> int:
        return sum(self.judged(i) >= self.needed[i] for i in self.order)

    def _complete(self) -> bool:
        return self._complete_count() == len(self.order)

    def complete_items(self) -> int:
        """How many items have the judgements they need."""
        with self._lock:
            return self._complete_count()

    def complete(self) -> bool:
        """Every item has the judgements it needs."""
        with self._lock:
            return self._complete()


# ----------------------------------------------------------------------------- what the rankings add up to


def borda_scores(ranks: list[int]) -> list[float]:
    """Per response: (responses ranked below it - responses ranked above it) / (K - 1), in [-1, 1].

    >>> borda_scores([0, 1, 1])
    [1.0, -0.5, -0.5]
    """
    k = len(ranks)
    return [sum((r < other) - (r > other) for other in ranks) / (k - 1) for r in ranks]


def combine_rankings(rankings: list[list[int]]) -> list[int]:
    """Several rankings of the same responses (0 = best) -> one, by summed Borda score; equal sums tie."""
    totals = [round(sum(column), 9) for column in zip(*(borda_scores(r) for r in rankings), strict=True)]
    return dense_ranks([-total for total in totals])


def kendall_tau_b(a: list[int], b: list[int]) -> float | None:
    """Kendall's tau-b between two rankings of the same responses (ties allowed); None when undefined."""
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return None if tau != tau else float(tau)  # NaN: one ranking ties everything


def preference_agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """Of the response pairs both rankings order strictly, how many they order the same way: (agree, pairs)."""
    agree = pairs = 0
    for i, j in combinations(range(len(a)), 2):
        left, right = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
        if left and right:
            pairs += 1
            agree += left == right
    return agree, pairs


def _interval(values: list[float], seed: int = 0, resamples: int = 2000) -> list[float] | None:
    """95% percentile bootstrap interval of a mean (None under 2 values)."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples) - 1], 4)]


def agreement(rankings_by_item: dict[str, list[list[int]]]) -> dict:
    """Inter-annotator agreement over the items ranked by two or more people: mean Kendall tau-b of every pair
    of their rankings (per item, then averaged over items, with a bootstrap interval over items) and the share
    of strictly ordered response pairs two labelers order the same way."""
    taus, agree, pairs = [], 0, 0
    for rankings in rankings_by_item.values():
        if len(rankings) < 2:
            continue
        item_taus = [t for a, b in combinations(rankings, 2) if (t := kendall_tau_b(a, b)) is not None]
        if item_taus:
            taus.append(statistics.fmean(item_taus))
        for a, b in combinations(rankings, 2):
            same, both = preference_agreement(a, b)
            agree, pairs = agree + same, pairs + both
    return {"items": len(taus),
            "kendall_tau_b": round(statistics.fmean(taus), 4) if taus else None,
            "kendall_tau_b_interval": _interval(taus),
            "pairwise_agreement": round(agree / pairs, 4) if pairs else None,
            "pairs_compared": pairs}


def summarize(labeling: LabelingRound) -> tuple[dict[str, list[dict]], dict]:
    """The finished round: comparison rows per split (one per item with a usable ranking) and the counts,
    per-labeler figures and agreement the manifest carries."""
    records = defaultdict(list)
    for record in labeling.submissions:
        records[record["item"]].append(record)
    splits: dict[str, list[dict]] = defaultdict(list)
    counts = Counter()
    rankings_by_item = {}
    for item in labeling.items:
        judged = records.get(item.id, [])
        rankings = [r["ranks"] for r in judged if r["action"] == "rank"]
        if any(r["action"] == "flag" for r in judged):
            counts["left_out_flagged"] += 1
            continue
        if not rankings:
            counts["left_out_unranked"] += 1
            continue
        rankings_by_item[item.id] = rankings
        combined = combine_rankings(rankings)
        if check_ranking(item.responses, combined) is not None:  # the labelers cancel out: no preference
            counts["left_out_rankings_cancel_out"] += 1
            continue
        labelers = sorted(r["labeler"] for r in judged if r["action"] == "rank")
        row = comparison_row(item.prompt, item.responses, combined, "human", item.source, item.id)
        splits[item.split].append({**row, "labeler": ",".join(labelers), "num_labelers": len(labelers)})
    actions = Counter(r["action"] for r in labeling.submissions)
    per_labeler = {}
    for name in sorted({r["labeler"] for r in labeling.submissions}):
        mine = [r for r in labeling.submissions if r["labeler"] == name]
        seconds = [r["seconds"] for r in mine if r["action"] == "rank" and r["seconds"] is not None]
        per_labeler[name] = {**{action: sum(r["action"] == action for r in mine) for action in ACTIONS},
                             "median_seconds_per_ranking": statistics.median(seconds) if seconds else None}
    metrics = {
        "items": len(labeling.items),
        "items_with_overlap": sum(n > 1 for n in labeling.needed.values()),
        "items_complete": labeling.complete_items(),
        "rankings": actions["rank"], "skips": actions["skip"], "flags": actions["flag"],
        "flags_by_reason": dict(Counter(r["reason"] for r in labeling.submissions if r["action"] == "flag")),
        "rows": {split: len(rows) for split, rows in splits.items()},
        "labelers": per_labeler,
        "agreement": agreement(rankings_by_item),
        **dict(counts),
    }
    return dict(splits), metrics
