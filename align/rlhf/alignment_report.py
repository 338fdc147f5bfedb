"""An alignment report from what `align evaluate` collected: the summary (every figure with its interval, null
with a reason where undefined, never NaN), `report.md` and the plots.

Inputs, all per prompt in one order: each policy's greedy response and sampled responses with their
log-probabilities under the policy and under the reference policy, and each judge's scores of all of them.
Win rates compare greedy responses (what a user of the model sees); KL and best-of-n use the samples (what
the KL is a property of), so the score-vs-√KL plot shows the mean score of sampled responses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from align.rlhf.alignment_stats import (
    best_of_n_expected,
    best_of_n_kl,
    kl_estimate,
    length_controlled,
    mean_with_interval,
    preferences,
    win_rate,
)


@dataclass
class Collected:
    """What the stage gathered. generations[policy][i]: {greedy, samples, logp}; reference_logp[policy][i]: the
    reference policy's log-probabilities of that policy's samples; scores[judge][policy][i]: {greedy, samples}."""

    prompts: list
    policies: list[str]
    baseline: str
    reference: str
    judges: list[str]
    proxy: str | None
    proxy_reason: str
    generations: dict[str, list[dict]]
    reference_logp: dict[str, list[list[float]]]
    scores: dict[str, dict[str, list[dict]]]
    best_of_n: list[int] = field(default_factory=list)
    kl_note: str | None = None  # why KL cannot be estimated (e.g. samples not drawn at temperature 1)
    seed: int = 0


def words(text: str) -> int:
    return len(text.split())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(data: Collected) -> dict:
    """The report's figures as JSON-ready data (see the module docstring)."""
    base_words = [words(g["greedy"]) for g in data.generations[data.baseline]]
    policies = {}
    for name in data.policies:
        lengths = [words(g["greedy"]) for g in data.generations[name]]
        kl = None
        if data.kl_note is None:
            kl = kl_estimate([g["logp"] for g in data.generations[name]], data.reference_logp[name], data.seed)
        policies[name] = {
            "mean_words": _mean(lengths),
            "longer_than_baseline": _mean([float(a > b) for a, b in zip(lengths, base_words, strict=True)]),
            "kl": kl, "kl_note": data.kl_note,
        }
    judges = {}
    for judge in data.judges:
        per_policy = {}
        for name in data.policies:
            scores = data.scores[judge][name]
            greedy = [s["greedy"] for s in scores]
            samples = [_mean(s["samples"]) for s in scores if s["samples"]]
            entry = {"score": mean_with_interval(greedy, data.seed), "sample_score": mean_with_interval(samples,
                                                                                                      data.seed)}
            if name != data.baseline:
                baseline = [s["greedy"] for s in data.scores[judge][data.baseline]]
                diff = [words(a["greedy"]) - words(b["greedy"])
                        for a, b in zip(data.generations[name], data.generations[data.baseline], strict=True)]
                entry["win_rate"] = win_rate(greedy, baseline, data.seed)
                entry["length_controlled"] = length_controlled(preferences(greedy, baseline), diff, data.seed)
            per_policy[name] = entry
        judges[judge] = {"proxy": judge == data.proxy, "policies": per_policy,
                         "best_of_n": best_of_n_curve(data, judge)}
    summary = {"prompts": len(data.prompts), "baseline": data.baseline, "reference": data.reference,
               "proxy": data.proxy, "proxy_reason": data.proxy_reason,
               "gold_judges": [j for j in data.judges if j != data.proxy], "policies": policies, "judges": judges}
    summary["headline"] = headline(summary)
    return summary


