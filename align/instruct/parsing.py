"""Reading the model's replies and filtering what it proposes (pure functions on text).

Instruction lists are parsed leniently and a last item cut off by the token limit is dropped alone;
instructions are refused for their length, blocked keywords (things a text model cannot act on) or a
leading punctuation / non-ASCII character; instances for an empty output, an input equal to the output,
the same input with different outputs, or truncation."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from align.lm.generation import Generation

# Requests a text-only model cannot act on (the paper's list).
BLOCKED_KEYWORDS = ("image", "picture", "graph", "file", "map", "draw", "plot", "go to")


EMPTY_INPUTS = {"", "none", "n/a", "na", "<noinput>", "no input", "-", "(none)", "null", "nothing", "<input>", "<none>"}


# The start of a list item: "Task 9:", "Instruction 3.", "9.", "9)", "- ", "* ", "• ".
_ITEM_START = re.compile(r"^\s*(?:(?:task|instruction)\s*#?\s*\d+\s*[:.)-]|\d+\s*[.):]|[-*•](?=\s))\s*", re.I)


_LABEL = re.compile(r"^(?:task|instruction|new task)\s*:\s*", re.I)


def parse_instructions(text: str, truncated: bool, limit: int | None = None) -> tuple[list[str], str | None]:
    """Instructions in a generated list, leniently.

    Items start with "Task N:", "N.", "N)" or a bullet; a line without a marker continues the current item
    unless a blank line closed it (so a preamble or a sign-off is ignored). Markdown bold and quotes around an
    item are removed, and whitespace is collapsed.

    Args:
        text: The reply; in completion mode, the reply with the prompt's last "Task N:" put back in front.
        truncated: The generation ran out of tokens, so its last item may be cut off.
        limit: Keep at most this many items (None: all).

    Returns:
        (items, dropped): the complete items in order, and the last item when `truncated` dropped it, else None.
    """
    items: list[list[str]] = []
    open_item = False
    for line in text.splitlines():
        if not line.strip():
            open_item = False
            continue
        marker = _ITEM_START.match(line)
        if marker:
            items.append([line[marker.end():]])
            open_item = True
        elif open_item:
            items[-1].append(line)
    cleaned = [_clean_item(" ".join(parts)) for parts in items]
    dropped = None
    if truncated and cleaned:
        dropped = cleaned.pop()
    cleaned = [item for item in cleaned if item]
    return (cleaned if limit is None else cleaned[:limit]), dropped


def _clean_item(text: str) -> str:
    text = " ".join(text.split())
    text = _LABEL.sub("", text)
    for wrapper in ("**", '"', "'", "`"):
        if len(text) > 2 * len(wrapper) and text.startswith(wrapper) and text.endswith(wrapper):
            text = text[len(wrapper):-len(wrapper)].strip()
    return text.replace("**", "").strip()


_INPUT = re.compile(r"^\s*input\s*:[ \t]*", re.I | re.M)


_OUTPUT = re.compile(r"^\s*output\s*:[ \t]*", re.I | re.M)


_LABEL_LINE = re.compile(r"^\s*(?:class\s*label|label)\s*:[ \t]*", re.I | re.M)


# A second example or a next task starting inside the reply: everything from there on is dropped.
_NEXT_BLOCK = re.compile(r"\n\s*(?:input|output|task|example\s*\d*|class\s*label|label)\s*:", re.I)


def parse_instance(text: str, output_first: bool) -> tuple[str, str] | None:
    """(input, output) from an instance reply, or None when it lacks the labelled parts.

    Input-first replies read "Input: ...\\nOutput: ..."; output-first ones "Class label: ...\\nInput: ...".
    An input written as None / N/A / <noinput> becomes "". Text after the first example is ignored.
    """
    first, second = (_LABEL_LINE, _INPUT) if output_first else (_INPUT, _OUTPUT)
    start = first.search(text)
    if start is None:
        return None
    middle = second.search(text, start.end())
    if middle is None:
        return None
    head = text[start.end():middle.start()].strip()
    tail = text[middle.end():]
    following = _NEXT_BLOCK.search(tail)
    tail = (tail[:following.start()] if following else tail).strip()
    if output_first:
        label, task_input = head.splitlines()[0].strip() if head else "", tail
        return _normal_input(task_input), label
    return _normal_input(head), tail


def _normal_input(text: str) -> str:
    return "" if text.strip().strip(".").lower() in EMPTY_INPUTS else text.strip()


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern | None:
    """Whole-word, case-insensitive match of any keyword or its plural."""
    words = [k.strip() for k in keywords if k.strip()]
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")s?\b", re.I)


def instruction_problem(text: str, min_words: int, max_words: int,
                        keywords: re.Pattern | None) -> tuple[str, str] | None:
    """(reason, detail) when an instruction fails a text filter, else None (ROUGE-L and duplicates aside)."""
    words = len(text.split())
    if words <= min_words:
        return "too_short", f"{words} words"
    if words > max_words:
        return "too_long", f"{words} words"
    found = keywords.search(text) if keywords else None
    if found:
        return "blocked_keyword", found.group(0).lower()
    if text[0] in string.punctuation:
        return "starts_with_punctuation", text[0]
    if not text[0].isascii():
        return "starts_non_ascii", text[0]
    return None


def filter_instances(parsed: Sequence[tuple[Generation, tuple[str, str] | None]]
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Keep the sound instances of one task: (kept (input, output), discarded (input, output, reason)).

    Per instance: `unparseable`, `truncated` (ran out of tokens), `empty_output`, `input_equals_output`;
    then `duplicate_instance` (a repeat of a kept one), `extra_no_input` (a task that takes no input needs one
    example: its first is kept, later ones with other outputs are dropped — open-ended tasks have many right
    answers, so they are not conflicts) and `conflicting_outputs` (one non-empty input with different outputs:
    none of them is trusted).
    """
    kept: list[tuple[str, str]] = []
    discarded: list[tuple[str, str, str]] = []
    for generation, instance in parsed:
        if instance is None:
            discarded.append(("", generation.text, "unparseable"))
            continue
        task_input, output = instance
        if generation.truncated:
            reason = "truncated"
        elif not output.strip():
            reason = "empty_output"
        elif task_input and normalized(task_input) == normalized(output):
            reason = "input_equals_output"
        elif any(normalized(task_input) == normalized(i) and normalized(output) == normalized(o) for i, o in kept):
            reason = "duplicate_instance"
        elif not task_input and any(not i for i, _ in kept):
            reason = "extra_no_input"
        else:
            kept.append(instance)
            continue
        discarded.append((task_input, output, reason))
    outputs_by_input: dict[str, set[str]] = {}
    for task_input, output in kept:
        outputs_by_input.setdefault(normalized(task_input), set()).add(normalized(output))
    conflicting = {key for key, outputs in outputs_by_input.items() if len(outputs) > 1}
    discarded += [(i, o, "conflicting_outputs") for i, o in kept if normalized(i) in conflicting]
    return [(i, o) for i, o in kept if normalized(i) not in conflicting], discarded
