"""The alignment report: did a policy get better, by judges it was not optimised against?

Every policy (`--policies NAME=MODEL[+ADAPTER...]`, as in `rag eval`: a PPO output or checkpoint brings in
its SFT adapter) answers the same seeded held-out prompts: one greedy response and `--num_samples`
sampled ones each (the reference policy draws `--best_of_n` for the best-of-n curve). Every judge
(`--judges NAME=<align reward output>`, LM or embedding) scores every response. The report gives, per
policy and judge: the mean normalised score with a 95% interval, the win rate over `--baseline` paired by
prompt (ties half) with its interval and a sign test, the length-controlled win rate, the mean length and
the share of responses longer than the baseline's; per policy the KL to `--reference` (from its samples'
log-probability ratios); and the best-of-n curve (n = 1, 2, 4, ... chosen by the proxy, scored by every
judge) against √KL beside every policy. The judge a PPO policy was optimised against — the *proxy*, read
from the PPO manifest or named by `--proxy` — is marked as such and never makes the headline.

Writes `<output_dir>/report.md`, `summary.json`, `plots/score_vs_sqrt_kl.png`, `plots/win_rates.png`,
`examples/` (a dataset: one row per prompt and policy, the responses and every judge's scores) and
`manifest.json`. Responses, log-probabilities and scores are journaled as they are made: a killed run
resumes where it stopped.

    align evaluate --config configs/tiny/evaluate.yaml       # seconds, tiny offline models
    align evaluate --dataset_name runs/self_instruct --dataset_split train --max_prompts 64 \\
        --policies sft=smollm2-135m-instruct+runs/sft ppo=smollm2-135m-instruct+runs/ppo --baseline sft \\
        --judges proxy=runs/reward gold=runs/reward_gold
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.inputs import load_stage_dataset
from align.core.journal import JournalWriter, replay
from align.core.options import AT_LEAST_ONE, NON_NEGATIVE
from align.core.outputs import (
    OutputArguments,
    StageOutput,
    base_manifest,
    run_identity,
    save_dataset_atomic,
    write_json_atomic,
)
from align.lm.generation import GenerationSettings, generate, render_prompt, response_logprobs
from align.lm.models import DEFAULT_MODEL, load_tokenizer, pick_device, resolve_model
from align.lm.policies import PolicySpec, adapter_chain, load_policy, parse_policies, policy_problems
from align.lm.precision import PRECISION_HELP, precision_problems, stage_precision
from align.preferences.prompts import prompt_records
from align.rlhf import alignment_report
from align.rlhf.judges import judge_backbone, load_judge, optimised_against, parse_judges, same_path

STAGE = "evaluate"
logger = logging.getLogger("align")


@dataclass
class EvaluateArguments(OutputArguments):
    dataset_name: str = field(
        default="runs/self_instruct",
        metadata={"help": "Held-out prompts: a dataset with a `prompt` column (text or chat) or `messages` chats (the "
                  "turns before the last reply) — a stage output, save_to_disk directory, JSON/JSONL/CSV file — or a "
                  "PPO output: the prompts it held out of training (its --eval_prompts)."},
    )
    dataset_split: str | None = field(default="test", metadata={"help": "Split of the prompts (None: every split)."})
    max_prompts: int = field(default=64, metadata={"help": "Evaluate on at most this many prompts (a seeded choice)."})
    policies: list[str] = field(
        default_factory=lambda: [f"base={DEFAULT_MODEL}"],
        metadata={"help": "NAME=MODEL[+ADAPTER...]: a model alias, directory or hub id, and adapters merged in order "
                  "(stage outputs, adapter directories or PPO checkpoints; a PPO one brings in its SFT adapter)."},
    )
    baseline: str | None = field(default=None, metadata={"help": "Policy the others are compared with (default: the "
                                                          "first)."})
    reference: str | None = field(
        default=None, metadata={"help": "Policy KL is measured against and best-of-n samples from (default: the "
                                "baseline; for PPO, its SFT policy)."})
    judges: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=<align reward output>: judges scoring every response (LM reward models or embedding "
                  "judges). Add one the policies were not optimised against: it makes the headline."},
    )
    proxy: str | None = field(
        default=None, metadata={"help": "Name of the judge the policies were optimised against (default: read from "
                                "the PPO policies' manifests)."})
    num_samples: int = field(default=4, metadata={"help": "Sampled responses per prompt and policy (KL, sample "
                                                  "scores); 0 = greedy only."})
    best_of_n: int = field(default=16, metadata={"help": "Samples the reference policy draws for the best-of-n "
                                                 "curve (n = 1, 2, 4, ... up to this); 0 = no curve."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (KL needs 1)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (KL needs 1)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest response in tokens."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch, responses per scoring batch."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt choice, the samples and the bootstraps."})
    output_dir: str = field(default="runs/evaluate", metadata={"help": "Where the finished report goes."})


CONFIG_CLASSES = (EvaluateArguments,)
# Checked by `parse_config` beside the shared rules (temperature > 0, top_p in (0, 1], ...), before any work.
OPTION_RULES = {"max_prompts": AT_LEAST_ONE, "num_samples": NON_NEGATIVE, "best_of_n": NON_NEGATIVE}


def option_problems(args: EvaluateArguments) -> list[str]:
    problems = precision_problems(args.precision)
    if not args.judges:
        problems.append("no judges — pass --judges NAME=<align reward output> (at least one; add one the policies "
                        "were not optimised against)")
    return problems


@dataclass
class Plan:
    specs: list[PolicySpec]
    judges: list[tuple[str, str]]
    baseline: str
    reference: str
    proxy: str | None
    proxy_reason: str
    prompts: list
    samples: dict[str, int]  # sampled responses per prompt, by policy


def find_proxy(args: EvaluateArguments, specs: list[PolicySpec], judges: list[tuple[str, str]]) -> tuple[str | None,
                                                                                                         str]:
    """(proxy judge name or None, why): named by --proxy, else the judge the PPO policies were trained against."""
    names = [name for name, _ in judges]
    if args.proxy:
        if args.proxy not in names:
            raise StageError(STAGE, f"--proxy {args.proxy} is not one of the judges ({', '.join(names)})")
        return args.proxy, "named by --proxy"
    rewards = [r for spec in specs for r in optimised_against(adapter_chain(spec.adapters))]
    matched = sorted({name for name, path in judges for r in rewards if same_path(path, r)})
    if len(matched) > 1:
        raise StageError(STAGE, f"the policies were optimised against several judges ({', '.join(matched)}) — name "
                         "the proxy with --proxy")
    if matched:
        return matched[0], "the reward model the PPO policies were optimised against"
    if rewards:
        return None, f"the PPO policies were optimised against {', '.join(sorted(set(rewards)))}, not a judge here"
    return None, "no policy here was optimised against a reward model"


def prompt_source(args: EvaluateArguments) -> tuple[str, str | None]:
    """(dataset, split) to read: a PPO output stands for the prompts it held out of training."""
    source = Path(args.dataset_name).expanduser()
    try:
        stage = json.loads((source / "manifest.json").read_text()).get("stage")
    except (OSError, json.JSONDecodeError):
        return args.dataset_name, args.dataset_split
    if stage != "ppo":
        return args.dataset_name, args.dataset_split
    if not (source / "eval_prompts.jsonl").is_file():
        raise StageError(STAGE, f"{source} held no prompts out of training (run with --eval_prompts 0) — pass a "
                         "dataset of held-out prompts")
    return str(source / "eval_prompts.jsonl"), "train"


def choose_prompts(args: EvaluateArguments) -> list:
    dataset, split = prompt_source(args)
    data = load_stage_dataset(dataset, STAGE)
    if split and split not in data:
        raise StageError(STAGE, f"{dataset} has no split '{split}' (splits: {', '.join(data)}) — pass --dataset_split")
    records = prompt_records(data, split, "output", need_reference=False, stage=STAGE)
    if not records:
        raise StageError(STAGE, f"{args.dataset_name} holds no prompts — pass a dataset of held-out prompts")
    chosen = sorted(random.Random(args.seed).sample(range(len(records)), min(args.max_prompts, len(records))))
    return [records[i]["prompt"] for i in chosen]


def validate(args: EvaluateArguments) -> Plan:
    """Everything checkable before a model loads; each problem is one line, exit code 2, nothing on disk."""
    specs = parse_policies(args.policies, STAGE)
    names = [s.name for s in specs]
    for spec in specs:
        resolve_model(spec.model, STAGE)
    problems = [problem for spec in specs for problem in policy_problems(spec)]
    baseline, reference = args.baseline or names[0], args.reference or args.baseline or names[0]
    for option, value in (("--baseline", args.baseline), ("--reference", args.reference)):
        if value is not None and value not in names:
            problems.append(f"{option} {value} is not one of the policies ({', '.join(names)})")
    judges = parse_judges(args.judges, STAGE)
    problems += [f"judge {name}: {path} is not a finished `align reward` output" for name, path in judges
                 if judge_backbone(path) is None]
    if problems:
        raise StageError(STAGE, problems)
    proxy, reason = find_proxy(args, specs, judges)
    samples = {name: max(args.num_samples, args.best_of_n if name == reference else 0) for name in names}
    return Plan(specs, judges, baseline, reference, proxy, reason, choose_prompts(args), samples)


# ----------------------------------------------------------------------------- the journal


def read_journal(path: Path, plan: Plan) -> dict[tuple, dict]:
    """Finished work by key: ("generation", policy, i), ("reference", policy, i), ("scores", judge, policy, i)."""
    done: dict[tuple, dict] = {}
    policies, judges = {s.name for s in plan.specs}, {n for n, _ in plan.judges}

    def accept(record: dict) -> bool:
        kind, policy, index = record["kind"], record["policy"], int(record["prompt"])
        if policy not in policies or not 0 <= index < len(plan.prompts):
            return False
        if kind == "generation":
            if not isinstance(record["greedy"], str) or len(record["samples"]) != plan.samples[policy] \
                    or len(record["logp"]) != len(record["samples"]):
                return False
            key = (kind, policy, index)
        elif kind == "reference":
            key = (kind, policy, index)
        elif kind == "scores" and record["judge"] in judges:
            key = (kind, record["judge"], policy, index)
            [float(s) for s in [record["greedy"], *record["samples"]]]  # noqa: B018 - raises on a bad record
        else:
            return False
        if key in done:  # already there: the first record stands
            return False
        done[key] = record
        return True

    replay(path, accept)
    return done


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ----------------------------------------------------------------------------- the work


def generate_all(plan: Plan, args: EvaluateArguments, done: dict, journal: JournalWriter, precision, device) -> None:
    """Greedy and sampled responses of every policy, with the policy's own log-probabilities of its samples."""
    from tqdm import tqdm
    from transformers import set_seed

    greedy = GenerationSettings(temperature=0, max_new_tokens=args.max_new_tokens)
    # top_k 0: samples from the policy's own distribution (no hidden top-k cut), which the KL estimate assumes
    sampling = GenerationSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  top_k=0)
    for number, spec in enumerate(plan.specs):
        todo = [i for i in range(len(plan.prompts)) if ("generation", spec.name, i) not in done]
        if not todo:
            continue
        path = resolve_model(spec.model, STAGE)
        tokenizer = load_tokenizer(path, STAGE)
        model = load_policy(path, spec.adapters, precision, device, STAGE)
        k = plan.samples[spec.name]
        for batch in tqdm(list(batches(todo, args.batch_size)), desc=f"{spec.name}: generate", unit="batch"):
            texts = [render_prompt(tokenizer, plan.prompts[i]) for i in batch]
            set_seed(args.seed + 1000 * number + batch[0])  # a resumed batch draws what it would have drawn
            answers = [g[0] for g in generate(model, tokenizer, texts, greedy)]
            drawn = generate(model, tokenizer, texts, sampling, k) if k else [[] for _ in batch]
            flat = [(text, g) for text, row in zip(texts, drawn, strict=True) for g in row]
            logp = response_logprobs(model, tokenizer, [t for t, _ in flat], [g.text for _, g in flat],
                                     [not g.truncated for _, g in flat], args.batch_size) if flat else []
            records = []
            for j, (i, answer, row) in enumerate(zip(batch, answers, drawn, strict=True)):
                records.append({"kind": "generation", "policy": spec.name, "prompt": i, "greedy": answer.text,
                                "greedy_truncated": answer.truncated, "samples": [g.text for g in row],
                                "samples_truncated": [g.truncated for g in row], "logp": logp[j * k:(j + 1) * k]})
            journal.write(records)
            done.update({("generation", spec.name, r["prompt"]): r for r in records})
        del model
        gc.collect()


