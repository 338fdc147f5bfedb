"""The Self-Instruct stage: parsing, filters, seed files, the bootstrapping loop, resuming, and the real model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from align.core.command import StageError, parse_config
from align.core.outputs import read_manifest
from align.instruct.loop import SelfInstruct, SelfInstructSettings
from align.instruct.parsing import (
    filter_instances,
    instruction_problem,
    keyword_pattern,
    parse_instance,
    parse_instructions,
)
from align.instruct.prompts import INSTRUCTION_HEADER, Prompts
from align.instruct.tasks import build_datasets, load_seed_tasks
from align.lm.generation import Generation
from align.self_instruct import CONFIG_CLASSES
from tests.conftest import ROOT, kill_after_journal_line, run_align, write_jsonl

TEAM_SEEDS = ROOT / "data" / "seed" / "seed_tasks.jsonl"
KEYWORDS = keyword_pattern(["image", "picture", "graph", "file", "map", "draw", "plot", "go to"])


def seed(instruction: str, output: str = "An answer.", task_input: str = "", clf: bool = False, **extra) -> dict:
    return {"instruction": instruction, "instances": [{"input": task_input, "output": output}],
            "is_classification": clf, **extra}


def loop_settings(**overrides) -> SelfInstructSettings:
    """The loop's settings as the stage parses them from these flags."""
    flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    _, settings = parse_config("self-instruct", CONFIG_CLASSES, flags)
    return settings


# ----------------------------------------------------------------------------- parsing


def test_parse_clean_numbered_list():
    text = "Task 9: Write a haiku about rain.\nTask 10: List three uses of vinegar.\nTask 11: Explain what a CPU does."
    items, dropped = parse_instructions(text, truncated=False)
    assert items == ["Write a haiku about rain.", "List three uses of vinegar.", "Explain what a CPU does."]
    assert dropped is None


def test_parse_messy_reply_keeps_items_and_ignores_chatter():
    text = ("Sure! Here are some new tasks:\n\n"
            "9. **Write a haiku about rain.**\n"
            "10) \"List three uses of vinegar.\"\n"
            "- Instruction: Explain what a CPU does\n  to a child.\n"
            "* `Name two rivers in Asia.`\n"
            "Task #13 - Suggest a name for a bakery.\n\n"
            "I hope these tasks are helpful!")
    items, _ = parse_instructions(text, truncated=False)
    assert items == ["Write a haiku about rain.", "List three uses of vinegar.",
                     "Explain what a CPU does to a child.", "Name two rivers in Asia.", "Suggest a name for a bakery."]


def test_parse_truncated_reply_drops_only_the_last_item():
    text = "Task 9: Write a haiku about rain.\nTask 10: List three uses of vinegar.\nTask 11: Explain what a"
    items, dropped = parse_instructions(text, truncated=True)
    assert items == ["Write a haiku about rain.", "List three uses of vinegar."]
    assert dropped == "Explain what a"
    assert parse_instructions("Task 9: Write a haiku about rain.", truncated=True) == ([], "Write a haiku about rain.")


def test_parse_limit_and_empty_items():
    items, _ = parse_instructions("1. a b c d\n2.\n3. e f g h\n4. i j k l", truncated=False, limit=2)
    assert items == ["a b c d", "e f g h"]
    assert parse_instructions("no list here at all", truncated=False) == ([], None)


def test_parse_instance_input_first():
    assert parse_instance("Input: 3, 5, 1\nOutput: 5", output_first=False) == ("3, 5, 1", "5")
    # "None" inputs become "", multi-line outputs are kept, a second example is cut off.
    text = "Input: None\nOutput: Line one.\nLine two.\nInput: another\nOutput: other"
    assert parse_instance(text, output_first=False) == ("", "Line one.\nLine two.")
    assert parse_instance("input:N/A\noutput: yes\nOutput: again", output_first=False) == ("", "yes")
    assert parse_instance("Just an answer with no labels.", output_first=False) is None
    assert parse_instance("Input: something but no output", output_first=False) is None


