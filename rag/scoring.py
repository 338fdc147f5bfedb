"""Scoring answers and writing the results of `rag eval` — shared by `rag eval` and `rag rescore`, which re-scores
a finished evaluation's answers with the current metrics without generating again."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from align.core.command import StageError
from align.core.outputs import save_dataset_atomic, write_json_atomic
from align.lm.generation import render_chat
from align.lm.models import load_tokenizer, resolve_model
from rag import report
from rag.hallucination import GroundingChecker, LMVerifier
from rag.metrics import best_subspan_em, exact_match
from rag.similarity import Calibrator, alias_similarity, fit_calibration, pairs_from_records


def render_prompt(tokenizer, benchmark: str, text: str) -> str:
    """As a chat turn when the tokenizer has a chat template; otherwise plain text ending where the answer goes."""
    if tokenizer.chat_template:
        return render_chat(tokenizer, [{"role": "user", "content": text}])
    return f"{text}\n{'Value' if benchmark == 'kv' else 'Answer'}:"


def make_checker(args, embedder, device: str, precision, stage: str) -> GroundingChecker:
    """The grounding checker the options ask for (`grounding`, `grounding_threshold`, `nli_model`,
    `grounding_verifier`)."""
    verifier = None
    if getattr(args, "grounding_verifier", None):
        from align.lm.policies import load_policy

        path = resolve_model(args.grounding_verifier, stage)
        verifier = LMVerifier(load_policy(path, [], precision, device, stage), load_tokenizer(path, stage))
    try:
        return GroundingChecker(embedder, args.grounding_threshold, args.nli_model, verifier=verifier,
                                structural=getattr(args, "grounding", "claims") == "claims")
    except (OSError, ValueError) as exc:
        raise StageError(stage, f"cannot use {args.nli_model} as an NLI model: {str(exc).splitlines()[0]}") from None


def calibration_for(args, records: list[dict], embedder, stage: str = "rag eval"):
    """The configured calibration, or one fitted on pairs built from the benchmark's records."""
    if args.calibration:
        return Calibrator.load(args.calibration, stage), {"source": args.calibration}
    if args.benchmark == "kv":  # identifiers: the same or not, nothing in between
        return Calibrator("isotonic", {"x": [0.0, 0.999, 1.0], "y": [0.0, 0.0, 1.0]}), {"source": "exact identity"}
    pairs = pairs_from_records(records[:500], args.seed)
    calibrator, metrics, _ = fit_calibration(pairs, embedder, "isotonic", 0.3, args.seed, stage)
    return calibrator, {"source": f"fitted on {len(pairs)} pairs built from {args.records}", **metrics}


def add_prompt_tokens(rows: list[dict], specs, benchmark: str, stage: str) -> dict[str, int | None]:
    """Each row's prompt length in its model's tokens (`prompt_tokens`); returns each model's context window."""
    from transformers import AutoConfig

    windows = {}
    for spec in specs:
        path = resolve_model(spec.model, stage)
        tokenizer = load_tokenizer(path, stage)
        mine = [r for r in rows if r["model"] == spec.name]
        texts = [render_prompt(tokenizer, benchmark, r["prompt"]) for r in mine]
        for row, ids in zip(mine, tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [],
                            strict=True):
            row["prompt_tokens"] = len(ids)
        try:
            windows[spec.name] = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        except (OSError, ValueError):
            windows[spec.name] = None
    return windows


def score_examples(rows: list[dict], embedder, calibrator, checker) -> None:
    """Add the correctness, similarity and grounding fields to each example row (in place); a row's `samples`
    (closed-book answers sampled for consistency, possibly empty) feed its consistency score."""
    similarities = alias_similarity(embedder, [r["output"] for r in rows], [r["answers"] for r in rows])
    probabilities = calibrator(similarities).tolist()
    grounding = checker.check_many([r["output"] for r in rows], [r["passages"] for r in rows],
                                   [r.get("samples") or [] for r in rows])
    for row, similarity, probability, check in zip(rows, similarities, probabilities, grounding, strict=True):
        row["best_subspan_em"] = best_subspan_em(row["output"], row["answers"])
        row["exact_match"] = exact_match(row["output"], row["answers"])
        row["similarity"] = round(similarity, 6)
        row["p_same"] = round(float(probability), 6)
        row["grounding_status"] = check["status"]
        row["unsupported_rate"] = check["unsupported_rate"]
        row["hallucinated"] = check["hallucinated"]
        row["grounding_support"] = check["support"]
        row["consistency"] = check["consistency"]
        row["claims"] = json.dumps(check["claims"], ensure_ascii=False)


def write_results(rows: list[dict], specs, cells, calibration: dict, args, questions: int,
                  windows: dict[str, int | None], directory: Path) -> dict:
    """summary.json, report.md, plots/ and examples/ in `directory`; returns the summary."""
    summary = report.summarize(rows, specs, cells, calibration, args, questions)
    summary["context_window"] = windows
    summary["grounding"] = {"checker": getattr(args, "grounding", "claims"),
                            "verifier": getattr(args, "grounding_verifier", None),
                            "consistency_samples": getattr(args, "consistency_samples", 0)}
    save_dataset_atomic(Dataset.from_list(rows), directory / "examples")
    write_json_atomic(directory / "summary.json", summary)
    report.plot(summary, directory / "plots")
    (directory / "report.md").write_text(report.markdown(summary), encoding="utf-8")
    return summary
