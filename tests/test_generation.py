"""Batched generation and option scoring: left padding changes nothing, stop strings cut, scores are exact."""

from __future__ import annotations

import pytest
import torch

from align.lm.generation import GenerationSettings, generate, render_chat, score_options

PROMPTS = ["Hi", "A much longer prompt that needs plenty of left padding in a batch"]


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from align.lm.models import load_causal_lm, load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_causal_lm(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    torch.set_num_threads(threads)


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(temperature=0, max_new_tokens=12)
    batched = generate(model, tokenizer, PROMPTS, settings)
    alone = [generate(model, tokenizer, [prompt], settings)[0] for prompt in PROMPTS]
    assert batched == alone
    assert all(len(group) == 1 and group[0].truncated for group in batched)  # random weights never say EOS


def test_stop_strings_cut_before_the_stop(tiny):
    from transformers import set_seed

    model, tokenizer = tiny
    settings = GenerationSettings(temperature=1.0, max_new_tokens=24)
    set_seed(0)
    text = generate(model, tokenizer, ["Hello there."], settings)[0][0].text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].isalnum())
    set_seed(0)  # the same samples, now ending at the stop string
    stopped = generate(model, tokenizer, ["Hello there."],
                       GenerationSettings(temperature=1.0, max_new_tokens=24, stop=(stop,)))[0][0]
    assert stopped.text == text[:text.find(stop)].strip() and not stopped.truncated


def test_sampling_returns_k_per_prompt_and_is_seeded(tiny):
    from transformers import set_seed

    model, tokenizer = tiny
    settings = GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=8)
    set_seed(3)
    first = generate(model, tokenizer, PROMPTS, settings, num_return_sequences=3)
    set_seed(3)
    again = generate(model, tokenizer, PROMPTS, settings, num_return_sequences=3)
    assert [len(group) for group in first] == [3, 3] and first == again
    with pytest.raises(ValueError, match="greedy"):
        generate(model, tokenizer, PROMPTS, GenerationSettings(temperature=0), num_return_sequences=2)


def test_score_options_equal_unpadded_log_likelihoods(tiny):
    model, tokenizer = tiny
    texts = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    options = ["Yes", "No thanks"]  # several tokens each (byte-level tokenizer): one sequence per option
    check_scores(model, tokenizer, texts, options)
    check_scores(model, tokenizer, texts, ["Y", "N"])  # one token each: one forward pass per text


def check_scores(model, tokenizer, texts, options):
    scores = score_options(model, tokenizer, texts, options)
    for text, row in zip(texts, scores, strict=True):
        for option, score in zip(options, row, strict=True):
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + option_ids])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            expected = sum(float(log_probs[len(prompt_ids) - 1 + i, token]) for i, token in enumerate(option_ids))
            assert score == pytest.approx(expected, abs=1e-4)
