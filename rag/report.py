"""`rag eval` results: aggregation into summary.json, the Markdown report and the PNG plots."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from align.core.plots import error_bars, pyplot, save
from rag.metrics import mcnemar, rate, roc_auc


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def relative_position(num_documents: int, position: int) -> str:
    """first / middle / last: where a gold position sits among k documents (what Lost in the Middle compares)."""
    return "first" if position == 0 else ("last" if position == num_documents - 1 else "middle")


def _consistency_auroc(rows: list[dict]) -> float | None:
    known = [(r["consistency"], bool(r["best_subspan_em"])) for r in rows if r.get("consistency") is not None]
    return roc_auc([c for c, _ in known], [y for _, y in known]) if known else None


def cell_metrics(rows: list[dict]) -> dict:
    return {
        "accuracy": rate([r["best_subspan_em"] for r in rows]),
        "exact_match": rate([r["exact_match"] for r in rows]),
        "similarity_mean": _mean([r["similarity"] for r in rows]),
        "p_same_mean": _mean([r["p_same"] for r in rows]),
        "hallucinated": rate([r["hallucinated"] for r in rows]),
        "unsupported_claim_rate_mean": _mean([r["unsupported_rate"] for r in rows]),
        "truncated": sum(bool(r["truncated"]) for r in rows),
        "grounding_support_mean": _mean([r.get("grounding_support") for r in rows]),
        "consistency_mean": _mean([r.get("consistency") for r in rows]),
        "consistency_auroc": _consistency_auroc(rows),  # how well consistency tells right answers from wrong
        "prompt_tokens_mean": _mean([r.get("prompt_tokens") for r in rows]),
    }


def summarize(rows: list[dict], specs, cells, calibration: dict, args, questions: int) -> dict:
    """Per model x cell metrics, pooled accuracy per k, and McNemar tests between positions and between models."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["model"], row["cell"]), []).append(row)
    for group in grouped.values():
        group.sort(key=lambda r: r["question_id"])  # paired tests compare the same questions in the same order
    models = [s.name for s in specs]
    summary = {
        "benchmark": args.benchmark, "records": args.records, "questions": questions, "seed": args.seed,
        "models": [{"name": s.name, "model": s.model, "adapters": s.adapters} for s in specs],
        "cells": [{"key": c.key, "arm": c.arm, "num_documents": c.num_documents, "gold_position": c.gold_position,
                   "label": c.label} for c in cells],
        "accuracy_by_model": {m: {c.key: cell_metrics(grouped[(m, c.key)]) for c in cells} for m in models},
        "accuracy_by_num_documents": {},
        "position_tests": [],
        "model_tests": [],
        "calibration": calibration,
    }
    documents = [c for c in cells if c.arm == "documents"]
    for m in models:
        per_k = {}
        for k in sorted({c.num_documents for c in documents}):
            pooled = [r for c in documents if c.num_documents == k for r in grouped[(m, c.key)]]
            per_k[str(k)] = {**rate([r["best_subspan_em"] for r in pooled]), "positions": sorted(
                {c.gold_position for c in documents if c.num_documents == k})}
        summary["accuracy_by_num_documents"][m] = per_k
        summary.setdefault("accuracy_by_position_and_k", {})[m] = {
            f"{relative_position(c.num_documents, c.gold_position)}/{c.num_documents}":
                summary["accuracy_by_model"][m][c.key]["accuracy"] for c in documents}

    question_ids = [r["question_id"] for r in grouped[(models[0], cells[0].key)]]
    outcomes = {key: {r["question_id"]: bool(r["best_subspan_em"]) for r in group} for key, group in grouped.items()}
    if any(set(o) != set(question_ids) for o in outcomes.values()):
        raise AssertionError("every model and cell must hold the same questions")

    def correct(model: str, cell: str) -> list[bool]:  # in one question order, so paired tests pair questions
        return [outcomes[(model, cell)][q] for q in question_ids]

    for m in models:
        for k in sorted({c.num_documents for c in documents}):
            same_k = [c for c in documents if c.num_documents == k]
            for a, b in itertools.combinations(same_k, 2):
                summary["position_tests"].append({"model": m, "num_documents": k, "a": a.key, "b": b.key,
                                                  "accuracy_a": rate(correct(m, a.key))["rate"],
                                                  "accuracy_b": rate(correct(m, b.key))["rate"],
                                                  **mcnemar(correct(m, a.key), correct(m, b.key))})
    for cell in cells:
        for a, b in itertools.combinations(models, 2):
            summary["model_tests"].append({"cell": cell.key, "a": a, "b": b,
                                           "accuracy_a": rate(correct(a, cell.key))["rate"],
                                           "accuracy_b": rate(correct(b, cell.key))["rate"],
                                           **mcnemar(correct(a, cell.key), correct(b, cell.key))})
    return summary


