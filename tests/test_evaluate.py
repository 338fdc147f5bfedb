"""`align evaluate` on tiny offline models: the report's figures agree with its own examples, the proxy judge is
found and kept out of the headline, PPO checkpoints load as policies, a killed run resumes without repeating
work, and bad inputs are one line with nothing on disk."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from align.core.outputs import read_manifest
from tests.conftest import DEMONSTRATIONS, ROOT, kill_after_journal_line, run_align


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny LM reward model (the proxy), an embedding judge, and a PPO run against the proxy that keeps its
    checkpoints and evaluates with both judges every 2 iterations."""
    from datasets import Dataset, DatasetDict

    from tests.test_reward import TINY, identifiable_comparisons

    tmp = tmp_path_factory.mktemp("evaluate")
    DatasetDict(train=Dataset.from_list(identifiable_comparisons(12, seed=1))).save_to_disk(str(tmp / "cmp"))
    steps = [
        ("reward", *TINY, "--dataset_name", tmp / "cmp", "--output_dir", tmp / "rm", "--max_steps", "2",
         "--per_device_train_batch_size", "2", "--eval_fraction", "0", "--max_length", "128"),
        ("reward", "--backbone", "embedding", "--dataset_name", tmp / "cmp", "--output_dir", tmp / "emb",
         "--eval_fraction", "0", "--judge_epochs", "50"),
        ("ppo", "--model_name_or_path", "tiny-llama", "--reward_model", tmp / "rm", "--dataset_name", DEMONSTRATIONS,
         "--output_dir", tmp / "ppo", "--total_steps", "4", "--rollout_batch_size", "4", "--mini_batch_size", "2",
         "--ppo_epochs", "1", "--max_new_tokens", "8", "--save_steps", "2", "--lora_r", "4", "--lora_alpha", "8",
         "--learning_rate", "1e-2", "--keep_checkpoints", "true", "--eval_prompts", "4", "--eval_steps", "2",
         "--eval_judges", f"gold={tmp / 'emb'}"),
    ]
    for args in steps:
        result = run_align(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    return {"rm": tmp / "rm", "ppo": tmp / "ppo", "emb": tmp / "emb", "tmp": tmp}


def evaluate_args(trained, out, **extra) -> list[str]:
    args = {"dataset_name": DEMONSTRATIONS, "dataset_split": "train", "max_prompts": "6", "num_samples": "2",
            "best_of_n": "4", "max_new_tokens": "12", "batch_size": "2", "output_dir": out, **extra}
    policies = ["base=tiny-llama", f"early=tiny-llama+{trained['ppo']}/checkpoints/checkpoint-2",
                f"ppo=tiny-llama+{trained['ppo']}"]
    judges = [f"proxy={trained['rm']}", f"gold={trained['emb']}"]
    flat = [part for key, value in args.items() for part in (f"--{key}", str(value))]
    return ["evaluate", *flat, "--policies", *policies, "--judges", *judges]


def strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path.name} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "eval"
    result = run_align(*evaluate_args(trained, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report: " in result.stderr and "gold: ppo wins" in result.stderr
    return out


def test_report_figures_agree_with_its_examples(report):
    from datasets import load_from_disk

    from align.rlhf.alignment_stats import win_rate

    summary = strict_json(report / "summary.json")
    assert summary["prompts"] == 6 and summary["baseline"] == "base" and summary["reference"] == "base"
    rows = load_from_disk(str(report / "examples")).to_list()
    assert len(rows) == 6 * 3 and {r["policy"] for r in rows} == {"base", "early", "ppo"}
    by = {(r["policy"], r["prompt_id"]): r for r in rows}
    for judge in ("proxy", "gold"):
        for policy in ("early", "ppo"):
            expected = win_rate([by[(policy, i)][f"score_{judge}"] for i in range(6)],
                                [by[("base", i)][f"score_{judge}"] for i in range(6)])
            got = summary["judges"][judge]["policies"][policy]["win_rate"]
            assert got["win_rate"] == pytest.approx(expected["win_rate"])
            assert got["wins"] + got["ties"] + got["losses"] == 6
        scores = [by[("ppo", i)]["score_gold"] for i in range(6)]
        assert summary["judges"]["gold"]["policies"]["ppo"]["score"]["mean"] == pytest.approx(sum(scores) / 6)
    words = [len(by[("ppo", i)]["response"].split()) for i in range(6)]
    assert summary["policies"]["ppo"]["mean_words"] == pytest.approx(sum(words) / 6)
    assert summary["policies"]["base"]["kl"]["mean"] == 0.0  # the reference against itself
    assert all(summary["policies"][p]["kl"]["mean"] is not None for p in ("early", "ppo"))
    curve = summary["judges"]["gold"]["best_of_n"]
    assert [p["n"] for p in curve] == [1, 2, 4] and curve[0]["kl"] == 0.0


def test_proxy_is_read_from_the_ppo_run_and_kept_out_of_the_headline(report, trained):
    summary = strict_json(report / "summary.json")
    assert summary["proxy"] == "proxy" and summary["gold_judges"] == ["gold"]
    assert summary["headline"] and all(line.startswith("gold: ") for line in summary["headline"])
    text = (report / "report.md").read_text()
    assert "Proxy judge: **proxy**" in text and "## Judge `proxy` (proxy" in text
    assert all((report / "plots" / name).stat().st_size > 1000 for name in ("score_vs_sqrt_kl.png", "win_rates.png"))
    manifest = read_manifest(report)
    assert manifest["stage"] == "evaluate" and manifest["metrics"]["proxy"] == "proxy"
    assert str(trained["ppo"]) in json.dumps(manifest["base_model"])
    # the PPO output and its checkpoint bring in nothing else here (no SFT adapter): one adapter each
    assert [len(v["adapters"]) for v in manifest["base_model"].values()] == [0, 1, 1]


def test_ppo_checkpoint_loads_as_the_policy_it_was(trained):
    """checkpoint-4 of a 4-step run is the finished policy: same logits."""
    from align.lm.models import resolve_model
    from align.lm.policies import load_policy
    from align.lm.precision import choose_precision

    fp32, path = choose_precision("fp32"), resolve_model("tiny-llama")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    final = load_policy(path, [str(trained["ppo"])], fp32)(ids).logits
    checkpoint = load_policy(path, [str(trained["ppo"] / "checkpoints" / "checkpoint-4")], fp32)(ids).logits
    base = load_policy(path, [], fp32)(ids).logits
    assert torch.allclose(final, checkpoint, atol=1e-5)
    assert not torch.allclose(final, base, atol=1e-4)  # PPO changed the policy


def test_ppo_logs_every_judge_and_keeps_the_evaluated_policies(trained):
    from align.lm.models import resolve_model
    from align.lm.policies import adapter_chain, load_policy
    from align.lm.precision import choose_precision
    from align.rlhf.judges import optimised_against

    ppo = trained["ppo"]
    records = [json.loads(line) for line in (ppo / "logs" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(isinstance(r["proxy"], float) and isinstance(r["judges"]["gold"], float) for r in records)
    assert records[0]["kl"] is None and all(isinstance(r["kl"], float) for r in records[1:])
    metrics = read_manifest(ppo)["metrics"]
    assert metrics["eval_reward_before"] == records[0]["proxy"] and metrics["eval_reward_after"] == records[-1]["proxy"]
    assert metrics["eval_judges"] == {"before": records[0]["judges"], "after": records[-1]["judges"]}
    assert sorted(p.name for p in (ppo / "eval_adapters").iterdir()) == ["step-2", "step-4"]
    assert list((ppo / "logs" / "tensorboard").iterdir())
    # an evaluated step is a policy for `align evaluate`: the run's reward model is known, and step 4 is the end
    step = str(ppo / "eval_adapters" / "step-4")
    assert adapter_chain([step]) == [step] and optimised_against([step]) == [str(trained["rm"])]
    fp32, path, ids = choose_precision("fp32"), resolve_model("tiny-llama"), torch.tensor([[5, 17, 42, 99, 3]])
    assert torch.allclose(load_policy(path, [step], fp32)(ids).logits, load_policy(path, [str(ppo)], fp32)(ids).logits,
                          atol=1e-5)


def test_response_logprobs_are_those_of_each_sequence_alone(tiny_model_path, one_thread):
    """Left padding and position ids: in a batch, each response's log-probability is what the model gives the
    sequence on its own."""
    from align.lm.generation import response_logprobs
    from align.lm.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    texts = ["a much longer prompt than the other one, padded on the left\n", "short\n"]
    responses = ["first answer", "a second, longer answer here"]
    batched = response_logprobs(model, tokenizer, texts, responses, [True, False], batch_size=2)
    for text, response, ended, got in zip(texts, responses, [True, False], batched, strict=True):
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(response, add_special_tokens=False)["input_ids"]
        answer += [model.generation_config.eos_token_id or tokenizer.eos_token_id] if ended else []
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0].float()
        log_probs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        alone = float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum())
        assert got == pytest.approx(alone, abs=1e-3)


def test_killed_run_resumes_and_repeats_nothing(trained, report, tmp_path):
    out = tmp_path / "eval"
    journal = tmp_path / "eval.partial" / "journal.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill_after_journal_line(evaluate_args(trained, out), journal, tmp_path / "first.log", env, lines=2)
    assert not out.exists() and journal.exists()
    second = run_align(*evaluate_args(trained, out))
    assert second.returncode == 0, second.stderr[-3000:]
    kinds = [json.loads(line)["kind"] for line in (out / "journal.jsonl").read_text().splitlines()]
    # one record per policy and prompt for generations and per judge too; the reference needs the other two's
    assert (kinds.count("generation"), kinds.count("reference"), kinds.count("scores")) == (18, 12, 36)
    assert strict_json(out / "summary.json") == strict_json(report / "summary.json")  # same as never killed


@pytest.mark.parametrize("change, message", [
    ({"baseline": "nobody"}, "--baseline nobody is not one of the policies"),
    ({"judges": "x={ppo}"}, "judge x: {ppo} is not a finished `align reward` output"),
    ({"dataset_name": "{empty}"}, "holds no rows"),
    ({"policies": "a=tiny-llama+/nonexistent/adapter"}, "no adapter at /nonexistent/adapter"),
    ({"proxy": "other"}, "--proxy other is not one of the judges"),
])
def test_bad_inputs_are_one_line_and_leave_nothing(trained, tmp_path, change, message):
    from datasets import Dataset, DatasetDict

    empty = tmp_path / "empty"
    DatasetDict(train=Dataset.from_dict({"prompt": []})).save_to_disk(str(empty))
    out = tmp_path / "eval"
    args = evaluate_args(trained, out)
    for key, value in change.items():
        value = value.format(ppo=trained["ppo"], empty=empty)
        if f"--{key}" in args:
            position = args.index(f"--{key}") + 1
            end = next((i for i in range(position, len(args)) if args[i].startswith("--")), len(args))
            args[position:end] = [value]
        else:
            args += [f"--{key}", value]
    result = run_align(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("error: evaluate: ") and message.format(ppo=trained["ppo"]) in lines[-1]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "eval.partial").exists()


@pytest.mark.parametrize("extra, message", [
    (["--eval_judges", "gold={emb}"], "set --eval_prompts N too"),
    (["--eval_prompts", "2", "--eval_judges", "gold={ppo}"], "--eval_judges gold: {ppo} is not a finished"),
])
def test_ppo_eval_judges_bad_inputs_are_one_line(trained, tmp_path, extra, message):
    args = ["ppo", "--model_name_or_path", "tiny-llama", "--reward_model", trained["rm"], "--dataset_name",
            DEMONSTRATIONS, "--output_dir", tmp_path / "out", *[e.format(**trained) for e in extra]]
    result = run_align(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message.format(**trained) in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_ppo_with_the_value_head_on_the_policy_optimises_an_embedding_judge(trained, tmp_path):
    """`--value_model policy`: no value model of its own, so the reward can be an embedding judge; the run checkpoints
    the head beside the policy's LoRA, resumes from it, and its checkpoint loads as a policy for `align evaluate`."""
    out = tmp_path / "ppo"
    args = ["ppo", "--model_name_or_path", "tiny-llama", "--reward_model", trained["emb"], "--value_model", "policy",
            "--dataset_name", DEMONSTRATIONS, "--output_dir", out, "--rollout_batch_size", "4", "--mini_batch_size",
            "2", "--ppo_epochs", "1", "--max_new_tokens", "8", "--save_steps", "2", "--lora_r", "4", "--lora_alpha",
            "8", "--keep_checkpoints", "true", "--total_steps", "4"]
    checkpoint = tmp_path / "ppo.partial" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    kill_after_journal_line(args, checkpoint, tmp_path / "first.log", {**os.environ, "PYTHONPATH": str(ROOT)},
                            lines=0)
    second = run_align(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint-" in second.stderr
    manifest = read_manifest(out)
    assert manifest["config"]["data"]["value_model"] == "policy" and manifest["metrics"]["steps"] == 4
    weights = torch.load(out / "checkpoints" / "checkpoint-4" / "weights.pt", weights_only=True)
    assert {n for n in weights if n.startswith("value.")} == {"value.head.weight"}
    assert any(n.startswith("policy.") and "lora_" in n for n in weights)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["value_loss"]) for r in rows)
    assert read_manifest(out)["resumed_from"].startswith("checkpoint-")


@pytest.mark.parametrize("extra, message", [
    (["--reward_model", "{emb}"], "is an embedding judge; --value_model reward starts the value model"),
    (["--reward_model", "{rm}", "--value_model", "shared"], "--value_model 'shared': choose reward or policy"),
])
def test_ppo_value_model_bad_inputs_are_one_line(trained, tmp_path, extra, message):
    args = ["ppo", "--model_name_or_path", "tiny-llama", "--dataset_name", DEMONSTRATIONS, "--output_dir",
            tmp_path / "out", *[e.format(**trained) for e in extra]]
    result = run_align(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
