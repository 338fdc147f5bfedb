"""`rag rescore`: score a finished `rag eval` again with today's metrics, calibration and grounding checker, without
generating a single answer: the answers (and closed-book samples) come from its `examples/`.

Writes a complete new report — `summary.json`, `report.md`, `plots/`, `examples/`, `manifest.json` — in
`<eval_dir>/rescored/` (or `--output_dir`), beside the original, plus `differences.json`: for every model and cell,
each headline figure before and after (accuracy, exact match, P(same meaning), answers with an unsupported claim,
unsupported-claim rate), and how many answers changed their grounding verdict. The report lists them too.
Prompts are not rebuilt and nothing is sampled: a run made without `consistency_samples` stays without a
consistency score.

    rag rescore --eval_dir runs/rag-nq-k
    rag rescore --eval_dir runs/rag-nq-k --grounding words --output_dir runs/rag-nq-k-words
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.options import Choice
from align.core.outputs import StageOutput, base_manifest, write_json_atomic
from align.lm.models import pick_device
from align.lm.policies import parse_policies
from align.lm.precision import PRECISION_HELP, precision_problems, stage_precision
from rag.evaluate import GROUNDING, EvalArguments
from rag.position import plan_cells
from rag.retrieval import Embedder
from rag.scoring import add_prompt_tokens, calibration_for, make_checker, score_examples, write_results

STAGE = "rag rescore"
logger = logging.getLogger("align")
# Headline figures compared before and after, per model and cell: (summary key, label).
COMPARED = (("accuracy", "accuracy"), ("exact_match", "exact match"), ("p_same_mean", "P(same meaning)"),
            ("hallucinated", "answers with an unsupported claim"),
            ("unsupported_claim_rate_mean", "unsupported-claim rate"))


@dataclass
class RescoreArguments:
    eval_dir: str | None = field(default=None, metadata={"help": "A finished `rag eval` output directory."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the new report goes (default: "
                                                                    "<eval_dir>/rescored)."})
    grounding: str = field(default="claims", metadata={"help": "claims or words (see `rag eval --help`)."})
    grounding_threshold: float | None = field(default=None, metadata={"help": "Cosine a passage sentence needs "
                                                                             "(default: the evaluation's)."})
    nli_model: str | None = field(default=None, metadata={"help": "A local CrossEncoder NLI directory."})
    grounding_verifier: str | None = field(default=None, metadata={"help": "A model asked whether each claim is "
                                                                           "supported."})
    calibration: str | None = field(default=None, metadata={"help": "A `rag calibrate` output (default: the "
                                                                     "evaluation's, or one fitted on its records)."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP + " (for --grounding_verifier)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})


CONFIG_CLASSES = (RescoreArguments,)
OPTION_RULES = {"grounding": Choice(GROUNDING)}


def option_problems(args: RescoreArguments) -> list[str]:
    return precision_problems(args.precision)


def load_evaluation(eval_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(manifest, summary, example rows) of a finished `rag eval`; anything else is one clear error."""
    if not eval_dir.is_dir():
        raise StageError(STAGE, f"{eval_dir} is not a directory — pass a finished `rag eval` output as --eval_dir")
    manifest_path = eval_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        partial = " (it looks unfinished: re-run its `rag eval` command to finish it)" \
            if eval_dir.name.endswith(".partial") else ""
        raise StageError(STAGE, f"{eval_dir} has no readable manifest.json: not a finished `rag eval` output"
                         f"{partial}") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != "rag eval":
        stage = manifest.get("stage") if isinstance(manifest, dict) else None
        raise StageError(STAGE, f"{eval_dir} is {'a ' + repr(stage) if stage else 'not a stage'} output, not a "
                         "`rag eval` output")
    for name in ("summary.json", "examples"):
        if not (eval_dir / name).exists():
            raise StageError(STAGE, f"{eval_dir} lacks {name}: not a complete `rag eval` output")
    from datasets import load_from_disk

    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    rows = [dict(row) for row in load_from_disk(str(eval_dir / "examples"))]
    return manifest, summary, rows


