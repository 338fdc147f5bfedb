"""Benchmark: does the embedding judge generalise better as an ensemble, or with a length-debiasing term?

The embedding judge (`align reward --backbone embedding`, `configs/reward_embedding.yaml`) is trained on the
OASST K-wise rankings and cross-validated over folds grouped by conversation, as `align reward --cv_folds`
does. This script compares, on the same folds and the same embeddings, in one run:

- `today`: the shipped head (one head, the K-wise loss);
- `ensemble`: the mean of `--members` heads trained from different seeds (Coste et al. 2023 use reward-model
  ensembles against over-optimisation; here the question is only whether the mean ranks better);
- `length_term`: a learned weight on log(1 + words) added to the score during training only and dropped when
  scoring (a product-of-experts debiasing: the length weight absorbs the part of the preference that length
  explains, so the head is left to learn the rest);
- `decorrelated`: the K-wise loss plus `--decorrelation` times the squared within-ranking correlation of the
  score with log length (ODIN-style disentangling, Chen et al. 2024, reduced to one head).

For each: the pooled cross-validated pairwise accuracy with its 95% interval (bootstrap over conversations),
the accuracy on pairs whose lengths differ by less than 10% (where length cannot help), and the within-prompt
correlation of the score with log length. "The longer reply wins" is printed for the same pairs.

    .venv/bin/python scripts/bench_judge_variants.py            # about 3 minutes on 2 CPU cores

The last line printed is `RESULT today=... ensemble=... length_term=... decorrelated=... longer_wins=...
today_close=... ensemble_close=... length_term_close=... decorrelated_close=...` (accuracies; `_close`: pairs
within 10% in length); everything also goes to runs/bench/judge_variants.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_reward_quality import OASST_TREES, run  # noqa: E402 - the same data and child-process runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--members", type=int, default=5, help="heads in the ensemble")
    parser.add_argument("--decorrelation", type=float, default=1.0, help="weight of the squared length correlation")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "judge_variants"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "judge_variants.json"))
    args = parser.parse_args()
    if not OASST_TREES.exists():
        raise SystemExit(f"{OASST_TREES} is missing (../shared/data)")

    import torch
    from datasets import concatenate_datasets, load_from_disk

    from align.lm.models import resolve_embedding_model
    from align.preferences.cross_validation import (
        conversation_key,
        grouped_folds,
        pair_records,
        ranking_report,
        within_prompt_length_correlation,
    )
    from align.rlhf.embedding_judge import Embedder, HeadSettings, JudgeHead, flatten_rankings
    from align.rlhf.ranking_loss import kwise_loss

    torch.set_num_threads(1)  # a 16-unit head: too small an op to split across threads
    started = time.perf_counter()
    comparisons = Path(args.work) / "comparisons"
    if not (comparisons / "manifest.json").exists():
        comparisons.parent.mkdir(parents=True, exist_ok=True)
        run(["comparisons", "--config", "configs/comparisons.yaml", "--input_path", str(OASST_TREES), "--output_dir",
             str(comparisons)], comparisons.parent / "comparisons.log")
    data = load_from_disk(str(comparisons / "dataset"))
    rows = concatenate_datasets([data[split] for split in data])
    ranks, responses = rows["ranks"], rows["responses"]
    prompt_emb, response_emb = Embedder(resolve_embedding_model("all-minilm-l6-v2")).rows(rows["prompt"], responses)
    log_words = torch.tensor([math.log1p(len(r.split())) for row in responses for r in row])
    keys = [conversation_key(p) for p in rows["prompt"]]
    folds = grouped_folds(keys, args.folds, args.seed)
    starts = [sum(len(r) for r in ranks[:i]) for i in range(len(ranks))]
    settings = HeadSettings()  # the shipped configs/reward_embedding.yaml settings

    def flat(indices):
        return [k for i in indices for k in range(starts[i], starts[i] + len(ranks[i]))]

    def length_correlation(scores, lengths, row_ranks):
        centred_scores, centred_lengths, offset = [], [], 0
        for ranking in row_ranks:
            part = slice(offset, offset + len(ranking))
            offset += len(ranking)
            centred_scores.append(scores[part] - scores[part].mean())
            centred_lengths.append(lengths[part] - lengths[part].mean())
        s, n = torch.cat(centred_scores), torch.cat(centred_lengths)
        return (s * n).sum() / (s.norm() * n.norm() + 1e-8)

    def train(indices, variant: str, seed: int) -> JudgeHead:
        torch.manual_seed(seed)
        head = JudgeHead(response_emb.shape[-1], settings.hidden_size, settings.dropout)
        weight = torch.zeros(1, requires_grad=True)
        row_ranks, items = [ranks[i] for i in indices], flat(indices)
        better, worse, pair_row, _ = flatten_rankings(row_ranks)
        params = [*head.parameters(), *([weight] if variant == "length_term" else [])]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        head.train()
        for _ in range(settings.epochs):
            optimizer.zero_grad()
            scores = head(prompt_emb[items], response_emb[items])
            trained = scores + weight * log_words[items] if variant == "length_term" else scores
            loss = kwise_loss(trained, better, worse, pair_row, len(row_ranks))
            if variant == "decorrelated":
                loss = loss + args.decorrelation * length_correlation(scores, log_words[items], row_ranks) ** 2
            loss.backward()
            optimizer.step()
        return head.eval()

    results = {}
    for variant in ("today", "ensemble", "length_term", "decorrelated"):
        members = args.members if variant == "ensemble" else 1
        scores: list = [None] * len(ranks)
        for fold in range(args.folds):
            train_rows = [i for i, f in enumerate(folds) if f != fold]
            held_out = [i for i, f in enumerate(folds) if f == fold]
            heads = [train(train_rows, variant, args.seed + m) for m in range(members)]
            with torch.no_grad():
                items = flat(held_out)
                mean = torch.stack([h(prompt_emb[items], response_emb[items]) for h in heads]).mean(0).tolist()
            for i in held_out:
                scores[i], mean = mean[:len(ranks[i])], mean[len(ranks[i]):]
        report = ranking_report(pair_records(scores, ranks, responses, keys, folds), seed=args.seed)
        report["length_correlation"] = within_prompt_length_correlation(scores, responses)
        results[variant] = report
        print(f"{variant:>13}: {report['accuracy']:.3f} [{report['accuracy_low']:.3f}, {report['accuracy_high']:.3f}]"
              f"  pairs within 10% in length {report['accuracy_by_length_gap']['<10%']:.3f}"
              f" ({report['pairs_by_length_gap']['<10%']})  correlation with log length "
              f"{report['length_correlation']:.2f}", flush=True)
    longer = results["today"]["longer_is_better_accuracy"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results,
                                          "minutes": round((time.perf_counter() - started) / 60, 1)}, indent=2))
    print("RESULT " + " ".join(f"{v}={r['accuracy']:.3f}" for v, r in results.items()) + f" longer_wins={longer:.3f} "
          + " ".join(f"{v}_close={r['accuracy_by_length_gap']['<10%']:.3f}" for v, r in results.items()))


if __name__ == "__main__":
    main()