def reference_logprobs(plan: Plan, args: EvaluateArguments, done: dict, journal: JournalWriter, precision,
                       device) -> None:
    """The reference policy's log-probabilities of every other policy's samples (for their KL)."""
    from tqdm import tqdm

    todo = [(s.name, i) for s in plan.specs if s.name != plan.reference for i in range(len(plan.prompts))
            if ("reference", s.name, i) not in done and plan.samples[s.name]]
    if not todo:
        return
    spec = next(s for s in plan.specs if s.name == plan.reference)
    path = resolve_model(spec.model, STAGE)
    tokenizer = load_tokenizer(path, STAGE)
    model = load_policy(path, spec.adapters, precision, device, STAGE)
    for batch in tqdm(list(batches(todo, args.batch_size)), desc=f"{plan.reference}: log-probs", unit="batch"):
        flat = [(policy, i, text, ended) for policy, i in batch
                for text, ended in zip(done[("generation", policy, i)]["samples"],
                                       [not t for t in done[("generation", policy, i)]["samples_truncated"]],
                                       strict=True)]
        rendered = {i: render_prompt(tokenizer, plan.prompts[i]) for _, i in batch}  # once per prompt, not sample
        logp = response_logprobs(model, tokenizer, [rendered[i] for _, i, _, _ in flat],
                                 [text for _, _, text, _ in flat], [e for *_, e in flat], args.batch_size)
        records, offset = [], 0
        for policy, i in batch:
            k = len(done[("generation", policy, i)]["samples"])
            records.append({"kind": "reference", "policy": policy, "prompt": i, "logp": logp[offset:offset + k]})
            offset += k
        journal.write(records)
        done.update({("reference", r["policy"], r["prompt"]): r for r in records})
    del model
    gc.collect()


