"""A reward model: how it reads a response, how it is built and loaded, and how it scores.

Shared by everything that trains or uses one — the reward stage, PPO (the scorer, and the value model's
starting point) and the alignment report. A reward model is a one-output sequence classifier on the
base model (with the SFT adapter merged in, as InstructGPT initialised it), a LoRA and a trained score
head; its score for a response is the head's output at the last token of prompt + response in the
model's chat format."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from align.core.command import StageError
from align.core.outputs import read_manifest
from align.lm.models import load_causal_lm, load_tokenizer, merge_adapter, resolve_model
from align.lm.precision import compute_in_fp32


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] scalar rewards: transformers pools the score head at each sequence's rightmost non-pad token
    (with ChatML that is the newline after the reply's <|im_end|>, which sees the whole reply)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [N, 1], pooled by the head
    return logits.squeeze(-1)


def encode_response(tokenizer, prompt, response: str, max_length: int | None) -> tuple[list[int], str | None]:
    """Token ids of prompt + response in the model's chat format, at most `max_length` long (None: no limit).

    Too long: the prompt loses tokens from its left and the response is kept whole. A response too long
    to fit beside the last quarter of the limit's worth of prompt keeps its beginning, so the model still
    sees the end of the question. Returns (ids, "prompt" | "response" | None), the second saying what was cut.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):  # a template that rewrites earlier turns: split by length
            prompt_text = full_text[: max(0, len(full_text) - len(response))]
        response_text = full_text[len(prompt_text):]
    else:
        prompt_text = "\n".join(m["content"] for m in messages) + "\n"
        response_text = response + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if max_length is None or len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids + response_ids, None
    prompt_share = min(len(prompt_ids), max_length // 4)
    if len(response_ids) > max_length - prompt_share:
        kept_prompt = prompt_ids[len(prompt_ids) - prompt_share:] if prompt_share else []
        return kept_prompt + response_ids[: max_length - prompt_share], "response"
    room = max_length - len(response_ids)
    if len(prompt_ids) > room:
        return prompt_ids[len(prompt_ids) - room:] + response_ids, "prompt"
    return prompt_ids + response_ids, None


def build_reward_model(model_path: str, tokenizer, sft_adapter: str | None, dtype=None, stage: str = "reward"):
    """A one-output sequence-classification model on the base (with the SFT adapter merged in, if given)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype=dtype or "auto", trust_remote_code=False, use_safetensors=True,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if sft_adapter:
        merged = merge_adapter(load_causal_lm(model_path, dtype=dtype, stage=stage), sft_adapter, stage=stage)
        backbone = getattr(model, model.base_model_prefix)
        backbone.load_state_dict(getattr(merged, merged.base_model_prefix).state_dict())
    return model


def load_reward_model(output_dir: str | Path, dtype=None, stage: str = "reward"):
    """Load a finished reward stage output (base [+ SFT adapter] + reward adapter + score head), frozen.

    Returns (model, tokenizer, manifest); the manifest's metrics hold reward_mean/reward_std. `stage` names
    the command asking, in errors.
    """
    output_dir = Path(output_dir)
    manifest = read_manifest(output_dir)
    if manifest.get("stage") != "reward":
        raise StageError(stage, f"{output_dir} is a '{manifest.get('stage')}' output, not a reward model")
    if manifest.get("config", {}).get("model", {}).get("backbone", "lm") != "lm":
        raise StageError(stage, f"{output_dir} is an embedding judge, not a language-model reward model — load it "
                         "with align.rlhf.embedding_judge.EmbeddingJudge")
    model_config = manifest["config"]["model"]
    model_path = resolve_model(model_config["model_name_or_path"], stage)
    tokenizer = load_tokenizer(str(output_dir / "adapter"), stage)
    model = build_reward_model(model_path, tokenizer, model_config.get("sft_adapter"), dtype=dtype, stage=stage)
    model = PeftModel.from_pretrained(model, str(output_dir / "adapter")).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer, manifest


def prepare_for_scoring(model, precision, device):
    """A loaded reward model ready to score at `precision` (an `align.lm.precision.Precision`): its frozen weights
    cast once to the precision's dtype, its score head kept in fp32 (so scores are not rounded to bf16's three
    digits), on `device`."""
    model = model.to(device=device, dtype=precision.dtype)
    score = model.get_base_model().score if isinstance(model, PeftModel) else model.score
    compute_in_fp32(score.float())
    return model


class RewardModelScorer:
    """A reward-stage model as a `RewardFunction`: scores normalised with the training rewards' mean and std."""

    def __init__(self, model, tokenizer, mean: float, std: float, max_length: int | None, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.mean, self.std = mean, std if std > 0 else 1.0
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        ids = [encode_response(self.tokenizer, p, r, self.max_length)[0] for p, r in zip(prompts, responses,
                                                                                          strict=True)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            width = max(map(len, chunk))
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
            attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
            scores.append(sequence_rewards(self.model, input_ids, attention).float().cpu())
        return (torch.cat(scores) - self.mean) / self.std