def test_parse_instance_output_first():
    text = "Class label: Positive\nInput: The soup was wonderful.\nClass label: Negative\nInput: Cold fries."
    assert parse_instance(text, output_first=True) == ("The soup was wonderful.", "Positive")
    assert parse_instance("Label: spam\nInput: WIN A PRIZE NOW", output_first=True) == ("WIN A PRIZE NOW", "spam")
    assert parse_instance("Input: x\nOutput: y", output_first=True) is None


# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize(("text", "reason"), [
    ("Summarize this text.", "too_short"),  # 3 words: outside (3, 150]
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image in three sentences.", "blocked_keyword"),
    ("Draw a cat using only letters.", "blocked_keyword"),
    ("Read the attached files and summarise them.", "blocked_keyword"),  # plurals too
    ("Plot the data points on a chart.", "blocked_keyword"),
    ("Go to the website and tell me its title.", "blocked_keyword"),
    ("- Write a poem about winter mornings.", "starts_with_punctuation"),
    ("\"Write a poem about winter mornings.", "starts_with_punctuation"),
    ("Écris un poème sur les matins d'hiver.", "starts_non_ascii"),
    ("写一首关于冬天早晨的诗 please write it", "starts_non_ascii"),
])
def test_instruction_filters_name_their_reason(text, reason):
    assert instruction_problem(text, 3, 150, KEYWORDS)[0] == reason


@pytest.mark.parametrize("text", [
    "Summarize this short text.",  # 4 words
    " ".join(["word"] * 150),
    "Explain what a mapping between two sets is.",  # "map" only inside another word
    "Tell me how to get to the station from the park.",
    "Write a poem about winter mornings.",
])
def test_instruction_filters_keep_sound_instructions(text):
    assert instruction_problem(text, 3, 150, KEYWORDS) is None


def test_instance_filters():
    def g(text="", truncated=False):
        return Generation(text, truncated)

    parsed = [
        (g("junk"), None),
        (g(truncated=True), ("an input", "an output cut of")),
        (g(), ("an input", "  ")),
        (g(), ("Same words", "same  words")),
        (g(), ("", "A good answer.")),
        (g(), ("", "a good  answer.")),  # a repeat of the one above (case and spacing aside)
        (g(), ("", "Another good answer.")),  # no input: one example is enough
        (g(), ("2 + 2", "4")),
        (g(), ("2 + 2", "5")),  # same input, different output: neither is trusted
    ]
    kept, discarded = filter_instances(parsed)
    assert kept == [("", "A good answer.")]
    assert [reason for _, _, reason in discarded] == [
        "unparseable", "truncated", "empty_output", "input_equals_output", "duplicate_instance", "extra_no_input",
        "conflicting_outputs", "conflicting_outputs"]


# ----------------------------------------------------------------------------- seed tasks


def test_team_seed_file_is_varied():
    tasks = load_seed_tasks(TEAM_SEEDS)
    assert len(tasks) >= 25
    assert 5 <= sum(t.is_classification for t in tasks) < len(tasks)
    assert len({t.instruction for t in tasks}) == len(tasks)


def test_paper_seed_file_loads_unchanged(shared_data):
    tasks = load_seed_tasks(shared_data / "self_instruct" / "seed_tasks.jsonl")
    assert len(tasks) == 175
    assert sum(t.is_classification for t in tasks) > 0
    assert all(t.instances and all(isinstance(o, str) for _, o in t.instances) for t in tasks)