def score_all(plan: Plan, args: EvaluateArguments, done: dict, journal: JournalWriter, precision, device) -> None:
    """Every judge's scores of every response (greedy and sampled)."""
    from tqdm import tqdm

    for name, path in plan.judges:
        todo = [(s.name, i) for s in plan.specs for i in range(len(plan.prompts))
                if ("scores", name, s.name, i) not in done]
        if not todo:
            continue
        judge = load_judge(name, path, precision, device, args.batch_size, STAGE)
        for batch in tqdm(list(batches(todo, args.batch_size)), desc=f"{name}: score", unit="batch"):
            responses = [[done[("generation", p, i)]["greedy"], *done[("generation", p, i)]["samples"]]
                         for p, i in batch]
            flat = judge.score([plan.prompts[i] for (_, i), row in zip(batch, responses, strict=True) for _ in row],
                               [r for row in responses for r in row])
            records, offset = [], 0
            for (policy, i), row in zip(batch, responses, strict=True):
                scores = flat[offset:offset + len(row)]
                offset += len(row)
                records.append({"kind": "scores", "judge": name, "policy": policy, "prompt": i, "greedy": scores[0],
                                "samples": scores[1:]})
            journal.write(records)
            done.update({("scores", name, r["policy"], r["prompt"]): r for r in records})
        del judge
        gc.collect()


