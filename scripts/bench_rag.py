"""Batched RAG answering (what `rag eval` does) against answering one question at a time with plain `generate`.

Both sides answer the same prompts with the same model, greedily, stopping at the first newline: the prompts of
`rag eval` on the team's RAG set (closed-book, oracle and k documents with the gold passage first and last).
Ours: prompts sorted by length, left-padded batches (`rag.evaluate.answer_batches`). Baseline: one
`model.generate` call per prompt, no padding. Prints the wall time of each, the speedup and the fraction of
identical answers (padding changes float rounding, which can flip a near-tie in greedy decoding).

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
    from rag.data import load_corpus, load_records
    from rag.evaluate import (
        EvalArguments,
        ModelSpec,
        answer_batches,
        build_cell_contexts,
        load_model,
        prompt_text,
        render_prompt,
    )
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
    model, tokenizer = load_model(ModelSpec("bench", args.model, []), "auto", "cpu")
    texts = [render_prompt(tokenizer, "qa", prompt_text("qa", r["question"], contexts[c.key][i]))
             for c in cells for i, r in enumerate(chosen)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    print(f"{len(texts)} prompts ({len(chosen)} questions x {len(cells)} cells: "
          f"{', '.join(c.key for c in cells)}), {min(lengths)}-{max(lengths)} tokens, model {args.model}, "
          f"{torch.get_num_threads()} threads")

    one_at_a_time(model, tokenizer, texts[:1], 4)  # warm-up: first-call allocations are not what we measure
    start = time.perf_counter()
    ours = [None] * len(texts)
    for batch, generations in answer_batches(model, tokenizer, texts, args.batch_size, args.max_new_tokens):
        for i, generation in zip(batch, generations, strict=True):
            ours[i] = generation.text.split("\n")[0].strip()
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    baseline = one_at_a_time(model, tokenizer, texts, args.max_new_tokens)
    single_s = time.perf_counter() - start

    identical = sum(a == b for a, b in zip(ours, baseline, strict=True)) / len(texts)
    print(f"batched (batch {args.batch_size}, sorted by length): {batched_s:.1f} s, "
          f"{len(texts) / batched_s:.2f} answers/s")
    print(f"one at a time (plain generate):   {single_s:.1f} s, {len(texts) / single_s:.2f} answers/s")
    for a, b in zip(ours, baseline, strict=True):
        if a != b:
            print(f"  differs: batched {a!r} vs single {b!r}")
    print(f"RESULT speedup={single_s / batched_s:.2f} identical_frac={identical:.3f}")


if __name__ == "__main__":
    main()
