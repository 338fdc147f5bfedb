"""`align push` against a local stand-in for the Hub (tests/hub_server.py), and the adapters' model cards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align import push as align_push
from align.core.command import StageError
from align.core.hub import check_push, push_stage_output, stage_output_for_push
from align.core.model_card import render_model_card
from align.core.outputs import read_manifest
from tests.conftest import DEMONSTRATIONS, ROOT
from tests.hub_server import FakeHub, route

TOKEN = "hf_pushTestToken_5eCr3t0123456789abcdef"
REPO = "align-team/tiny-sft"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def hub(tmp_path):
    with FakeHub(tmp_path / "hub", token=TOKEN) as server:
        yield server


@pytest.fixture
def online(monkeypatch, tmp_path):
    """This process may talk to a hub (the suite runs with HF_HUB_OFFLINE=1), with TOKEN as its credential."""
    from huggingface_hub import constants

    for variable in (*OFFLINE_VARIABLES, "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture(scope="module")
def sft_output(tmp_path_factory, tiny_model_path) -> Path:
    """A finished tiny SFT run (a few steps: only its outputs matter here)."""
    from align import sft

    out = tmp_path_factory.mktemp("push") / "sft"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft.main(["--config", str(ROOT / "configs" / "tiny" / "sft.yaml"), "--dataset_name", str(DEMONSTRATIONS),
                  "--output_dir", str(out), "--report_to", "none", "--max_steps", "4", "--save_steps", "4"])
    finally:
        torch.set_num_threads(threads)
    return out


def push(*args, token: str | None = TOKEN, home: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`align push ...` in a fresh interpreter, online, with only the credentials given here."""
    from align.cli import STAGES

    env = {k: v for k, v in os.environ.items()
           if k not in (*OFFLINE_VARIABLES, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(home), **(extra_env or {}))
    if token:
        env["HF_TOKEN"] = token
    assert "push" in STAGES
    return subprocess.run([sys.executable, "-m", "align.cli", "push", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def all_git_objects(hub: FakeHub, repo_id: str) -> bytes:
    """The content of every object in a repository: every version of every file, every commit message."""
    return hub.git(repo_id, "cat-file", "--batch-all-objects", "--batch")


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer("What does a reward model learn?", return_tensors="pt")).logits


# ----------------------------------------------------------------------------- the round trip


def test_push_round_trip(sft_output, hub, tmp_path, online, one_thread, tiny_model_path):
    """SFT output -> `align push` -> snapshot_download -> the same logits; private repo, card, no token anywhere."""
    from huggingface_hub import HfApi, snapshot_download
    from peft import PeftModel

    from align.lm.models import load_causal_lm, load_tokenizer

    result = push(sft_output, "--repo_id", REPO, "--hub_endpoint", hub.url, home=tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO}"
    assert TOKEN not in result.stdout + result.stderr

    # one commit on top of the repository's initial commit; only the endpoints the fake hub implements were used
    assert hub.repos[REPO].private
    assert hub.git(REPO, "rev-list", "--count", "HEAD").decode().strip() == "2"
    for method, path in hub.requests:
        route(method, path)
    assert ("DELETE", "/api/repos/delete") not in hub.requests
    assert TOKEN.encode() not in all_git_objects(hub, REPO)
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info(REPO).private is True

    snapshot = Path(snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "cache")))
    adapter = sft_output / "adapter"
    expected = {p.name for p in adapter.iterdir() if p.is_file()} | {"README.md", "manifest.json"}
    assert {p.name for p in snapshot.iterdir()} == expected
    assert (snapshot / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    manifest = read_manifest(sft_output)
    assert json.loads((snapshot / "manifest.json").read_text()) == manifest

    card = (snapshot / "README.md").read_text()
    metadata = front_matter(card)
    assert metadata["library_name"] == "peft" and metadata["pipeline_tag"] == "text-generation"
    assert {"align-rlhf", "sft", "lora"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["demonstrations"]
    assert "base_model" not in metadata and "license" not in metadata  # tiny-llama is not on the hub; no license given
    assert manifest["inputs"]["dataset"]["fingerprint"] in card and str(DEMONSTRATIONS) in card
    assert f"| eval_loss | {manifest['metrics']['eval_loss']:.4g} |" in card
    assert f'adapter = "{REPO}"' in card and "PeftModel.from_pretrained(base, adapter)" in card

    tokenizer = load_tokenizer(str(adapter))
    local = PeftModel.from_pretrained(load_causal_lm(tiny_model_path), str(adapter)).eval()
    remote = PeftModel.from_pretrained(load_causal_lm(tiny_model_path), str(snapshot)).eval()
    assert torch.equal(_logits(local, tokenizer), _logits(remote, tokenizer))


def test_push_to_an_existing_repository(sft_output, hub, online):
    """A second push is one more commit in the same repository; a public repository needs private=False."""
    url = push_stage_output(sft_output, REPO, endpoint=hub.url, commit_message="first")
    assert url == f"{hub.url}/{REPO}"
    push_stage_output(sft_output, REPO, endpoint=hub.url, license="apache-2.0")  # the card changes: a new commit
    assert hub.git(REPO, "log", "--format=%s").decode().split("\n")[:2] == [
        "Upload sft adapter (align-rlhf " + read_manifest(sft_output)["version"] + ")", "first"]
    assert hub.repos[REPO].private

    push_stage_output(sft_output, "align-team/public", endpoint=hub.url, private=False)
    assert not hub.repos["align-team/public"].private
    with pytest.raises(StageError, match="already exists and is public — pass --private false"):
        push_stage_output(sft_output, "align-team/public", endpoint=hub.url)


# ----------------------------------------------------------------------------- cards


def ppo_manifest() -> dict:
    return {
        "stage": "ppo", "version": "0.1.0", "finished": "2025-01-01T00:00:00+00:00",
        "config": {"args": {"total_steps": 20, "rollout_batch_size": 8, "lora_r": 8, "output_dir": "runs/ppo",
                            "hub_token": TOKEN},
                   "settings": {"init_kl_coef": 0.05, "ppo_epochs": 2}},
        "inputs": {"dataset": {"path": "runs/self_instruct", "fingerprint": "sha256:" + "a" * 64},
                   "ptx_dataset": {"path": "trl-lib/Capybara", "fingerprint": "name:trl-lib/Capybara"},
                   "reward_model": {"path": "runs/reward", "fingerprint": "sha256:" + "b" * 64},
                   "sft_adapter": {"path": "runs/sft", "fingerprint": "sha256:" + "c" * 64}},
        "depends_on": {"reward_model": "runs/reward", "sft_adapter": "runs/sft"},
        "base_model": {"name_or_path": "smollm2-135m-instruct", "resolved": "/cache/smollm2"},
        "metrics": {"reward_mean_last": 0.52, "kl_last": 0.013, "by_k": {"2": 0.7}, "steps": 20},
    }


def test_ppo_card_names_its_parents_and_merges_the_sft_adapter_first():
    card = render_model_card(ppo_manifest(), "align-team/smollm2-ppo", license="apache-2.0")
    metadata = front_matter(card)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"align-rlhf", "ppo", "lora", "rlhf"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["self_instruct", "trl-lib/Capybara"]  # the models are lineage, not datasets
    assert metadata["license"] == "apache-2.0"
    for fingerprint in ("a" * 64, "b" * 64, "c" * 64):
        assert fingerprint in card
    assert "SFT adapter (merged into the base model before training): `runs/sft`" in card
    assert "reward model (scored the sampled responses): `runs/reward`" in card
    assert "| by_k.2 | 0.7 |" in card and "| init_kl_coef | 0.05 |" in card
    merge = card.index("base = PeftModel.from_pretrained(base, sft_adapter).merge_and_unload()")
    assert merge < card.index("model = PeftModel.from_pretrained(base, adapter)")
    assert 'adapter = "align-team/smollm2-ppo"' in card and 'sft_adapter = "runs/sft"' in card
    assert TOKEN not in card and "hub_token" not in card


def test_ppo_card_snippet_runs(sft_output, one_thread):
    """The PPO card's load code, with the tiny base and the SFT adapter standing in for the PPO one, runs."""
    manifest = ppo_manifest()
    manifest["base_model"]["name_or_path"] = "tiny-llama"
    manifest["depends_on"]["sft_adapter"] = str(sft_output)
    manifest["config"]["args"]["output_dir"] = str(sft_output)  # the card points at <output_dir>/adapter
    card = render_model_card(manifest)
    code = card.split("```python\n")[-1].split("```")[0]
    assert f'sft_adapter = "{sft_output}/adapter"' in code and 'resolve_model("tiny-llama")' in code
    namespace: dict = {}
    exec(compile(code, "card", "exec"), namespace)  # noqa: S102 - our own generated snippet
    from peft import PeftModel

    assert isinstance(namespace["model"], PeftModel)


def test_reward_card_loads_a_sequence_classifier():
    manifest = {**ppo_manifest(), "stage": "reward", "depends_on": {"sft_adapter": "runs/sft"},
                "inputs": {"dataset": {"path": "runs/comparisons", "fingerprint": "sha256:" + "d" * 64}}}
    card = render_model_card(manifest, "align-team/rm")
    metadata = front_matter(card)
    assert metadata["pipeline_tag"] == "text-classification" and "reward-model" in metadata["tags"]
    assert metadata["datasets"] == ["comparisons"]
    assert "AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)" in card
    assert card.index("merge_and_unload()") < card.index("model = PeftModel.from_pretrained(model, adapter)")
    assert "`runs/sft` (fingerprint not recorded)" in card


# ----------------------------------------------------------------------------- failures


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", ["no token", "name refused", "server down", "commit fails", "not a stage output"])
def test_push_failures_leave_nothing(case, sft_output, hub, tmp_path):
    """Exit code 2, one line `error: push: ...` that says what to do, and no repository on the hub."""
    target, endpoint, token, expected = sft_output, hub.url, TOKEN, ""
    if case == "no token":
        token, expected = None, "no hub token — set HF_TOKEN or run `hf auth login`"
    elif case == "name refused":
        hub.refuse["align-team/tiny-sft"] = (403, "This token may not write to align-team")
        expected = "(403: This token may not write to align-team)"
    elif case == "server down":
        endpoint = f"http://127.0.0.1:{closed_port()}"
        expected = f"cannot reach the hub at {endpoint}"
    elif case == "commit fails":
        hub.fail_commits = True
        expected = "(500: Internal Error - the commit could not be stored)"
    else:
        target = tmp_path / "not-an-output"
        target.mkdir()
        expected = "has no manifest.json"
    result = push(target, "--repo_id", REPO, "--hub_endpoint", endpoint, token=token, home=tmp_path / "home")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: push: "), lines
    assert expected in lines[0]
    assert TOKEN not in result.stdout + result.stderr
    assert not hub.repos and not list(hub.root.rglob(".git"))
    if case == "commit fails":
        assert ("DELETE", "/api/repos/delete") in hub.requests  # created, then removed again


def test_preflight(hub, online, monkeypatch, tmp_path):
    """check_push catches, before any training, what would make the push fail at the end."""
    from huggingface_hub import constants

    check_push(REPO, hub.url)
    check_push("alice/mine", hub.url)
    with pytest.raises(StageError, match="'alice' cannot create repositories in 'someone-else'"):
        check_push("someone-else/x", hub.url)
    with pytest.raises(StageError, match="invalid --repo_id 'a--b/c'"):
        check_push("a--b/c", hub.url)
    down = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(StageError, match=f"cannot reach the hub at {down} "):
        check_push(REPO, down)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the endpoint comes from the environment when not given
    check_push(REPO)

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(StageError, match=r"refused the token \(401.*set a valid HF_TOKEN"):
        check_push(REPO, hub.url)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StageError, match="no hub token"):
        check_push(REPO, hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.role = "read"
    with pytest.raises(StageError, match="read-only"):
        check_push(REPO, hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError, match="HF_HUB_OFFLINE=1 is set"):
        check_push(REPO, hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StageError, match="offline mode is on"):
        check_push(REPO, hub.url)
    assert not hub.repos


def test_only_finished_training_outputs_are_pushed(sft_output, tmp_path):
    partial = tmp_path / "sft.partial"
    partial.mkdir()
    with pytest.raises(StageError, match=f"unfinished run .* then push {tmp_path / 'sft'}$"):
        stage_output_for_push(partial)
    comparisons = tmp_path / "comparisons"
    comparisons.mkdir()
    (comparisons / "manifest.json").write_text(json.dumps({"stage": "comparisons"}))
    with pytest.raises(StageError, match="a 'comparisons' output, which has no adapter"):
        stage_output_for_push(comparisons)
    (comparisons / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    with pytest.raises(StageError, match="lacks adapter_config.json, adapter_model.safetensors"):
        stage_output_for_push(comparisons)
    with pytest.raises(StageError, match="not found"):
        stage_output_for_push(tmp_path / "missing")
    path, manifest = stage_output_for_push(sft_output)
    assert path == sft_output and manifest["stage"] == "sft"


def test_command_line(tmp_path, capsys):
    """--help lists the options; a missing output directory is one line."""
    from align.push import cli

    result = push("--help", home=tmp_path)
    assert result.returncode == 0
    for option in ("--repo_id", "--hub_endpoint", "--private", "--commit_message", "--license"):
        assert option in result.stdout
    assert cli(["--repo_id", REPO]) == 2
    assert capsys.readouterr().err == "error: push: no stage output directory — usage: align push <output_dir> " \
        "--repo_id namespace/name\n"
    assert align_push._take_positional(["--private", "false", "runs/x", "--repo_id", "a/b"]) == (
        "runs/x", ["--private", "false", "--repo_id", "a/b"])
    assert align_push._take_positional(["--private", "runs/x"])[0] == "runs/x"


# ----------------------------------------------------------------------------- --push_to_hub on a training stage


def test_training_stage_pushes_when_asked(hub, tmp_path):
    """`align sft --push_to_hub` checks the hub before training and pushes the finished adapter; without a token
    it stops before any work, with one line and no output directory."""

    base = ["sft", "--config", "configs/tiny/sft.yaml", "--max_steps", "2", "--save_steps", "2", "--push_to_hub",
            "true", "--hub_model_id", "align-team/tiny-sft-stage", "--hub_endpoint", hub.url]
    env = {k: v for k, v in os.environ.items() if k not in (*OFFLINE_VARIABLES, "HF_TOKEN", "HF_ENDPOINT")}
    env.update(HF_HOME=str(tmp_path / "home"))

    refused = subprocess.run([sys.executable, "-m", "align.cli", *base, "--output_dir", str(tmp_path / "a")],
                             cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sft: cannot push to the hub:") and "HF_TOKEN" in lines[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()

    result = subprocess.run([sys.executable, "-m", "align.cli", *base, "--output_dir", str(tmp_path / "b")],
                            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "HF_TOKEN": TOKEN}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    repo = hub.repos["align-team/tiny-sft-stage"]
    assert repo.private
    files = set(hub.git("align-team/tiny-sft-stage", "ls-tree", "--name-only", "HEAD").decode().split())
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "manifest.json"} <= files
    manifest = read_manifest(tmp_path / "b")
    assert "push_to_hub" not in json.dumps(manifest["config"])  # where it was published is not what was trained
