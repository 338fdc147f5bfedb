"""PPO against a reward model: the InstructGPT RL step, on transformers + peft (TRL no longer ships one).

Reads prompts (a `prompt` column, text or chat, or `messages` chats — e.g. an `align self-instruct`
output), an `align sft` output (`--sft_adapter`, merged into the base to start the policy) and an
`align reward` output (`--reward_model`: scores the responses, and with `--value_model reward`, the default,
starts the value model; `--value_model policy` puts a value head on the policy instead). Writes
`<output_dir>/adapter/` (the policy LoRA, loaded on top of the SFT-merged base; its model card names
the SFT adapter and reward model), `logs/` (metrics.jsonl, samples.jsonl, TensorBoard) and
`manifest.json` with the reward curve's ends. Checkpoints every `--save_steps` hold everything a
killed run needs to resume and reproduce the uninterrupted numbers. With `--eval_prompts N` it holds N
prompts out (written to `eval_prompts.jsonl`) and scores the greedy responses to them before and after;
`--eval_steps K --eval_judges NAME=<reward output>` also every K iterations and by every judge
(`logs/eval.jsonl`, the policy of each such step in `eval_adapters/step-K/`).

    align ppo --config configs/ppo.yaml        # SFT adapter + reward model + Self-Instruct prompts
    align ppo --config configs/tiny/ppo.yaml   # the tiny model, seconds
    torchrun --nproc_per_node 2 -m align.ppo --config configs/tiny/ppo.yaml     # two CPU processes
    accelerate launch --config_file configs/accelerate/ddp.yaml -m align.ppo --config configs/ppo.yaml

The loop is `align.rlhf.ppo_trainer.PPOTrainer`, its arithmetic `align.rlhf.ppo_math`; this module is
the stage around it: options, checks, the model set-up, the iteration loop with its checkpoints and
guards (NaN, `--max_kl`), and the output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import set_seed

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.hub import check_stage_push, push_after_stage
from align.core.inputs import load_stage_dataset, validate_columns
from align.core.model_card import write_model_card
from align.core.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range
from align.core.outputs import RunArguments, StageOutput, append_jsonl, base_manifest, read_manifest, run_identity
from align.core.resources import peak_resident_gb, resident_gb
from align.lm.models import (
    DEFAULT_MODEL,
    load_causal_lm,
    load_tokenizer,
    merge_adapter,
    pick_device,
    require_adapter,
    resolve_model,
)
from align.lm.precision import PRECISION_HELP, precision_problems, stage_precision
from align.lm.training import latest_checkpoint, truncate_history
from align.preferences.prompts import prompt_records
from align.rlhf.embedding_judge import EmbeddingJudge
from align.rlhf.judges import HeldOutEvaluation, judge_backbone, load_judge, parse_judges
from align.rlhf.ppo_trainer import (
    PolicyValueHead,
    PPOSettings,
    PPOTrainer,
    load_checkpoint,
    process_rank,
    prompt_order,
    save_checkpoint,
    value_model_from,
)
from align.rlhf.reward_model import RewardModelScorer, load_reward_model, prepare_for_scoring

STAGE = "ppo"
logger = logging.getLogger("align")


@dataclass
class PPOArguments(RunArguments):
    dataset_name: str = field(
        default="runs/self_instruct",
        metadata={"help": "Prompts: a dataset with a `prompt` column (text or chat) or `messages` chats (the turns "
                  "before the last reply), e.g. an `align self-instruct` output."},
    )
    dataset_split: str | None = field(default="train", metadata={"help": "Split of the prompts (None: all)."})
    model_name_or_path: str = field(
        default=DEFAULT_MODEL, metadata={"help": "Base model of the policy (the SFT stage's base)."}
    )
    sft_adapter: str | None = field(
        default=None, metadata={"help": "An `align sft` output: merged into the base to start the policy."}
    )
    reward_model: str = field(default="runs/reward", metadata={"help": "An `align reward` output directory."})
    value_model: str = field(
        default="reward", metadata={"help": "reward: a value model of its own, a copy of the reward model with a new "
                                    "LoRA (InstructGPT; an LM reward model only). policy: a value head on the policy's "
                                    "trunk: no second backbone, one forward and backward pass per minibatch instead "
                                    "of two, any reward output (an embedding judge too)."}
    )
    output_dir: str = field(default="runs/ppo", metadata={"help": "Where the finished stage output goes."})
    total_steps: int = field(default=20, metadata={"help": "PPO iterations (one rollout batch each)."})
    rollout_batch_size: int = field(default=8, metadata={"help": "Prompts sampled per iteration."})
    reward_max_length: int | None = field(
        default=512, metadata={"help": "Longest prompt + response the reward model reads (the prompt is cut first)."}
    )
    max_kl: float = field(
        default=50.0, metadata={"help": "Stop (keeping the last good checkpoint) when the mean KL per response "
                                "exceeds this many nats."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the policy and value adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules that get LoRA ('all-linear' or names)."}
    )
    ptx_dataset: str | None = field(
        default=None, metadata={"help": "PPO-ptx: chats (`messages`) or `text` whose language-modelling loss is "
                                "mixed in with weight --ptx_coef, e.g. the SFT data."}
    )
    ptx_max_length: int = field(default=256, metadata={"help": "PPO-ptx: longest sequence in tokens (cut at the end)."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP + " PPO keeps fp32 weights, optimizer "
                                                     "states, output layer, log-probs and losses."})
    save_steps: int = field(default=10, metadata={"help": "Checkpoint every N iterations (and at the end)."})
    eval_prompts: int = field(
        default=0, metadata={"help": "Hold out N prompts (seeded) from training and score the policy's greedy "
                             "responses to them with the reward model before the first and after the last "
                             "iteration (0: off)."}
    )
    eval_steps: int = field(
        default=0, metadata={"help": "Also evaluate on the held-out prompts every N iterations (0: only before and "
                             "after): logs/eval.jsonl and TensorBoard `eval/`, and the policy adapter of each such "
                             "step kept in eval_adapters/step-N/ for `align evaluate`."}
    )
    eval_judges: list[str] = field(
        default_factory=list, metadata={"help": "NAME=<align reward output>: judges that also score the held-out "
                                        "responses at each evaluation, beside the reward model PPO optimises — the "
                                        "over-optimisation curve (proxy rises, a gold judge turns down), live."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "When the stage has finished, push its adapter, model card and manifest to "
                                 "--hub_model_id (token and hub checked before training)."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "With --push_to_hub: 'namespace/name'."})
    hub_private_repo: bool = field(
        default=True, metadata={"help": "Create the hub repository private (the default); false: public."}
    )
    sample_steps: int = field(default=5, metadata={"help": "Log prompt/response/score samples every N iterations."})


CONFIG_CLASSES = (PPOArguments, PPOSettings)
# Checked by `parse_config` with the shared rules of `align.core.options`, before any work.
OPTION_RULES = {
    "total_steps": AT_LEAST_ONE, "rollout_batch_size": AT_LEAST_ONE, "save_steps": AT_LEAST_ONE,
    "sample_steps": AT_LEAST_ONE, "eval_prompts": NON_NEGATIVE, "eval_steps": NON_NEGATIVE, "ppo_epochs": AT_LEAST_ONE,
    "mini_batch_size": AT_LEAST_ONE, "gamma": Range(0, 1), "lam": Range(0, 1), "clip_range": POSITIVE,
    "clip_range_value": POSITIVE, "vf_coef": NON_NEGATIVE, "entropy_coef": NON_NEGATIVE,
    "init_kl_coef": NON_NEGATIVE, "target_kl": POSITIVE, "kl_horizon": AT_LEAST_ONE, "max_kl": POSITIVE,
    "missing_eos_penalty": Range(), "ptx_coef": NON_NEGATIVE, "ptx_batch_size": AT_LEAST_ONE,
    "ptx_max_length": Range(2), "reward_max_length": AT_LEAST_ONE,
}


def hold_out_prompts(prompts: list, count: int, seed: int) -> tuple[list, list]:
    """(training prompts, `count` held-out prompts): a seeded choice, the training prompts in their order."""
    if count <= 0:
        return prompts, []
    if count >= len(prompts):
        raise StageError(STAGE, f"--eval_prompts {count} leaves no training prompts out of {len(prompts)} — "
                         "hold out fewer")
    chosen = set(torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return ([p for i, p in enumerate(prompts) if i not in chosen], [p for i, p in enumerate(prompts) if i in chosen])


def held_out_reward(trainer: PPOTrainer, prompts: list, cache: Path | None, batch_size: int = 8) -> float | None:
    """Mean reward of the policy's greedy responses to the held-out prompts. With `cache`, measured once per run
    and kept in the working directory, so a resumed run reports the reward of the policy it started from."""
    if not prompts:
        return None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())["reward"]
    scores = trainer.evaluate(prompts, batch_size)
    reward = sum(scores) / len(scores)
    if cache is not None:
        cache.write_text(json.dumps({"reward": reward, "scores": scores}))
    return reward


def option_problems(args: PPOArguments, settings: PPOSettings) -> list[str]:
    """What the option ranges (`OPTION_RULES`) cannot say: which options go together."""
    problems = precision_problems(args.precision)
    if settings.ptx_coef > 0 and not args.ptx_dataset:
        problems.append("--ptx_coef > 0 needs --ptx_dataset (the text whose language-modelling loss is mixed in)")
    if (args.eval_steps or args.eval_judges) and not args.eval_prompts:
        problems.append("--eval_steps and --eval_judges evaluate on held-out prompts: set --eval_prompts N too")
    return problems


def reward_backbone(args: PPOArguments) -> str:
    return read_manifest(args.reward_model).get("config", {}).get("model", {}).get("backbone", "lm")


def check_inputs(args: PPOArguments) -> None:
    """The reward model and the SFT adapter exist, before anything is loaded."""
    reward_manifest = Path(args.reward_model) / "manifest.json"
    if not reward_manifest.exists() or read_manifest(args.reward_model).get("stage") != "reward":
        raise StageError(STAGE, f"no reward model at {args.reward_model} — pass an `align reward` output directory")
    if args.value_model not in ("reward", "policy"):
        raise StageError(STAGE, f"--value_model {args.value_model!r}: choose reward or policy")
    if args.value_model == "reward" and reward_backbone(args) != "lm":
        raise StageError(STAGE, f"{args.reward_model} is an embedding judge; --value_model reward starts the value "
                         "model from the reward model, so it needs an `align reward --backbone lm` output — or pass "
                         "--value_model policy")
    if judge_backbone(args.reward_model) is None:
        raise StageError(STAGE, f"{args.reward_model} is not a finished `align reward` output (its adapter or judge "
                         "is missing) — train it again")
    if args.sft_adapter:
        require_adapter(args.sft_adapter, STAGE)
    for name, path in parse_judges(args.eval_judges, STAGE) if args.eval_judges else []:
        if judge_backbone(path) is None:
            raise StageError(STAGE, f"--eval_judges {name}: {path} is not a finished `align reward` output")


def ptx_sequences(args: PPOArguments, tokenizer) -> list[list[int]]:
    """Token ids of the PPO-ptx data: chats through the chat template, or a `text` column."""
    data = load_stage_dataset(args.ptx_dataset, STAGE)
    split = "train" if "train" in data else next(iter(data))
    columns = data[split].column_names
    if "messages" in columns:
        validate_columns(data, STAGE, {"messages": "messages"}, splits=[split])
        texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in data[split]["messages"]]
    elif "text" in columns:
        validate_columns(data, STAGE, {"text": "text"}, splits=[split])
        texts = list(data[split]["text"])
    else:
        raise StageError(STAGE, f"--ptx_dataset {args.ptx_dataset} has no `messages` or `text` column (found: "
                         f"{', '.join(columns)}) — pass SFT chats or plain text")
    sequences = [ids[:args.ptx_max_length] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [ids for ids in sequences if len(ids) > 1]


def build_trainer(args: PPOArguments, settings: PPOSettings, accelerator=None) -> tuple[PPOTrainer, str]:
    """Policy (base + merged SFT adapter + new LoRA), value model (reward model + new LoRA, or a head on the
    policy), scorer."""
    model_path = resolve_model(args.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    device = accelerator.device if accelerator is not None else torch.device(pick_device())
    precision = stage_precision(args.precision, device.type, STAGE)
    base = load_causal_lm(model_path, dtype=torch.float32, stage=STAGE)
    if args.sft_adapter:
        base = merge_adapter(base, args.sft_adapter, stage=STAGE)
    targets = args.lora_target_modules[0] if args.lora_target_modules == ["all-linear"] else args.lora_target_modules
    policy = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM")).to(device)
    if reward_backbone(args) == "embedding":
        scorer = EmbeddingJudge.from_output(args.reward_model, device=device.type)
    else:
        reward, reward_tokenizer, reward_manifest = load_reward_model(args.reward_model, dtype=torch.float32)
        metrics = reward_manifest.get("metrics", {})
        # The reward model is frozen: under bf16 its weights are cast once (half the memory, no per-call casts).
        scorer = RewardModelScorer(prepare_for_scoring(reward, precision, device), reward_tokenizer,
                                   float(metrics.get("reward_mean", 0.0)), float(metrics.get("reward_std", 1.0)),
                                   args.reward_max_length)
    if args.value_model == "policy":
        value = PolicyValueHead(base.config.hidden_size).to(device)
    else:
        value_base, _, _ = load_reward_model(args.reward_model, dtype=torch.float32)  # trained: fp32 master weights
        value = value_model_from(value_base.merge_and_unload(), args.lora_r, args.lora_alpha, args.lora_dropout,
                                 targets).to(device)
    ptx = ptx_sequences(args, tokenizer) if args.ptx_dataset and settings.ptx_coef > 0 else None
    return PPOTrainer(policy, value, tokenizer, scorer, settings, ptx, accelerator, precision), model_path


def run_config(args: PPOArguments, settings: PPOSettings) -> dict:
    """What the manifest records and a resumed run must match: every option except what to do with existing
    directories and where to publish the adapter."""
    return run_identity({"data": dataclasses.asdict(args), "ppo": dataclasses.asdict(settings)})


def main(argv: list[str] | None = None) -> Path:
    args, settings = parse_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()
    check_inputs(args)
    config = run_config(args, settings)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()
    check_stage_push(STAGE, args.push_to_hub, args.hub_model_id, args.hub_endpoint)
    records = prompt_records(load_stage_dataset(args.dataset_name, STAGE), args.dataset_split, "output",
                                       need_reference=False, stage=STAGE)
    prompts, held_out = hold_out_prompts([record["prompt"] for record in records], args.eval_prompts, settings.seed)
    if len(prompts) < args.rollout_batch_size:
        logger.warning("%d prompts for a rollout batch of %d: prompts repeat within a batch", len(prompts),
                       args.rollout_batch_size)

    # One process, or several under `accelerate launch` / `torchrun` (DDP; gloo on CPUs).
    # mixed_precision "no": PPOTrainer applies --precision itself; an `accelerate launch` setting must not add its own.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    if args.rollout_batch_size % world:
        raise StageError(STAGE, f"--rollout_batch_size {args.rollout_batch_size} must be a multiple of the "
                         f"{world} processes (each samples an equal share)")
    set_seed(settings.seed)  # the same initial adapters on every rank
    trainer, model_path = build_trainer(args, settings, accelerator)
    set_seed(settings.seed + accelerator.process_index)  # but different samples
    partial = output.open(is_main_process=is_main)
    if is_main and held_out:  # the prompts no update saw: `align evaluate --dataset_name <output>/eval_prompts.jsonl`
        (partial / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held_out))
    accelerator.wait_for_everyone()
    checkpoints = partial / "checkpoints"
    resume_from = latest_checkpoint(checkpoints, remove_incomplete=is_main)
    metrics_path, samples_path = partial / "logs" / "metrics.jsonl", partial / "logs" / "samples.jsonl"
    if resume_from is not None:
        load_checkpoint(resume_from, trainer)
        logger.info("resuming from %s (step %d)", resume_from.name, trainer.step_count)
    else:
        logger.info("PPO on %d prompts -> %s", len(prompts), output.output_dir)
    evaluation = None
    if is_main and (args.eval_steps or args.eval_judges):
        judges = [load_judge(name, path, trainer.precision, trainer.device.type, args.rollout_batch_size, STAGE)
                  for name, path in (parse_judges(args.eval_judges, STAGE) if args.eval_judges else [])]
        evaluation = HeldOutEvaluation(held_out, judges, partial / "logs" / "eval.jsonl", partial / "eval_adapters",
                                       args.rollout_batch_size)
    if is_main:  # what was logged after the checkpoint (or by an attempt without one) is logged again
        for path in (metrics_path, samples_path, partial / "logs" / "eval.jsonl"):
            truncate_history(path, trainer.step_count)
    if evaluation is not None and 0 not in evaluation.logged_steps():
        evaluation(trainer, 0)
    before = (held_out_reward(trainer, held_out, partial / "logs" / "eval_before.json", args.rollout_batch_size)
              if is_main and evaluation is None else None)
    sampled = run_loop(trainer, args, prompts, checkpoints, metrics_path, samples_path, resume_from, evaluation)
    logger.info("rank %d/%d sampled %d prompts in this run", accelerator.process_index, world, sampled)
    accelerator.wait_for_everyone()
    if not is_main:
        return output.output_dir
    if evaluation is not None:  # the first and last evaluations
        records = [json.loads(line) for line in evaluation.log.read_text().splitlines()]
        before, after = records[0]["proxy"], records[-1]["proxy"]
    else:
        after = held_out_reward(trainer, held_out, None, args.rollout_batch_size)

    adapter = partial / "adapter"
    trainer.policy.save_pretrained(str(adapter))
    trainer.tokenizer.save_pretrained(str(adapter))
    inputs = {"dataset": args.dataset_name, "reward_model": args.reward_model,
              **({"sft_adapter": args.sft_adapter} if args.sft_adapter else {})}
    manifest = base_manifest(STAGE, config, inputs, {"name_or_path": args.model_name_or_path, "resolved": model_path},
                             started)
    manifest["outputs"] = {"adapter": "adapter", "logs": "logs",
                           **({"eval_prompts": "eval_prompts.jsonl"} if held_out else {}),
                           **({"eval_adapters": "eval_adapters"} if (partial / "eval_adapters").exists() else {})}
    manifest["depends_on"] = {"reward_model": args.reward_model,
                              **({"sft_adapter": args.sft_adapter} if args.sft_adapter else {})}
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    manifest["metrics"] = summarize(history)
    if held_out:
        manifest["metrics"].update(eval_prompts=len(held_out), eval_reward_before=before, eval_reward_after=after)
        if evaluation is not None:
            manifest["metrics"]["eval_judges"] = {"before": records[0]["judges"], "after": records[-1]["judges"]}
        logger.info("reward of greedy responses to %d held-out prompts: %.3f (SFT policy) -> %.3f (after PPO)",
                    len(held_out), before, after)
    manifest["resumed_from"] = resume_from.name if resume_from else None
    manifest["world_size"] = world
    manifest["finished"] = now_iso()
    write_model_card(adapter, manifest)
    if not args.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    final = output.publish(manifest, keep=["adapter"])
    if args.push_to_hub:
        push_after_stage(STAGE, final, args.hub_model_id, args.hub_endpoint, private=args.hub_private_repo)
    return final


def run_loop(trainer: PPOTrainer, args: PPOArguments, prompts: list, checkpoints: Path, metrics_path: Path,
             samples_path: Path, last_good: Path | None = None, evaluation: HeldOutEvaluation | None = None) -> int:
    """Iterations from the trainer's current step to total_steps: log, sample, evaluate, checkpoint, guard.
    Returns how many prompts this rank sampled."""
    rank, is_main = process_rank(trainer)
    world = trainer.accelerator.num_processes if trainer.accelerator is not None else 1
    writer = SummaryWriter(str(metrics_path.parent / "tensorboard")) if is_main else None
    sampled = 0
    with tqdm(total=args.total_steps, initial=trainer.step_count, desc="ppo", unit="step",
              disable=not is_main) as progress:
        while trainer.step_count < args.total_steps:
            indices = prompt_order(trainer.step_count, args.rollout_batch_size, len(prompts), trainer.settings.seed)
            batch = [prompts[i] for i in indices[rank::world]]  # this rank's share
            started = time.perf_counter()
            try:
                stats, rollout = trainer.step(batch)
                sampled += len(batch)
            except FloatingPointError as exc:
                raise StageError(STAGE, f"{exc} — stopped; last good checkpoint: {last_good or 'none'}; lower "
                                 "--learning_rate or raise --init_kl_coef") from None
            step = trainer.step_count
            if stats["kl"] > args.max_kl:
                raise StageError(STAGE, f"mean KL {stats['kl']:.1f} nats exceeded --max_kl {args.max_kl} at step "
                                 f"{step}; last good checkpoint: {last_good or 'none'} — raise --init_kl_coef, set "
                                 "--target_kl, or lower --learning_rate")
            stats["seconds"] = round(time.perf_counter() - started, 2)
            stats["rss_gb"] = resident_gb()  # a run that grows step after step shows here
            if is_main:
                append_jsonl(metrics_path, {"step": step, "prompts": indices, **stats})
                for key, value in stats.items():
                    if value is None:
                        continue
                    writer.add_scalar(f"ppo/{key}", value, step)
            if is_main and (step % args.sample_steps == 0 or step == args.total_steps):
                for prompt, response, score in list(zip(batch, rollout.responses, rollout.scores.tolist(),
                                                        strict=True))[:2]:
                    append_jsonl(samples_path, {"step": step, "prompt": prompt, "response": response, "score": score})
            if evaluation is not None and (step == args.total_steps or args.eval_steps and step % args.eval_steps == 0):
                evaluation(trainer, step, stats["kl"], writer)  # before the checkpoint: a kill here redoes it
            if step % args.save_steps == 0 or step == args.total_steps:
                last_good = save_checkpoint(checkpoints, trainer)
            progress.update(1)
            progress.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}")
    if writer is not None:
        writer.close()
    return sampled


def summarize(history: list[dict]) -> dict:
    """Manifest metrics: the reward curve's ends (first/last five iterations) and the final KL and beta."""
    if not history:
        return {}
    head, tail = history[:5], history[-5:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    timed = [r for r in history if r.get("seconds") is not None]
    return {"steps": history[-1]["step"], "score_first": mean(head, "score_mean"),
            "score_last": mean(tail, "score_mean"), "kl_last": mean(tail, "kl"), "beta_last": history[-1]["beta"],
            "response_length_last": mean(tail, "response_length"),
            "seconds_per_step": round(mean(timed, "seconds"), 2) if timed else None,
            "rss_gb_first": history[0].get("rss_gb"), "rss_gb_last": history[-1].get("rss_gb"),
            "peak_rss_gb": peak_resident_gb()}


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