@pytest.mark.parametrize(("rows", "message"), [
    ([seed("Write a poem about the sea."), {"instances": [{"input": "", "output": "x"}]}],
     "line 2: missing or empty 'instruction'"),
    ([{"instruction": "Translate to French.", "instances": [{"input": "cat"}]}], "instance 1 has no 'output'"),
    ([{"instruction": "Translate to French.", "instances": []}], "'instances' must be a non-empty list"),
    ([], "has no seed tasks"),
])
def test_bad_seed_files_exit_2_with_one_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "seeds.jsonl", rows)
    with pytest.raises(StageError, match=re.escape(message)):
        load_seed_tasks(path)
    out = tmp_path / "out"
    result = run_align("self-instruct", "--seed_tasks", path, "--output_dir", out, "--model_name_or_path", "tiny-llama")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: self-instruct:") and message in lines[0]
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_bad_options_exit_2(tmp_path):
    result = run_align("self-instruct", "--output_dir", tmp_path / "o", "--prompt_mode", "poetry", "--batch_size", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "error: self-instruct: --prompt_mode must be one of auto, chat, completion (got 'poetry')" in lines[0]
    assert "error: self-instruct: --batch_size must be >= 1 (got 0)" in lines[1]
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- prompts


def test_prompts_in_both_modes():
    shown = ["Write a poem about rain.", "List two fruits."]
    completion, chat = Prompts("completion"), Prompts("chat")
    text = completion.instructions(shown, new=4)
    assert text.startswith(INSTRUCTION_HEADER) and text.endswith("Task 1: Write a poem about rain.\n"
                                                                 "Task 2: List two fruits.\nTask 3:")
    assert completion.instruction_stop(2, 4) == ("\n\n", "Task 7:")
    messages = chat.instructions(shown, new=4)
    assert messages[-1]["role"] == "user" and "Write 4 new tasks" in messages[-1]["content"]
    demo = load_seed_tasks(TEAM_SEEDS)[:1]
    assert completion.instance("Sort the list.", False, demo).endswith("Task: Sort the list.\nInput:")
    assert completion.instance("Classify the tone.", True, demo).endswith("Task: Classify the tone.\nClass label:")
    chat_instance = chat.instance("Classify the tone.", True, demo)
    assert [m["role"] for m in chat_instance] == ["user", "assistant", "user"]
    assert chat_instance[1]["content"].startswith("Class label: ")


# ----------------------------------------------------------------------------- the loop, with a scripted generator


class ScriptedGenerator:
    """Stands in for the model in loop tests: replies follow from the prompt, so every branch is reachable.

    Instruction prompts get `replies[i]` for the i-th prompt ever seen (cycling); instance prompts get an
    answer in the right order for the task; a task is a classification task when its text says "Classify".
    """

    def __init__(self, replies: list[str], fail_after: int | None = None):
        self.replies = replies
        self.instruction_prompts: list[str] = []
        self.instance_prompts: list[str] = []
        self.calls = 0
        self.fail_after = fail_after

    def _tick(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")

    def generate(self, prompts, settings, num_return_sequences, seed):
        self._tick()
        out = []
        for prompt in prompts:
            if INSTRUCTION_HEADER in prompt:
                self.instruction_prompts.append(prompt)
                reply = self.replies[(len(self.instruction_prompts) - 1) % len(self.replies)]
                # A reply that stops mid-sentence ran out of tokens.
                out.append([Generation(reply, truncated=not reply.endswith((".", "?", "!")))])
                continue
            self.instance_prompts.append(prompt)
            task = prompt.rsplit("Task: ", 1)[1].splitlines()[0]
            if prompt.endswith("Class label:"):
                replies = [f" Positive\nInput: A happy line about {task}", f" Negative\nInput: A sad line about {task}"]
            elif "empty" in task:
                replies = ["Input: x\nOutput:", "Input: y\nOutput: "]
            else:
                replies = [f" Example {i}\nOutput: Answer {i} to {task}" for i in range(num_return_sequences)]
            out.append([Generation(replies[i % len(replies)], False) for i in range(num_return_sequences)])
        return out

    def score(self, prompts, options):
        """Log-probabilities of (Yes, No): Yes is likelier for tasks that start with "Classify"."""
        self._tick()
        return [[-0.5, -1.5] if prompt.rsplit("Task: ", 1)[1].startswith("Classify") else [-1.5, -0.5]
                for prompt in prompts]


REPLIES = [
    "Write a limerick about a sleepy cat.\nTask 10: Classify the review as positive or negative.\n"
    "Task 11: Describe the picture on the wall.\nTask 12: Hi.",
    "Write a limerick about a sleepy cat!\nTask 10: Explain how rainbows form in the sky.\n"
    "Task 11: Produce an empty answer for this task please.\nTask 12: Suggest a name for a new",
    "Give three reasons to learn a second language.\nTask 10: List four animals that live in the desert.",
    "Invent a riddle whose answer is the number seven.\nTask 10: Compare tea and coffee in two sentences.",
    "Recommend a board game for a family of four.\nTask 10: Convert 12 inches to centimeters and explain.",
]


def make_loop(tmp_path, generator, embedding=None, **overrides):
    seeds_path = write_jsonl(tmp_path / "seeds.jsonl", [
        seed("Write a short poem about the ocean at night."),
        seed("Translate the sentence into Spanish.", "Hola.", "Hello."),
        seed("Classify the sentiment of the tweet.", "positive", "I love this!", clf=True),
        seed("Summarize the paragraph in one sentence.", "A summary.", "A long paragraph."),
        seed("Suggest a title for the blog post.", "Ten Tips", "A post about tips."),
        seed("Decide whether the number is even or odd.", "odd", "7", clf=True),
        seed("Explain why the sky looks blue during the day."),
    ])
    settings = {"num_instructions": 100, "max_rounds": 2, "prompts_per_round": 2, "batch_size": 1,
                "seed_examples_per_prompt": 3, "generated_examples_per_prompt": 2, "new_instructions_per_prompt": 4,
                "instances_per_task": 2, **overrides}
    seeds = load_seed_tasks(seeds_path)
    return SelfInstruct(loop_settings(**settings), seeds, generator, Prompts("completion"), embedding), seeds


def test_loop_filters_classifies_and_instantiates(tmp_path):
    generator = ScriptedGenerator(REPLIES)
    loop, seeds = make_loop(tmp_path, generator)
    loop.run(tmp_path / "journal.jsonl")
    assert loop.round == 2 and generator.instruction_prompts and len(generator.instruction_prompts) == 4

    accepted = {task.instruction: task for task in loop.accepted}
    assert set(accepted) == {
        "Write a limerick about a sleepy cat.", "Classify the review as positive or negative.",
        "Explain how rainbows form in the sky.", "Give three reasons to learn a second language.",
        "List four animals that live in the desert.", "Invent a riddle whose answer is the number seven.",
        "Compare tea and coffee in two sentences."}
    reasons = {row["instruction"]: row["reason"] for row in loop.discarded if row["kind"] == "instruction"}
    assert reasons == {
        "Describe the picture on the wall.": "blocked_keyword",
        "Hi.": "too_short",
        "Produce an empty answer for this task please.": "no_valid_instances",
        "Write a limerick about a sleepy cat!": "similar_rouge",  # the same ROUGE tokens, punctuation aside
        "Suggest a name for a new": "truncated",
    }
    assert loop.counts["instance_empty_output"] == 2

    # Output-first for the classification task (label before input), input-first for the others.
    clf = accepted["Classify the review as positive or negative."]
    assert clf.is_classification and clf.instances[0] == ("A happy line about Classify the review as positive or "
                                                          "negative.", "Positive")
    assert [p for p in generator.instance_prompts if p.endswith("Class label:")] == [
        p for p in generator.instance_prompts if "Task: Classify the review" in p.rsplit("\n\n", 1)[1]]
    plain = accepted["Explain how rainbows form in the sky."]
    assert not plain.is_classification and plain.instances == [
        ("Example 0", "Answer 0 to Explain how rainbows form in the sky."),
        ("Example 1", "Answer 1 to Explain how rainbows form in the sky.")]

    # Generated tasks feed back: once some exist, each prompt shows 2 of them beside 3 seeds.
    last = generator.instruction_prompts[-1]
    shown = re.findall(r"^Task \d+: (.*)$", last, re.M)
    assert len(shown) == 5 and sum(s in accepted for s in shown) == 2
    assert sum(s in {t.instruction for t in seeds} for s in shown) == 3
    first_shown = re.findall(r"^Task \d+: (.*)$", generator.instruction_prompts[0], re.M)
    assert set(first_shown) <= {t.instruction for t in seeds} and len(first_shown) == 5  # all human at first

    data, discarded = build_datasets(seeds, loop.accepted, loop.discarded, include_seeds=True)
    rows = data["train"]
    assert rows.column_names == ["instruction", "input", "output", "is_classification", "origin", "round", "task_id",
                                 "messages", "prompt"]
    assert rows["origin"].count("seed") == 7 and rows["origin"].count("generated") == 2 * 7
    translate = rows[1]
    assert translate["messages"] == [{"role": "user", "content": "Translate the sentence into Spanish.\n\nHello."},
                                     {"role": "assistant", "content": "Hola."}]
    assert translate["prompt"] == translate["messages"][:1]
    assert set(discarded["discarded"]["reason"]) >= {"blocked_keyword", "too_short", "empty_output", "truncated"}


class NoSayingGenerator(ScriptedGenerator):
    """A model biased towards "No" for every task, slightly less so for classification tasks."""

    def score(self, prompts, options):
        self._tick()
        return [[-1.0, -0.6] if prompt.rsplit("Task: ", 1)[1].startswith(("Classify", "Decide", "Does", "Is"))
                else [-2.0, -0.2] for prompt in prompts]


def test_classification_threshold_corrects_a_biased_model(tmp_path):
    """Argmax would call nothing a classification task; the threshold calibrated on the prompt's examples does."""
    loop, _ = make_loop(tmp_path, NoSayingGenerator(REPLIES[:1]), max_rounds=1, prompts_per_round=1)
    loop.run(tmp_path / "journal.jsonl")
    assert -1.8 < loop.classification_threshold() < -0.4
    assert {t.instruction: t.is_classification for t in loop.accepted} == {
        "Write a limerick about a sleepy cat.": False, "Classify the review as positive or negative.": True}


def test_near_duplicates_of_the_pool_and_of_each_other_are_discarded(tmp_path):
    replies = ["Write a short poem about the ocean at night time.\n"  # ROUGE-L vs a seed: 0.94
               "Task 10: Write a short story about a dragon who loves to bake bread.\n"
               "Task 11: Write a short story about a dragon who loves baking bread."]  # vs the item above
    loop, _ = make_loop(tmp_path, ScriptedGenerator(replies), max_rounds=1, prompts_per_round=1)
    loop.run(tmp_path / "journal.jsonl")
    assert [t.instruction for t in loop.accepted] == ["Write a short story about a dragon who loves to bake bread."]
    details = {row["instruction"]: row["detail"] for row in loop.discarded}
    assert details["Write a short poem about the ocean at night time."].startswith("ROUGE-L 0.9")
    assert "with: Write a short story about a dragon who loves to bake bread." in \
        details["Write a short story about a dragon who loves baking bread."]


def test_embedding_filter_catches_paraphrases_rouge_misses(tmp_path):
    from align.instruct.dedup import EmbeddingFilter

    replies = ["Tell me why the sky appears blue in daytime.\nTask 10: Name three vegetables that grow underground."]
    plain, _ = make_loop(tmp_path, ScriptedGenerator(replies), max_rounds=1, prompts_per_round=1)
    plain.run(tmp_path / "a.jsonl")
    assert len(plain.accepted) == 2
    embedding = EmbeddingFilter.from_model("all-minilm-l6-v2", threshold=0.8)
    loop, _ = make_loop(tmp_path, ScriptedGenerator(replies), embedding, max_rounds=1, prompts_per_round=1)
    loop.run(tmp_path / "b.jsonl")
    assert [t.instruction for t in loop.accepted] == ["Name three vegetables that grow underground."]
    assert loop.discarded[0]["reason"] == "similar_embedding"


def test_stops_at_the_target(tmp_path):
    loop, _ = make_loop(tmp_path, ScriptedGenerator(REPLIES[2:]), num_instructions=3, max_rounds=50)
    loop.run(tmp_path / "journal.jsonl")
    assert 3 <= len(loop.accepted) <= 4 and loop.step == 2  # 2 accepted per prompt


def test_interrupted_loop_resumes_to_the_same_result(tmp_path):
    """Kill the loop mid-run (after 5 generator calls), replay the journal in a new loop, finish: the output
    equals an uninterrupted run's, with nothing lost or repeated."""
    full, seeds = make_loop(tmp_path, ScriptedGenerator(REPLIES))
    full.run(tmp_path / "full.jsonl")
    journal = tmp_path / "journal.jsonl"
    first, _ = make_loop(tmp_path, ScriptedGenerator(REPLIES, fail_after=5))
    with pytest.raises(KeyboardInterrupt):
        first.run(journal)
    lines = journal.read_text().splitlines()
    assert 0 < len(lines) < full.step
    with open(journal, "a") as handle:
        handle.write('{"step": 9, "round": 1, "candid')  # torn by the kill
    # The replacement sees the prompts of the remaining steps only.
    second, _ = make_loop(tmp_path, ScriptedGenerator(REPLIES))
    second.generator.instruction_prompts = ["already seen"] * len(lines)  # same reply order as an uninterrupted run
    assert second.replay(journal) == len(lines)
    second.run(journal)
    assert [json.loads(line)["step"] for line in journal.read_text().splitlines()] == list(range(full.step))
    assert [(t.instruction, t.instances, t.round, t.task_id) for t in second.accepted] == \
        [(t.instruction, t.instances, t.round, t.task_id) for t in full.accepted]
    assert second.discarded == full.discarded and second.counts == full.counts


# ----------------------------------------------------------------------------- the stage on real models


def tiny_run_args(out: Path) -> list[str]:
    return ["self-instruct", "--model_name_or_path", "tiny-llama", "--output_dir", str(out), "--seed", "0",
            "--max_rounds", "3", "--prompts_per_round", "2", "--batch_size", "1", "--new_instructions_per_prompt", "4",
            "--max_new_tokens", "48", "--instance_max_new_tokens", "24", "--min_words", "0",
            "--blocked_keywords", "nothing-blocked"]


def test_killed_run_resumes_without_losing_or_repeating(tmp_path, tiny_model_path):
    """SIGKILL after the first journaled step (plus a torn line); the same command finishes and matches an
    uninterrupted run exactly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reference = subprocess.run([sys.executable, "-m", "align.cli", *tiny_run_args(tmp_path / "ref")], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    journal = out.with_name("out.partial") / "journal.jsonl"
    log = tmp_path / "first.log"
    kill_after_journal_line(tiny_run_args(out), journal, log, env)
    assert not out.exists()
    journaled = journal.read_text().count("\n")
    assert 1 <= journaled < 6, "the run finished before it could be killed"
    with open(journal, "a") as handle:
        handle.write('{"step": 5, "round": 2, "prompts": 1, "cand')

    second = subprocess.run([sys.executable, "-m", "align.cli", *tiny_run_args(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming:" in second.stderr
    steps = [json.loads(line)["step"] for line in (out / "journal.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
    for name, split in (("dataset", "train"), ("discarded", "discarded")):
        resumed, uninterrupted = (load_from_disk(str(path / name))[split].to_dict() for path in (out, tmp_path / "ref"))
        assert resumed == uninterrupted
    metrics, ref_metrics = read_manifest(out)["metrics"], read_manifest(tmp_path / "ref")["metrics"]
    assert metrics["resumed_steps"] == journaled
    assert {k: v for k, v in metrics.items() if k != "resumed_steps"} == \
        {k: v for k, v in ref_metrics.items() if k != "resumed_steps"}
    assert metrics["candidates"] > 0 and len(load_from_disk(str(out / "discarded"))["discarded"]) > 0


@pytest.mark.smoke
def test_real_model_round_feeds_sft(tmp_path):
    """One small round with SmolLM2-135M-Instruct on the team's seeds accepts new tasks with instances, and
    `align sft` trains on the output unchanged."""
    out = tmp_path / "si"
    result = run_align("self-instruct", "--output_dir", out, "--num_instructions", "4", "--max_rounds", "1",
                       "--prompts_per_round", "2", "--batch_size", "2", "--new_instructions_per_prompt", "5",
                       "--max_new_tokens", "96", "--instance_max_new_tokens", "64", "--seed", "0", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_manifest(out)["metrics"]
    data = load_from_disk(str(out / "dataset"))["train"]
    generated = data.filter(lambda row: row["origin"] == "generated")
    assert metrics["generated_tasks"] >= 2 and len(generated) >= metrics["generated_tasks"]
    assert all(row["output"].strip() and row["messages"][-1]["content"] == row["output"] for row in generated)
    discarded = load_from_disk(str(out / "discarded"))["discarded"]
    assert sum(metrics["discarded_instructions"].values()) == discarded["kind"].count("instruction")

    sft = run_align("sft", "--config", ROOT / "configs" / "tiny" / "sft.yaml", "--dataset_name", out,
                    "--output_dir", tmp_path / "sft", "--max_steps", "2", timeout=600)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert read_manifest(tmp_path / "sft")["inputs"]["dataset"]["path"] == str(out)