# ----------------------------------------------------------------------------- the report


def collected(plan: Plan, args: EvaluateArguments, done: dict) -> alignment_report.Collected:
    """The journal's records in the report's shape. The reference policy's extra samples (for best-of-n) count in
    its sample scores and KL too: the same quantities, estimated from more samples."""
    names, judges, n = [s.name for s in plan.specs], [j for j, _ in plan.judges], len(plan.prompts)
    generations = {p: [done[("generation", p, i)] for i in range(n)] for p in names}
    kl_note = None
    if args.temperature != 1 or args.top_p != 1:
        kl_note = f"sampled at temperature {args.temperature}, top_p {args.top_p}: the estimate needs 1 and 1"
    elif not args.num_samples:
        kl_note = "no sampled responses (--num_samples 0)"
    reference_logp = {p: [g["logp"] if p == plan.reference else done.get(("reference", p, i), {}).get("logp", [])
                          for i, g in enumerate(generations[p])] for p in names}
    scores = {j: {p: [done[("scores", j, p, i)] for i in range(n)] for p in names} for j in judges}
    largest = plan.samples[plan.reference]
    best_of_n = [2 ** e for e in range(int(math.log2(largest)) + 1)] if largest else []
    return alignment_report.Collected(plan.prompts, names, plan.baseline, plan.reference, judges, plan.proxy,
                                      plan.proxy_reason, generations, reference_logp, scores, best_of_n, kl_note,
                                      args.seed)


