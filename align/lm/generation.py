"""Batched text generation and option scoring with any local causal LM: the one place stages generate.

Generation stages (self-instruct, comparisons) call `generate` with already-rendered prompt texts, so
a faster backend (vLLM on a GPU) can replace Hugging Face `generate` here without touching them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Generation(NamedTuple):
    text: str
    truncated: bool  # hit max_new_tokens before an end-of-sequence token or a stop string


@dataclass
class GenerationSettings:
    temperature: float = 1.0  # 0 = greedy decoding
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()  # generation of a sequence ends at the first of these; the text is cut before it
    top_k: int | None = None  # None: the model's generation config (often 50); 0: no top-k cut (the model's own
    # distribution, as KL estimates need)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """A chat prompt as text, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """A chat prompt (messages) through the chat template, ready for the reply; a text prompt as it is."""
    return prompt if isinstance(prompt, str) else render_chat(tokenizer, prompt)


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a generated sequence: the generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}


def generate(model, tokenizer, texts: Sequence[str], settings: GenerationSettings,
             num_return_sequences: int = 1) -> list[list[Generation]]:
    """Continue each text, `num_return_sequences` times, in one left-padded batch.

    Args:
        model: A causal LM in eval mode, on its device.
        tokenizer: Its tokenizer; a pad token is required (the model aliases set one).
        texts: Prompts as text (special tokens included, e.g. from `render_chat`).
        settings: Sampling (temperature 0 = greedy, then num_return_sequences must be 1), length, stop strings.
        num_return_sequences: Continuations per text.

    Returns:
        One list of `Generation` per text: the continuation decoded without special tokens, cut before the
        first stop string, stripped of surrounding whitespace, and whether it ran out of tokens.
        Seed torch (`transformers.set_seed`) before calling for reproducible samples.
    """
    import torch

    if settings.temperature <= 0 and num_return_sequences > 1:
        raise ValueError("greedy decoding (temperature 0) gives one continuation per prompt")
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow each prompt directly
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
        if settings.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if settings.temperature > 0 and settings.top_k is not None:
        sampling["top_k"] = settings.top_k
    stops = {"stop_strings": list(settings.stop), "tokenizer": tokenizer} if settings.stop else {}
    with torch.no_grad():
        output = model.generate(**batch, **sampling, **stops, max_new_tokens=settings.max_new_tokens,
                                num_return_sequences=num_return_sequences, pad_token_id=tokenizer.pad_token_id)
        # [len(texts) * K, prompt_len + new_len], the K samples of a text adjacent
    end_ids = eos_ids(model, tokenizer)
    results: list[Generation] = []
    for ids in output[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i for i, token in enumerate(ids) if token in end_ids), None)
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        cut = min((i for i in (text.find(stop) for stop in settings.stop) if i >= 0), default=None)
        if cut is not None:
            text = text[:cut]
        ran_out = end is None and cut is None and len(ids) >= settings.max_new_tokens
        results.append(Generation(text.strip(), truncated=ran_out))
    return [results[i:i + num_return_sequences] for i in range(0, len(results), num_return_sequences)]


def score_options(model, tokenizer, texts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
    """Log-likelihood of each option as the continuation of each text: one forward pass per text batch.

    Used to make the model choose (e.g. "Yes" / "No") without sampling: deterministic and never unparseable.

    Args:
        model: A causal LM in eval mode, on its device.
        tokenizer: Its tokenizer.
        texts: Prompts as text.
        options: Continuations to compare (each tokenized after the prompt; at least one token each).

    Returns:
        [len(texts)][len(options)] sums of the option tokens' log-probabilities.
    """
    import torch

    tokenizer.padding_side = "left"
    option_ids = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in options]
    if not all(option_ids):
        raise ValueError(f"every option must be at least one token, got {list(options)!r}")
    prompt_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if all(len(ids) == 1 for ids in option_ids):  # one forward pass per text gives every option's probability
        input_ids, attention = _left_padded(prompt_ids, tokenizer.pad_token_id, model.device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=1).logits[:, -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)[:, [ids[0] for ids in option_ids]]  # [texts, options]
        return log_probs.tolist()
    sequences = [prompt + ids for prompt in prompt_ids for ids in option_ids]  # text-major
    input_ids, attention = _left_padded(sequences, tokenizer.pad_token_id, model.device)
    # Only the last `keep` positions predict option tokens: the LM head and softmax run there alone.
    keep = max(map(len, option_ids)) + 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep).logits  # [n, keep, vocab]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # column c predicts the token after it
    scores = []
    for row in range(len(sequences)):
        ids = option_ids[row % len(options)]
        columns = torch.arange(keep - 1 - len(ids), keep - 1, device=model.device)  # the option's predictors
        scores.append(float(log_probs[row, columns, torch.tensor(ids, device=model.device)].sum()))
    return [scores[i:i + len(options)] for i in range(0, len(scores), len(options))]


def _left_padded(sequences: list[list[int]], pad: int, device):
    """(input_ids, attention_mask) tensors of token lists padded on the left to one width."""
    import torch

    width = max(map(len, sequences))
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=device)
    attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return input_ids, attention


def response_logprobs(model, tokenizer, texts: Sequence[str], responses: Sequence[str], ended: Sequence[bool],
                      batch_size: int = 8) -> list[float]:
    """log p(response | text) under `model`: the sum over the response's tokens (re-tokenized from its text, with
    the end-of-sequence token when `ended`), in fp32.

    Sequences are left-padded with position ids counted from each sequence's first real token, as `generate`
    counts them, and only the response positions go through the output layer (`logits_to_keep`).
    """
    import torch

    end = model.generation_config.eos_token_id
    end = (end[0] if isinstance(end, list) else end) if end is not None else tokenizer.eos_token_id
    prompt_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    response_ids = [ids + ([end] if stop and end is not None else []) for ids, stop in
                    zip(tokenizer(list(responses), add_special_tokens=False)["input_ids"], ended, strict=True)]
    totals: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, answers = prompt_ids[start:start + batch_size], response_ids[start:start + batch_size]
        input_ids, attention = _left_padded([p + a for p, a in zip(prompts, answers, strict=True)],
                                            tokenizer.pad_token_id, model.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        keep = max(map(len, answers)) + 1
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=keep).logits[:, :-1].float()  # column c predicts the token after it
        log_probs = torch.log_softmax(logits, dim=-1)
        for row, ids in enumerate(answers):
            if not ids:
                totals.append(0.0)
                continue
            columns = torch.arange(keep - 1 - len(ids), keep - 1, device=model.device)
            totals.append(float(log_probs[row, columns, torch.tensor(ids, device=model.device)].sum()))
    return totals