def best_of_n_curve(data: Collected, judge: str) -> list[dict]:
    """Best-of-n from the reference policy's samples, chosen by the proxy (or by `judge` itself when there is no
    proxy), scored by `judge`: [{n, kl, sqrt_kl, score, interval}]."""
    chooser = data.proxy or judge
    picked = data.scores[chooser][data.reference]
    scored = data.scores[judge][data.reference]
    curve = []
    for n in data.best_of_n:
        values = [best_of_n_expected(p["samples"], s["samples"], n) for p, s in zip(picked, scored, strict=True)
                  if len(p["samples"]) >= n]
        if not values:
            continue
        kl = best_of_n_kl(n)
        curve.append({"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl), **mean_with_interval(values, data.seed)})
    return curve


def _interval(entry: dict | None, key: str = "interval", digits: int = 2) -> str:
    if not entry or entry.get(key) is None:
        return "—"
    low, high = entry[key]
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _number(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def headline(summary: dict) -> list[str]:
    """One line per (gold judge, policy): the win rate over the baseline with its interval and what it means."""
    lines = []
    for judge in summary["gold_judges"]:
        for name, entry in summary["judges"][judge]["policies"].items():
            if "win_rate" not in entry:
                continue
            wr, lc = entry["win_rate"], entry["length_controlled"]
            if wr["win_rate"] is None:
                continue
            low = wr["interval"][0] if wr["interval"] else None
            high = wr["interval"][1] if wr["interval"] else None
            verdict = ("better than" if low is not None and low > 0.5 else
                       "worse than" if high is not None and high < 0.5 else "not distinguishable from")
            lines.append(f"{judge}: {name} wins {wr['win_rate']:.3f} {_interval(wr)} of {wr['prompts']} prompts "
                         f"against {summary['baseline']} (sign test p = {_number(wr['sign_test_p'])}; "
                         f"length-controlled {_number(lc['lc_win_rate'])} {_interval(lc)}): {verdict} the baseline")
    if not lines:
        lines.append("no judge other than the proxy compared a policy with the baseline — add a gold judge "
                     "(--judges NAME=<reward output the policies were not trained against>)")
    return lines


def markdown(summary: dict, plots: list[str]) -> str:
    """report.md: the headline, one table per judge, the policies' lengths and KL, the plots."""
    out = ["# Alignment report", "",
           f"{summary['prompts']} held-out prompts; baseline **{summary['baseline']}**; KL and best-of-n against "
           f"**{summary['reference']}**. Proxy judge: **{summary['proxy'] or 'none'}** ({summary['proxy_reason']}).",
           "", "## Headline (judges the policies were not optimised against)", ""]
    out += [f"- {line}" for line in summary["headline"]]
    out += ["", "Win rates compare greedy responses paired by prompt (ties count half); intervals are 95% "
            "bootstrap intervals over prompts; the length-controlled win rate is the win rate at equal length "
            "from a logistic fit on the length difference (words).", ""]
    for judge, result in summary["judges"].items():
        role = "proxy — the reward a policy was optimised against" if result["proxy"] else "gold"
        out += [f"## Judge `{judge}` ({role})", "",
                "| policy | mean score | win rate vs baseline | sign test p | length-controlled | mean score of "
                "samples |", "|---|---|---|---|---|---|"]
        for name, entry in result["policies"].items():
            wr, lc = entry.get("win_rate"), entry.get("length_controlled")
            out.append(f"| {name} | {_number(entry['score']['mean'])} {_interval(entry['score'])} | "
                       + (f"{_number(wr['win_rate'])} {_interval(wr)} | {_number(wr['sign_test_p'])} | "
                          f"{_number(lc['lc_win_rate'])} {_interval(lc)}" if wr else "baseline | — | —")
                       + f" | {_number(entry['sample_score']['mean'])} {_interval(entry['sample_score'])} |")
        if result["best_of_n"]:
            out += ["", "Best-of-n from " + summary["reference"] + ": " + ", ".join(
                f"n={p['n']} (√KL {p['sqrt_kl']:.2f}): {p['mean']:.3f}" for p in result["best_of_n"])]
        out.append("")
    out += ["## Policies", "", "| policy | mean words | longer than baseline | KL to reference (nats/response) |",
            "|---|---|---|---|"]
    for name, entry in summary["policies"].items():
        kl = (f"{_number(entry['kl']['mean'])} {_interval(entry['kl'])}" if entry["kl"] and entry["kl"]["mean"]
              is not None else f"— ({entry['kl_note'] or 'no samples'})")
        out.append(f"| {name} | {_number(entry['mean_words'], 1)} | {_number(entry['longer_than_baseline'], 2)} | "
                   f"{kl} |")
    out += ["", "KL is estimated from each policy's own samples as the mean of log π(y|x) − log π_ref(y|x): unbiased, "
            "so a policy close to the reference can show a small negative value.", ""]
    out += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def plot(summary: dict, directory: Path) -> list[Path]:
    """score_vs_sqrt_kl.png (a panel per judge: the best-of-n curve and each policy's samples at √KL) and
    win_rates.png (win rate and length-controlled win rate over the baseline, a group per judge)."""
    from align.core.plots import error_bars, pyplot, save

    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    judges = list(summary["judges"])
    figure, axes = plt.subplots(1, len(judges), figsize=(4.5 * len(judges), 4), squeeze=False)
    for axis, judge in zip(axes[0], judges, strict=True):
        result = summary["judges"][judge]
        curve = [p for p in result["best_of_n"] if p["mean"] is not None]
        if curve:
            axis.plot([p["sqrt_kl"] for p in curve], [p["mean"] for p in curve], "o--", color="gray",
                      label=f"best-of-n from {summary['reference']}")
        for index, (name, entry) in enumerate(result["policies"].items()):
            kl = summary["policies"][name]["kl"]
            score = entry["sample_score"]
            if kl and kl["mean"] is not None and score["mean"] is not None:
                x = math.sqrt(max(0.0, kl["mean"]))
                axis.errorbar([x], [score["mean"]], yerr=error_bars([score["mean"]], [score["interval"]])
                              if score["interval"] else None, fmt="s", capsize=3,
                              color=plt.get_cmap("tab10")(index % 10), label=name)
        axis.set_title(f"{judge} ({'proxy' if result['proxy'] else 'gold'})")
        axis.set_xlabel("√KL to the reference (KL in nats per response)")
        axis.set_ylabel("mean score of sampled responses (reward std)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    paths = [save(figure, directory / "score_vs_sqrt_kl.png", 110)]

    figure, axis = plt.subplots(figsize=(max(4.5, 2.2 * len(judges)), 4))
    names = [n for n in summary["policies"] if n != summary["baseline"]]
    width = 0.8 / max(1, 2 * len(names))
    for j, judge in enumerate(judges):
        for k, name in enumerate(names):
            entry = summary["judges"][judge]["policies"][name]
            for m, (key, stat, hatch) in enumerate((("win_rate", "win_rate", ""), ("length_controlled", "lc_win_rate",
                                                                                   "//"))):
                value, interval = entry[key][stat], entry[key]["interval"]
                if value is None:
                    continue
                x = j + (2 * k + m - len(names) + 0.5) * width
                axis.bar(x, value, width, hatch=hatch, color=plt.get_cmap("tab10")(k % 10), alpha=0.8,
                         yerr=error_bars([value], [interval]) if interval else None, capsize=3,
                         label=f"{name}{' (length-controlled)' if m else ''}" if j == 0 else None)
    axis.axhline(0.5, color="black", linewidth=0.8)
    axis.set_xticks(range(len(judges)), [f"{j}{' (proxy)' if summary['judges'][j]['proxy'] else ''}"
                                         for j in judges])
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"win rate over {summary['baseline']}")
    axis.grid(alpha=0.3, axis="y")
    if names:
        axis.legend(fontsize=7)
    paths.append(save(figure, directory / "win_rates.png", 110))
    return paths