def differences(before: dict, after: dict, old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """One entry per model x cell: each compared figure before and after, and the answers whose grounding
    verdict (hallucinated: yes / no / undetermined) changed."""
    verdicts = {(r["model"], r["cell"], r["question_id"]): r.get("hallucinated") for r in old_rows}
    changed: dict[tuple[str, str], int] = {}
    for row in new_rows:
        key = (row["model"], row["cell"])
        if verdicts.get((row["model"], row["cell"], row["question_id"])) != row["hallucinated"]:
            changed[key] = changed.get(key, 0) + 1
    entries = []
    for model, cells in after["accuracy_by_model"].items():
        for cell, new in cells.items():
            old = before.get("accuracy_by_model", {}).get(model, {}).get(cell, {})
            figures = {}
            for key, _ in COMPARED:
                a, b = old.get(key), new.get(key)
                a = a.get("rate") if isinstance(a, dict) else a
                b = b.get("rate") if isinstance(b, dict) else b
                figures[key] = {"before": a, "after": b,
                                "change": None if a is None or b is None else round(b - a, 6)}
            entries.append({"model": model, "cell": cell, **figures,
                            "grounding_verdicts_changed": changed.get((model, cell), 0)})
    return entries


def differences_markdown(entries: list[dict], eval_dir: Path) -> str:
    def fmt(value):
        return "—" if value is None else f"{value:.3f}"

    lines = ["", "## Differences from the original report", "",
             f"Before: `{eval_dir / 'report.md'}`; after: this report. Same answers, scored again.", "",
             "| model | cell | " + " | ".join(label for _, label in COMPARED) + " | grounding verdicts changed |",
             "|---|---|" + "---|" * (len(COMPARED) + 1)]
    for e in entries:
        lines.append(f"| {e['model']} | {e['cell']} | " + " | ".join(
            f"{fmt(e[key]['before'])} → {fmt(e[key]['after'])}" for key, _ in COMPARED)
            + f" | {e['grounding_verdicts_changed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_config(STAGE, CONFIG_CLASSES, argv, module="rag.rescore")
    if not args.eval_dir:
        raise StageError(STAGE, "--eval_dir is required: a finished `rag eval` output")
    eval_dir = Path(args.eval_dir)
    manifest, before, old_rows = load_evaluation(eval_dir)
    known = {f.name for f in dataclasses.fields(EvalArguments)}
    original = EvalArguments(**{k: v for k, v in manifest.get("config", {}).items() if k in known})
    scoring = dataclasses.replace(original, grounding=args.grounding, nli_model=args.nli_model,
                                  grounding_verifier=args.grounding_verifier,
                                  calibration=args.calibration or original.calibration,
                                  grounding_threshold=args.grounding_threshold or original.grounding_threshold)
    specs = parse_policies(original.models, STAGE)
    cells = plan_cells(original.arms, original.num_documents, original.gold_positions, STAGE)
    records = []
    if not scoring.calibration and original.benchmark == "qa":
        from rag.data import load_records

        if not Path(original.records).exists():
            raise StageError(STAGE, f"the evaluation's records {original.records} are not here to fit the "
                             "similarity calibration on — pass --calibration <rag calibrate output>")
        records = load_records(original.records, STAGE)
    output_dir = Path(args.output_dir) if args.output_dir else eval_dir / "rescored"
    config = {**dataclasses.asdict(args), "output_dir": str(output_dir)}
    output = StageOutput(STAGE, output_dir, config, overwrite=args.overwrite_output_dir, restart=True)
    output.check()
    started = now_iso()
    embedder = Embedder(original.embedding_model, stage=STAGE)
    calibrator, calibration = calibration_for(scoring, records, embedder, STAGE)
    device = pick_device()
    precision = stage_precision(args.precision, device, STAGE) if args.grounding_verifier else None
    checker = make_checker(scoring, embedder, device, precision, STAGE)

    rows = [{**row, "samples": list(row.get("samples") or [])} for row in old_rows]
    windows = add_prompt_tokens(rows, specs, original.benchmark, STAGE)
    score_examples(rows, embedder, calibrator, checker)
    partial = output.open()
    questions = len({r["question_id"] for r in rows})
    after = write_results(rows, specs, cells, calibration, scoring, questions, windows, partial)
    entries = differences(before, after, old_rows, rows)
    write_json_atomic(partial / "differences.json", entries)
    with open(partial / "report.md", "a", encoding="utf-8") as f:
        f.write(differences_markdown(entries, eval_dir))
    rescore_manifest = base_manifest(STAGE, config, {"eval_dir": str(eval_dir)}, manifest.get("base_model", {}),
                                     started)
    rescore_manifest["outputs"] = {"summary": "summary.json", "report": "report.md", "plots": "plots",
                                   "examples": "examples", "differences": "differences.json"}
    rescore_manifest["scoring"] = {"grounding": scoring.grounding, "grounding_verifier": scoring.grounding_verifier,
                                   "calibration": calibration.get("source")}
    rescore_manifest["finished"] = now_iso()
    final = output.publish(rescore_manifest, keep=["summary.json", "report.md", "plots", "examples",
                                                   "differences.json"])
    changed = sum(e["grounding_verdicts_changed"] for e in entries)
    print(f"report: {final / 'report.md'} ({len(rows)} answers scored again; {changed} grounding verdicts changed)")
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
