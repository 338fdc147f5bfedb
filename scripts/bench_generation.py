"""Benchmark: the generation path stages use now (`align.lm.generation.generate` on a model loaded with
`load_for_inference` at `--precision auto`) against the path before it (Hugging Face `generate` on the fp32
model), side by side on the same prompts: the team's demonstrations' questions through the chat template.

- **Batch 1**: each prompt sampled alone (temperature 1, top-p 0.95, seeded); generated tokens per second.
- **Batch 8**: the prompts sampled in batches of 8; completions per second.
- **Greedy agreement**: the share of prompts whose greedy answer is identical on both paths (bf16 rounding can
  flip a near-tie between two tokens, after which the texts part), and the mean number of leading tokens the
  two answers share.

    .venv/bin/python scripts/bench_generation.py                 # ~6 min on 2 CPU cores
    .venv/bin/python scripts/bench_generation.py --alternatives  # + the paths not chosen, ~6 min more
    .venv/bin/python scripts/bench_generation.py --prompts 8 --max_new_tokens 32 --model tiny-llama

`--alternatives` also measures what was tried and not made the default: int8 weights with int8 activations
(`torch.ao` dynamic quantization, fbgemm) on both batch sizes with its greedy agreement, and the bf16 model
compiled (`torch.compile`) with a static KV cache on one prompt repeated (the best case: every new prompt length
compiles again).

Last line: `RESULT speedup_b1=<tokens/s ratio> speedup_b8=<completions/s ratio> greedy_agreement=<share>`;
the numbers also go to runs/bench/generation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sample_all(model, tokenizer, texts, batch_size, settings, seed, plain: bool):
    """(completions, wall seconds): each batch seeded by its position, so both paths sample the same way."""
    import torch
    from transformers import set_seed

    from align.lm.generation import generate

    completions = []
    start = time.perf_counter()
    for first in range(0, len(texts), batch_size):
        chunk = texts[first:first + batch_size]
        set_seed(seed + first)
        if plain:  # the path before: one HF generate call on the fp32 model
            tokenizer.padding_side = "left"
            batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
                        if settings.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                                          "top_k": None})
            with torch.no_grad():
                output = model.generate(**batch, **sampling, max_new_tokens=settings.max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id)
            completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        else:
            completions += [group[0].text for group in generate(model, tokenizer, chunk, settings)]
    return [c.strip() for c in completions], time.perf_counter() - start


def token_count(tokenizer, texts) -> int:
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def shared_prefix(tokenizer, a: str, b: str) -> int:
    left, right = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
    return next((i for i, (x, y) in enumerate(zip(left, right, strict=False)) if x != y), min(len(left), len(right)))


def alternatives(before, now, tokenizer, texts, sampling, greedy, plain_answers, report, args) -> dict:
    """The paths measured and not chosen, against the same fp32 baseline figures."""
    import warnings

    import torch

    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        int8 = torch.ao.quantization.quantize_dynamic(before, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    for batch_size in (1, 8):
        completions, seconds = sample_all(int8, tokenizer, texts, batch_size, sampling, args.seed, False)
        tokens = token_count(tokenizer, completions)
        results[f"int8_b{batch_size}"] = {"tokens_per_s": tokens / seconds, "completions_per_s": len(texts) / seconds}
    answers, _ = sample_all(int8, tokenizer, texts, 8, greedy, args.seed, False)
    results["int8_greedy_agreement"] = sum(a == b for a, b in zip(plain_answers, answers, strict=True)) / len(texts)
    results["int8_speedup_b1"] = results["int8_b1"]["tokens_per_s"] / report["b1_before"]["tokens_per_s"]
    results["int8_speedup_b8"] = results["int8_b8"]["completions_per_s"] / report["b8_before"]["completions_per_s"]
    print(f"  int8 dynamic quantization: batch 1 {results['int8_speedup_b1']:.2f}x tokens/s, batch 8 "
          f"{results['int8_speedup_b8']:.2f}x completions/s, greedy agreement {results['int8_greedy_agreement']:.0%}",
          flush=True)

    batch = tokenizer(texts[:1], return_tensors="pt", add_special_tokens=False)
    forced = {"do_sample": False, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id, "temperature": None, "top_p": None, "top_k": None}

    def per_token(model, **extra) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, **forced, **extra)
        return (time.perf_counter() - start) / args.max_new_tokens

    eager = per_token(now)
    eager_fp32 = per_token(before)
    start = time.perf_counter()
    now.forward = torch.compile(now.forward, dynamic=False)
    per_token(now, cache_implementation="static")
    compile_s = time.perf_counter() - start
    compiled = per_token(now, cache_implementation="static")
    results.update(compile_seconds=compile_s, ms_per_token_fp32=eager_fp32 * 1000, ms_per_token_eager=eager * 1000,
                   ms_per_token_compiled=compiled * 1000)
    print(f"  one prompt, {args.max_new_tokens} tokens: fp32 {eager_fp32 * 1000:.1f} ms/token, bf16 eager "
          f"{eager * 1000:.1f}, bf16 compiled + static cache {compiled * 1000:.1f} (compiling took {compile_s:.0f} s)",
          flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="Prompts of each measurement (default 16).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--precision", default="auto", help="The new path's --precision (default auto).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alternatives", action="store_true", help="Also measure int8 and torch.compile.")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "generation.json"))
    args = parser.parse_args()

    import torch

    from align.core.command import configure_logging
    from align.lm.generation import GenerationSettings, render_chat
    from align.lm.models import load_causal_lm, load_for_inference, load_tokenizer, resolve_model
    from align.lm.precision import choose_precision

    configure_logging()
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    rows = [json.loads(line) for line in (REPO / "data" / "seed" / "demonstrations.jsonl").read_text().splitlines()]
    texts = [render_chat(tokenizer, row["messages"][:1]) for row in rows[:args.prompts]]
    precision = choose_precision(args.precision, "cpu")
    before = load_causal_lm(path, dtype=torch.float32).eval()
    now = load_for_inference(path, precision)
    print(f"model {args.model}; {len(texts)} prompts; new path: {precision.describe()}; "
          f"{torch.get_num_threads()} threads", flush=True)
    sampling = GenerationSettings(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens)
    greedy = GenerationSettings(temperature=0.0, max_new_tokens=args.max_new_tokens)
    sample_all(before, tokenizer, texts[:1], 1, GenerationSettings(max_new_tokens=4), 0, True)  # warm-up
    sample_all(now, tokenizer, texts[:1], 1, GenerationSettings(max_new_tokens=4), 0, False)

    report: dict = {"model": args.model, "prompts": len(texts), "max_new_tokens": args.max_new_tokens,
                    "precision": precision.name, "threads": torch.get_num_threads()}
    for batch_size in (1, 8):
        for name, model, plain in (("before", before, True), ("now", now, False)):
            completions, seconds = sample_all(model, tokenizer, texts, batch_size, sampling, args.seed, plain)
            tokens = token_count(tokenizer, completions)
            report[f"b{batch_size}_{name}"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                                               "completions_per_s": len(completions) / seconds}
            print(f"  batch {batch_size}, {name:6s}: {seconds:6.1f} s, {tokens / seconds:6.1f} tokens/s, "
                  f"{len(completions) / seconds:.2f} completions/s", flush=True)
    plain_answers, _ = sample_all(before, tokenizer, texts, 8, greedy, args.seed, True)
    new_answers, _ = sample_all(now, tokenizer, texts, 8, greedy, args.seed, False)
    identical = sum(a == b for a, b in zip(plain_answers, new_answers, strict=True)) / len(texts)
    prefix = sum(shared_prefix(tokenizer, a, b) for a, b in zip(plain_answers, new_answers, strict=True)) / len(texts)
    report.update(greedy_agreement=identical, greedy_shared_prefix_tokens=prefix)
    speedup_b1 = report["b1_now"]["tokens_per_s"] / report["b1_before"]["tokens_per_s"]
    speedup_b8 = report["b8_now"]["completions_per_s"] / report["b8_before"]["completions_per_s"]
    report.update(speedup_b1=speedup_b1, speedup_b8=speedup_b8)
    print(f"  greedy: {identical:.0%} of answers identical; on average the first {prefix:.1f} tokens agree")
    if args.alternatives:
        report["alternatives"] = alternatives(before, now, tokenizer, texts, sampling, greedy, plain_answers, report,
                                              args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"RESULT speedup_b1={speedup_b1:.2f} speedup_b8={speedup_b8:.2f} greedy_agreement={identical:.3f} "
          f"greedy_shared_prefix_tokens={prefix:.1f}")


if __name__ == "__main__":
    main()
