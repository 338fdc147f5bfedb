"""The prompts of the Self-Instruct loop, written by the team: generating instructions, identifying
classification tasks, and generating instances (input first, or label first for classification)."""

from __future__ import annotations

from collections.abc import Sequence

from align.instruct.tasks import Task

INSTRUCTION_HEADER = ("Below is a list of tasks that people give to a helpful assistant. Each task is one instruction. "
                      "The tasks differ in topic and in kind: questions, rewriting, classification, brainstorming, "
                      "math, coding, advice, explanation.")


CLASSIFICATION_HEADER = ("For each task, decide whether its answer is always one of a small fixed set of labels, "
                         "such as yes/no, true/false, positive/negative or one category from a given list. "
                         "Answer Yes or No.")


# (instruction, has a fixed label set) — written for this prompt, not taken from any seed file.
CLASSIFICATION_EXAMPLES = (
    ("Classify the sentiment of the review as positive, negative, or neutral.", True),
    ("Write a short story about a dog that gets lost in a city.", False),
    ("Is the following statement true or false?", True),
    ("Summarize the paragraph in two sentences.", False),
    ("Decide whether the email is spam or not spam.", True),
    ("Give three tips for sleeping better.", False),
    ("Tell which of the four seasons the description fits best.", True),
    ("Translate the sentence into French.", False),
    ("Find the largest number in the list.", False),
    ("Does the sentence contain a grammatical error?", True),
)


INPUT_FIRST_HEADER = ("Each task below is followed by one example: the input it is applied to (None when the task "
                      "needs no input) and a correct output.")


OUTPUT_FIRST_HEADER = ("Each task below has a small set of possible answers (class labels). Each example gives a label "
                       "first, then an input that has that label.")


NO_INPUT = "None"


class Prompts:
    """The text (completion mode) or chat messages (chat mode) of every prompt the stage sends."""

    def __init__(self, mode: str):
        if mode not in ("chat", "completion"):
            raise ValueError(f"prompt mode must be chat or completion, got {mode!r}")
        self.mode = mode

    def instructions(self, examples: Sequence[str], new: int) -> str | list[dict]:
        listed = "\n".join(f"Task {i}: {text}" for i, text in enumerate(examples, start=1))
        following = len(examples) + 1
        if self.mode == "completion":
            return f"{INSTRUCTION_HEADER}\n\n{listed}\nTask {following}:"
        request = (f"{INSTRUCTION_HEADER}\n\n{listed}\n\nWrite {new} new tasks, different from these and from each "
                   f"other. Number them from Task {following}, one instruction per line, and do not answer them.")
        return [{"role": "user", "content": request}]

    def instruction_stop(self, examples: int, new: int) -> tuple[str, ...]:
        # Completion mode ends the list at a blank line or after `new` items; a chat reply ends at EOS.
        return ("\n\n", f"Task {examples + new + 1}:") if self.mode == "completion" else ()

    def classification(self, instruction: str) -> str | list[dict]:
        shots = "\n\n".join(f"Task: {text}\nFixed labels: {'Yes' if label else 'No'}"
                            for text, label in CLASSIFICATION_EXAMPLES)
        if self.mode == "completion":
            return f"{CLASSIFICATION_HEADER}\n\n{shots}\n\nTask: {instruction}\nFixed labels:"
        question = f"{CLASSIFICATION_HEADER}\n\n{shots}\n\nTask: {instruction}\nFixed labels?"
        return [{"role": "user", "content": question}]

    def classification_options(self) -> tuple[str, str]:
        return (" Yes", " No") if self.mode == "completion" else ("Yes", "No")

    def instance(self, instruction: str, output_first: bool, demos: Sequence[Task]) -> str | list[dict]:
        """Input-first (ordinary) or output-first (classification) instance prompt with seed demonstrations."""
        if self.mode == "completion":
            header = OUTPUT_FIRST_HEADER if output_first else INPUT_FIRST_HEADER
            blocks = [f"Task: {task.instruction}\n{self._answer(task.instances[0], output_first)}" for task in demos]
            opening = "Class label:" if output_first else "Input:"
            return "\n\n".join([header, *blocks, f"Task: {instruction}\n{opening}"])
        messages = []
        for task in demos:
            messages += [{"role": "user", "content": self._request(task.instruction, output_first)},
                         {"role": "assistant", "content": self._answer(task.instances[0], output_first)}]
        return messages + [{"role": "user", "content": self._request(instruction, output_first)}]

    def instance_stop(self) -> tuple[str, ...]:
        # A blank line ends an example in completion mode (the prompt separates examples with one); a small
        # model otherwise rambles on to max_new_tokens and the instance is lost as truncated.
        return ("\n\n", "\nTask:") if self.mode == "completion" else ()

    def instance_prefix(self, output_first: bool) -> str:
        """What the completion prompt already wrote of the reply (put back before parsing)."""
        if self.mode == "chat":
            return ""
        return "Class label:" if output_first else "Input:"

    @staticmethod
    def _request(instruction: str, output_first: bool) -> str:
        if output_first:
            return (f"Task: {instruction}\n\nThe answer to this task is one of a few class labels. Pick one label, "
                    "then write an input that has that label. Answer exactly in this form:\nClass label: <label>\n"
                    "Input: <input>")
        return (f"Task: {instruction}\n\nGive one example of this task: the input it is applied to (None if it needs "
                "no input) and a correct output. Answer exactly in this form:\nInput: <input>\nOutput: <output>")

    @staticmethod
    def _answer(instance: tuple[str, str], output_first: bool) -> str:
        task_input, output = instance
        if output_first:
            return f"Class label: {output}\nInput: {task_input or NO_INPUT}"
        return f"Input: {task_input or NO_INPUT}\nOutput: {output}"