def examples(plan: Plan, data: alignment_report.Collected) -> Dataset:
    rows = []
    for i, prompt in enumerate(plan.prompts):
        for p in data.policies:
            g = data.generations[p][i]
            rows.append({"prompt_id": i, "prompt": prompt, "policy": p, "response": g["greedy"],
                         "words": alignment_report.words(g["greedy"]), "truncated": g["greedy_truncated"],
                         "samples": g["samples"],
                         **{f"score_{j}": data.scores[j][p][i]["greedy"] for j in data.judges}})
    return Dataset.from_list(rows)


def finite(value):
    """JSON without NaN or infinities: such a figure is undefined, so null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def run_config(args: EvaluateArguments) -> dict:
    """What the manifest records and a resumed run (or the pipeline's skip check) must match."""
    return run_identity({"evaluate": dataclasses.asdict(args)})


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()
    config = run_config(args)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()
    plan = validate(args)
    device = pick_device()
    precision = stage_precision(args.precision, device, STAGE)
    logger.info("evaluating %d policies on %d prompts with %d judges (proxy: %s) -> %s", len(plan.specs),
                len(plan.prompts), len(plan.judges), plan.proxy or "none", output.output_dir)
    partial = output.open()
    journal_path = partial / "journal.jsonl"
    done = read_journal(journal_path, plan)
    with JournalWriter(journal_path) as journal:
        generate_all(plan, args, done, journal, precision, device)
        if args.temperature == 1 and args.top_p == 1:
            reference_logprobs(plan, args, done, journal, precision, device)
        score_all(plan, args, done, journal, precision, device)

    data = collected(plan, args, done)
    summary = finite(alignment_report.summarize(data))
    write_json_atomic(partial / "summary.json", summary)
    plots = alignment_report.plot(summary, partial / "plots")
    (partial / "report.md").write_text(alignment_report.markdown(summary, [str(p.relative_to(partial))
                                                                           for p in plots]))
    save_dataset_atomic(examples(plan, data), partial / "examples")
    inputs = {"dataset": args.dataset_name, **{f"judge_{name}": path for name, path in plan.judges},
              **{f"adapter_{s.name}_{n}": a for s in plan.specs for n, a in enumerate(adapter_chain(s.adapters))}}
    manifest = base_manifest(STAGE, config, inputs, {s.name: {"model": s.model, "adapters": adapter_chain(s.adapters)}
                                                     for s in plan.specs}, started)
    manifest["outputs"] = {"report": "report.md", "summary": "summary.json", "plots": "plots", "examples": "examples"}
    manifest["metrics"] = finite({
        "prompts": len(plan.prompts), "baseline": plan.baseline, "proxy": plan.proxy, "headline": summary["headline"],
        "win_rate": {j: {p: e["win_rate"]["win_rate"] for p, e in r["policies"].items() if "win_rate" in e}
                     for j, r in summary["judges"].items()},
        "lc_win_rate": {j: {p: e["length_controlled"]["lc_win_rate"] for p, e in r["policies"].items()
                            if "length_controlled" in e} for j, r in summary["judges"].items()},
        "kl": {p: (e["kl"] or {}).get("mean") for p, e in summary["policies"].items()}})
    manifest["finished"] = now_iso()
    final = output.publish(manifest, keep=["report.md", "summary.json", "examples"])
    for line in summary["headline"]:
        logger.info("%s", line)
    logger.info("report: %s", final / "report.md")
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
