"""Prompts to sample from (and their reference answers), read from any dataset of prompts or chats;
shared by comparison sampling and PPO."""

from __future__ import annotations

from datasets import DatasetDict

from align.core.command import StageError
from align.core.inputs import validate_columns
from align.preferences.format import as_messages


def prompt_records(data: DatasetDict, split: str | None, reference_column: str, need_reference: bool,
                   stage: str) -> list[dict]:
    """Prompts (chat messages ending with a user turn) and reference answers of a dataset, for sampling.

    A `prompt` column (text or chat) with the reference answer in `reference_column` when there is one; or a
    `messages` column: a chat that ends with an assistant reply gives the turns before it as the prompt and
    the reply as the reference. Returns [{prompt, reference, source_id = "<split>:<row>"}].
    """
    splits = [split] if split else list(data)
    records, problems = [], []
    for name in splits:
        columns = data[name].column_names if name in data else []
        if "prompt" in columns:
            validate_columns(data, stage, {"prompt": "str|messages"}, splits=[name])
            references = data[name][reference_column] if reference_column in columns else [None] * len(data[name])
            pairs = list(zip(data[name]["prompt"], references, strict=True))
        elif "messages" in columns:
            validate_columns(data, stage, {"messages": "messages"}, splits=[name])
            pairs = [(chat[:-1], chat[-1]["content"]) if chat[-1]["role"] == "assistant" else (chat, None)
                     for chat in data[name]["messages"]]
        else:
            raise StageError(stage, f"split '{name}' has no 'prompt' or 'messages' column (found: "
                             f"{', '.join(columns) or 'no such split'}) — give prompts (text or chat) or chats, "
                             "e.g. `align self-instruct` output")
        for index, (prompt, reference) in enumerate(pairs):
            where = f"split '{name}' row {index}"
            messages = as_messages(prompt)
            if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
                problems.append(f"{where}: the prompt must end with a non-empty user turn")
            elif need_reference and not (isinstance(reference, str) and reference.strip()):
                problems.append(f"{where}: no reference answer (column '{reference_column}', or a chat ending with "
                                "an assistant reply)")
            records.append({"prompt": messages, "reference": reference, "source_id": f"{name}:{index}"})
    if problems:
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise StageError(stage, f"invalid prompts: {'; '.join(problems[:5])}{more} — fix those rows, or use "
                         "--ranker human, which needs no reference answers")
    return records
