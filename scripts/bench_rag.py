"""`rag eval`'s answering path at its defaults against answering one question at a time with plain fp32 `generate`.

Both sides answer the same prompts with the same model, greedily, stopping at the first newline: the prompts of
`rag eval` on the team's RAG set (closed-book, oracle and k documents with the gold passage first and last).
Ours: the model as `rag eval` loads it (`--precision auto`: bf16 weights on a CPU or GPU with native bf16),
prompts sorted by length, left-padded batches (`rag.evaluate.answer_batches`). Baseline: the fp32 model, one
`model.generate` call per prompt, no padding. Prints the wall time of each, the speedup, the fraction of
identical answers (bf16 and padding change float rounding, which can flip a near-tie in greedy decoding) and
both sides' accuracy (best_subspan_em) with the paired difference.

    .venv/bin/python scripts/bench_rag.py                          # default model, 16 questions, k = 5
    .venv/bin/python scripts/bench_rag.py --questions 8 --model tiny-llama --num_documents 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_at_a_time(model, tokenizer, texts, max_new_tokens):
    import torch

    answers = []
    for text in texts:
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, do_sample=False, temperature=None, top_p=None, top_k=None,
                                    max_new_tokens=max_new_tokens, stop_strings=["\n"], tokenizer=tokenizer,
                                    pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(answer.split("\n")[0].strip())
    return answers


def main() -> None:
    import torch

    from align.core.command import configure_logging
    from align.lm.models import load_causal_lm, resolve_model
    from align.lm.precision import choose_precision
    from rag.data import load_corpus, load_records
    from rag.evaluate import (
        EvalArguments,
        PolicySpec,
        answer_batches,
        build_cell_contexts,
        load_model,
        prompt_text,
        render_prompt,
    )
    from rag.metrics import best_subspan_em
    from rag.position import plan_cells, select_questions
    from rag.retrieval import Embedder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--records", default=str(ROOT / "data" / "rag" / "questions.jsonl"))
    parser.add_argument("--corpus", default=str(ROOT / "data" / "rag" / "corpus.jsonl"))
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--num_documents", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--precision", default="auto", help="rag eval's --precision (default auto).")
    args = parser.parse_args()

    configure_logging()
    torch.manual_seed(0)
    settings = EvalArguments(records=args.records, corpus=args.corpus, num_documents=[args.num_documents],
                             gold_positions=["first", "last"])
    records = load_records(args.records, "bench")
    chosen = [records[i] for i in select_questions(len(records), args.questions, 0)]
    cells = plan_cells(settings.arms, settings.num_documents, settings.gold_positions, "bench")
    corpus = load_corpus(args.corpus, records, "bench")
    contexts = build_cell_contexts(settings, chosen, cells, Embedder(), corpus)
    precision = choose_precision(args.precision, "cpu")
    model, tokenizer = load_model(PolicySpec("bench", args.model, []), precision, "cpu")
    plain_model = load_causal_lm(resolve_model(args.model), dtype=torch.float32).eval()
    texts = [render_prompt(tokenizer, "qa", prompt_text("qa", r["question"], contexts[c.key][i]))
             for c in cells for i, r in enumerate(chosen)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    print(f"{len(texts)} prompts ({len(chosen)} questions x {len(cells)} cells: "
          f"{', '.join(c.key for c in cells)}), {min(lengths)}-{max(lengths)} tokens, model {args.model}, "
          f"{torch.get_num_threads()} threads")

    one_at_a_time(plain_model, tokenizer, texts[:1], 4)  # warm-up: first-call allocations are not what we measure
    list(answer_batches(model, tokenizer, texts[:1], 1, 4))
    start = time.perf_counter()
    ours = [None] * len(texts)
    for batch, generations in answer_batches(model, tokenizer, texts, args.batch_size, args.max_new_tokens):
        for i, generation in zip(batch, generations, strict=True):
            ours[i] = generation.text.split("\n")[0].strip()
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    baseline = one_at_a_time(plain_model, tokenizer, texts, args.max_new_tokens)
    single_s = time.perf_counter() - start

    identical = sum(a == b for a, b in zip(ours, baseline, strict=True)) / len(texts)
    answers = [r["answers"] for c in cells for r in chosen]
    correct_ours = [best_subspan_em(a, gold) for a, gold in zip(ours, answers, strict=True)]
    correct_base = [best_subspan_em(a, gold) for a, gold in zip(baseline, answers, strict=True)]
    acc_ours, acc_base = sum(correct_ours) / len(texts), sum(correct_base) / len(texts)
    flips = sum(a != b for a, b in zip(correct_ours, correct_base, strict=True))
    print(f"rag eval's path ({precision.name}, batch {args.batch_size}, sorted by length): {batched_s:.1f} s, "
          f"{len(texts) / batched_s:.2f} answers/s")
    print(f"one at a time (plain fp32 generate): {single_s:.1f} s, {len(texts) / single_s:.2f} answers/s")
    print(f"accuracy (best_subspan_em): ours {acc_ours:.3f}, plain {acc_base:.3f}; {flips} of {len(texts)} answers "
          "change correctness")
    for a, b in zip(ours, baseline, strict=True):
        if a != b:
            print(f"  differs: batched {a!r} vs single {b!r}")
    print(f"RESULT speedup={single_s / batched_s:.2f} identical_frac={identical:.3f} acc_ours={acc_ours:.3f} "
          f"acc_plain={acc_base:.3f} correctness_flips={flips}")


if __name__ == "__main__":
    main()