# ----------------------------------------------------------------------------- Markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _consistency(v: dict) -> str:
    if v.get("consistency_mean") is None:
        return "—"
    auroc = v.get("consistency_auroc")
    return f"{v['consistency_mean']:.3f}" + (f" (ROC-AUC for a right answer {auroc:.2f})" if auroc is not None else "")


def _rate(r: dict) -> str:
    return f"{_fmt(r['rate'])} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r["rate"] is not None else "—"


def markdown(summary: dict) -> str:
    models = [m["name"] for m in summary["models"]]
    cells = summary["cells"]
    acc = summary["accuracy_by_model"]
    lines = [
        "# RAG evaluation", "",
        f"Benchmark `{summary['benchmark']}` from `{summary['records']}`: {summary['questions']} questions "
        f"(seed {summary['seed']}), the same in every cell. Models: "
        + ", ".join(f"**{m['name']}** = `{'+'.join([m['model'], *m['adapters']])}`" for m in summary["models"]) + ".",
        "", "Accuracy is best_subspan_em (a normalised answer alias occurs in the first line of the output), with a "
        "Wilson 95% interval.", "",
        "## Accuracy", "",
        "| cell | " + " | ".join(models) + " |", "|---|" + "---|" * len(models),
    ]
    for cell in cells:
        lines.append(f"| {cell['label']} | " + " | ".join(_rate(acc[m][cell['key']]['accuracy']) for m in models)
                     + " |")
    if any(summary["accuracy_by_num_documents"].get(m) for m in models):
        lines += ["", "Pooled over gold positions, per number of documents (the interval treats each question at each "
                  "position as a separate trial, so it is narrower than a per-question one):", "",
                  "| documents | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        ks = sorted({k for m in models for k in summary["accuracy_by_num_documents"][m]}, key=int)
        for k in ks:
            lines.append(f"| {k} | " + " | ".join(_rate(summary["accuracy_by_num_documents"][m][k]) for m in models)
                         + " |")
    for m in models:
        lines += ["", f"## {m}", "",
                  "| cell | accuracy | exact match | cosine to reference | P(same meaning) | answers with an "
                  "unsupported claim | unsupported-claim rate | mean support | undetermined grounding | consistency "
                  "(closed-book) | cut at max tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for cell in cells:
            v = acc[m][cell["key"]]
            lines.append(f"| {cell['label']} | {_rate(v['accuracy'])} | {_rate(v['exact_match'])} | "
                         f"{_fmt(v['similarity_mean'])} | {_fmt(v['p_same_mean'])} | {_rate(v['hallucinated'])} | "
                         f"{_fmt(v['unsupported_claim_rate_mean'])} | {_fmt(v.get('grounding_support_mean'))} | "
                         f"{v['hallucinated']['undetermined']} | {_consistency(v)} | {v['truncated']} |")
    if summary["position_tests"]:
        lines += ["", "## Gold position: paired tests", "",
                  "McNemar's exact test on the same questions; `only a` / `only b` count questions answered correctly "
                  "in one cell only.", "",
                  "| model | documents | a | b | accuracy a | accuracy b | only a | only b | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in summary["position_tests"]:
            lines.append(f"| {t['model']} | {t['num_documents']} | {t['a']} | {t['b']} | {_fmt(t['accuracy_a'])} | "
                         f"{_fmt(t['accuracy_b'])} | {t['only_first']} | {t['only_second']} | {t['p_value']:.3g} |")
    if summary["model_tests"]:
        lines += ["", "## Models: paired tests", "",
                  "| cell | a | b | accuracy a | accuracy b | only a | only b | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in summary["model_tests"]:
            lines.append(f"| {t['cell']} | {t['a']} | {t['b']} | {_fmt(t['accuracy_a'])} | {_fmt(t['accuracy_b'])} | "
                         f"{t['only_first']} | {t['only_second']} | {t['p_value']:.3g} |")
    calibration = summary["calibration"]
    lines += ["", "## Similarity calibration", "", f"Cosine → P(same meaning): {calibration['source']}."]
    held = calibration.get("held_out")
    if held:
        lines.append(f"Held-out pairs: {held['pairs']}, ROC-AUC {_fmt(held['roc_auc'])}, expected calibration error "
                     f"{_fmt(held['ece_raw_cosine'])} (raw cosine) → {_fmt(held['ece_calibrated'])} (calibrated).")
    lines += ["", "## Plots", "", "![accuracy by gold position](plots/accuracy_by_position.png)", "",
              "![accuracy by number of documents](plots/accuracy_by_num_documents.png)", ""]
    if len({c["num_documents"] for c in cells if c["arm"] == "documents"}) > 1:
        lines += ["![accuracy against k, a line per gold position](plots/accuracy_vs_k.png)", "",
                  "![accuracy against prompt length](plots/accuracy_vs_prompt_length.png)", "",
                  "![gold position x number of documents](plots/position_by_k.png)", ""]
    grounding = summary.get("grounding")
    if grounding:
        lines += ["## Grounding", "", f"Checker `{grounding['checker']}`"
                  + (f" with verifier `{grounding['verifier']}`" if grounding.get("verifier") else "")
                  + "; an answer is hallucinated when one of its claims is unsupported (see `rag.hallucination`). "
                  f"Closed-book answers: consistency with {grounding['consistency_samples']} samples.", ""]
    return "\n".join(lines)


def headline(summary: dict, output: Path) -> str:
    lines = [f"report: {output / 'report.md'}"]
    for model, cells in summary["accuracy_by_model"].items():
        parts = [f"{key} {values['accuracy']['rate']:.3f}" for key, values in cells.items()]
        lines.append(f"  {model}: " + ", ".join(parts))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def plot(summary: dict, directory: Path) -> list[Path]:
    """accuracy_by_position.png (one panel per k, a line per model, closed-book/oracle as horizontal lines) and
    accuracy_by_num_documents.png (pooled accuracy against k, a line per model)."""
    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    models = [m["name"] for m in summary["models"]]
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    documents = [c for c in summary["cells"] if c["arm"] == "documents"]
    ks = sorted({c["num_documents"] for c in documents}) or [None]
    acc = summary["accuracy_by_model"]

    figure, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    for axis, k in zip(axes[0], ks, strict=True):
        for m in models:
            cells = [c for c in documents if c["num_documents"] == k]
            if cells:
                xs = [c["gold_position"] for c in cells]
                ys = [acc[m][c["key"]]["accuracy"]["rate"] for c in cells]
                bars = error_bars(ys, [acc[m][c["key"]]["accuracy"]["ci95"] for c in cells])
                axis.errorbar(xs, ys, yerr=bars, marker="o", capsize=3, color=colors[m], label=m)
                axis.set_xticks(xs)
            for arm, style in (("closed_book", "--"), ("oracle", ":")):
                if arm in acc[m]:
                    axis.axhline(acc[m][arm]["accuracy"]["rate"], linestyle=style, color=colors[m], alpha=0.7,
                                 label=f"{m} {arm.replace('_', '-')}")
        axis.set_title(f"{k} documents" if k else "no documents arm")
        axis.set_xlabel("position of the gold passage (0 = first)")
        axis.set_ylabel("accuracy (best_subspan_em)")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    paths = [save(figure, directory / "accuracy_by_position.png", 120)]

    figure, axis = plt.subplots(figsize=(5, 4))
    for m in models:
        per_k = summary["accuracy_by_num_documents"].get(m, {})
        if per_k:
            xs = sorted(per_k, key=int)
            ys = [per_k[k]["rate"] for k in xs]
            bars = error_bars(ys, [per_k[k]["ci95"] for k in xs])
            axis.errorbar([int(k) for k in xs], ys, yerr=bars, marker="o", capsize=3, color=colors[m], label=m)
    axis.set_xlabel("documents in the context (pooled over gold positions)")
    axis.set_ylabel("accuracy (best_subspan_em)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    if any(summary["accuracy_by_num_documents"].get(m) for m in models):
        axis.legend(fontsize=8)
    paths.append(save(figure, directory / "accuracy_by_num_documents.png", 120))
    if len([k for k in ks if k]) > 1:
        paths += _plots_over_k(summary, directory, models, colors, documents, [k for k in ks if k])
    return paths


def _accuracy_panel(axis, title: str, xlabel: str) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel("accuracy (best_subspan_em), 95% interval")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _plots_over_k(summary: dict, directory: Path, models: list[str], colors: dict, documents: list[dict],
                  ks: list[int]) -> list[Path]:
    """accuracy_vs_k.png (a line per relative gold position, oracle at k = 1 and closed-book as references),
    accuracy_vs_prompt_length.png (each cell at its mean prompt length over the model's context window) and
    position_by_k.png (a heatmap of accuracy, gold position x k), one panel per model."""
    plt = pyplot()
    acc = summary["accuracy_by_model"]
    styles = {"first": "o-", "middle": "s--", "last": "^-."}
    paths = []
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, m in zip(axes[0], models, strict=True):
        for label in ("first", "middle", "last"):
            cells = sorted((c for c in documents if relative_position(c["num_documents"], c["gold_position"]) ==
                            label), key=lambda c: c["num_documents"])
            if not cells:
                continue
            xs, ys = [c["num_documents"] for c in cells], [acc[m][c["key"]]["accuracy"]["rate"] for c in cells]
            if "oracle" in acc[m]:
                xs, ys = [1, *xs], [acc[m]["oracle"]["accuracy"]["rate"], *ys]
            intervals = ([acc[m]["oracle"]["accuracy"]["ci95"]] if "oracle" in acc[m] else []) + \
                [acc[m][c["key"]]["accuracy"]["ci95"] for c in cells]
            axis.errorbar(xs, ys, yerr=error_bars(ys, intervals), fmt=styles[label], capsize=3, label=f"gold {label}")
        if "closed_book" in acc[m]:
            axis.axhline(acc[m]["closed_book"]["accuracy"]["rate"], color="grey", linestyle=":", label="closed-book")
        axis.set_xscale("log")
        axis.set_xticks([1, *ks])
        axis.set_xticklabels(["1\n(oracle)" if "oracle" in acc[m] else "1", *map(str, ks)])
        _accuracy_panel(axis, m, "documents in the context (k)")
    paths.append(save(figure, directory / "accuracy_vs_k.png", 120))

    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, m in zip(axes[0], models, strict=True):
        window = (summary.get("context_window") or {}).get(m)
        for label in ("first", "middle", "last"):
            cells = [c for c in documents if relative_position(c["num_documents"], c["gold_position"]) == label]
            points = [(acc[m][c["key"]].get("prompt_tokens_mean"), acc[m][c["key"]]["accuracy"]) for c in cells]
            points = sorted((t / window if window else t, a) for t, a in points if t is not None)
            if points:
                ys = [a["rate"] for _, a in points]
                axis.errorbar([x for x, _ in points], ys, yerr=error_bars(ys, [a["ci95"] for _, a in points]),
                              fmt=styles[label], capsize=3, label=f"gold {label}")
        _accuracy_panel(axis, m, "prompt length / context window" if window else "prompt length (tokens)")
    paths.append(save(figure, directory / "accuracy_vs_prompt_length.png", 120))

    figure, axes = plt.subplots(1, len(models), figsize=(1.4 * len(ks) * len(models) + 2, 3.2), squeeze=False)
    for axis, m in zip(axes[0], models, strict=True):
        table = summary["accuracy_by_position_and_k"][m]
        labels = [p for p in ("first", "middle", "last") if any(key.startswith(p + "/") for key in table)]
        grid = [[(table.get(f"{p}/{k}") or {}).get("rate") for k in ks] for p in labels]
        image = axis.imshow([[v if v is not None else float("nan") for v in row] for row in grid], vmin=0, vmax=1,
                            cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value is not None:
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center",
                              color="white" if value < 0.5 else "black", fontsize=9)
        axis.set_xticks(range(len(ks)), [str(k) for k in ks])
        axis.set_yticks(range(len(labels)), labels)
        axis.set_xlabel("documents (k)")
        axis.set_ylabel("gold position")
        axis.set_title(m)
        figure.colorbar(image, ax=axis, fraction=0.05)
    paths.append(save(figure, directory / "position_by_k.png", 120))
    return paths
