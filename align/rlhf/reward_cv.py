"""Cross-validating the reward stage's two kinds of judge: each fold trains a fresh judge, as the stage would,
on the other folds' rankings and scores its own (`align.preferences.cross_validation.cross_validate` runs
the folds, journals them and pools the figures)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset

from align.preferences.cross_validation import (
    conversation_key,
    cross_validate,
    pair_records,
    ranking_report,
    within_prompt_length_correlation,
)
from align.rlhf.embedding_judge import HeadSettings, head_scores, train_head
from align.rlhf.ranking_trainer import RankingCollator, RankingRewardTrainer, score_rows

logger = logging.getLogger("align")
FoldScorer = Callable[[list[int], list[int], int], list[list[float]]]


def lm_fold_scorer(rows: Dataset, make_model: Callable[[], torch.nn.Module], training_args, tokenizer,
                   collator: RankingCollator, work_dir: Path, **trainer_options) -> FoldScorer:
    """Folds of the LM reward model: `make_model()` builds a fresh (seeded) model with its LoRA; it trains with
    the stage's own settings, without checkpoints (a fold is the unit a killed run resumes from), and scores
    the held-out rows. `rows` are tokenized comparisons."""

    def fit_and_score(train: list[int], held_out: list[int], fold: int) -> list[list[float]]:
        fold_dir = work_dir / f"fold-{fold}"
        args = dataclasses.replace(training_args, output_dir=str(fold_dir), save_strategy="no", eval_strategy="no",
                                   report_to="none", push_to_hub=False)
        trainer = RankingRewardTrainer(model=make_model(), args=args, train_dataset=rows.select(train),
                                       processing_class=tokenizer, rank_collator=collator, **trainer_options)
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        scores = score_rows(model, rows.select(held_out), collator, args.per_device_eval_batch_size,
                            desc=f"fold {fold + 1}: scoring {len(held_out)} held-out prompts")
        shutil.rmtree(fold_dir, ignore_errors=True)
        return scores

    return fit_and_score


def embedding_fold_scorer(prompt_emb: torch.Tensor, response_emb: torch.Tensor, ranks: list[list[int]],
                          settings: HeadSettings) -> FoldScorer:
    """Folds of the embedding judge: the embeddings are computed once for every row; each fold fits a head."""
    starts, offset = [], 0
    for row_ranks in ranks:
        starts.append(offset)
        offset += len(row_ranks)

    def take(rows: list[int]):
        flat = [k for i in rows for k in range(starts[i], starts[i] + len(ranks[i]))]
        return prompt_emb[flat], response_emb[flat], [ranks[i] for i in rows]

    def fit_and_score(train: list[int], held_out: list[int], fold: int) -> list[list[float]]:
        head, _ = train_head(*take(train), settings)
        return head_scores(head, *take(held_out))

    return fit_and_score


def cross_validated_report(rows: Dataset, folds: list[int], scorer: FoldScorer, journal: Path, seed: int) -> dict:
    """Run (or resume) the folds of `rows` (comparisons) and pool their figures (`ranking_report`), with the
    number of folds and the within-prompt correlation of score and length."""
    count = max(folds) + 1

    def describe(fold: int, train: int, held_out: int) -> None:
        logger.info("cross-validation fold %d/%d: training on %d prompts, holding out %d", fold + 1, count, train,
                    held_out)

    scores, seconds = cross_validate(folds, scorer, journal, describe)
    keys = [conversation_key(p) for p in rows["prompt"]]
    report = ranking_report(pair_records(scores, rows["ranks"], rows["responses"], keys, folds), seed=seed)
    report["folds"] = count
    report["fold_seconds"] = [round(s, 1) for s in seconds]
    report["length_correlation"] = within_prompt_length_correlation(scores, rows["responses"])
    shown = {k: "n/a" if report[k] is None else f"{report[k]:.3f}"
             for k in ("accuracy", "accuracy_low", "accuracy_high", "longer_is_better_accuracy")}
    logger.info("cross-validated pairwise accuracy %s [%s, %s] on %d pairs from %d conversations (%d folds); the "
                "longer response wins %s of them", shown["accuracy"], shown["accuracy_low"], shown["accuracy_high"],
                report["pairs"], report["conversations"], count, shown["longer_is_better_accuracy"])
    return report
