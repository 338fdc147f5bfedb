"""Pushing a finished stage output to a model hub, through `huggingface_hub`, in one atomic commit.

`push_stage_output` uploads the adapter of an `align sft`, `align reward` or `align ppo` output (weights,
adapter config, tokenizer, the model card re-rendered with the repository id) and the stage's
manifest.json; a repository created by a failing push is deleted again. `check_stage_push` is a training
stage's preflight before any training, `push_after_stage` its push once the output is published. The
token comes from HF_TOKEN or a stored `hf auth login`, never from a flag, and is never uploaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from align.core.command import StageError, package_version
from align.core.model_card import render_model_card
from align.core.outputs import MANIFEST, PARTIAL_SUFFIX, strip_secrets

STAGE = "push"  # the label of this module's errors; training stages re-label them
TRAINING_STAGES = ("sft", "reward", "ppo")
logger = logging.getLogger("align")

# ----------------------------------------------------------------------------- pushing


def hub_endpoint(endpoint: str | None = None) -> str:
    """The hub to talk to: the argument, else $HF_ENDPOINT, else the library's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _hub_error(exc: BaseException, action: str, endpoint: str, repo_id: str) -> StageError:
    """A StageError, in one line that says how to fix it, for a failed hub call."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
    if isinstance(exc, OfflineModeIsEnabled):
        return StageError(STAGE, "offline mode is on (HF_HUB_OFFLINE) — unset HF_HUB_OFFLINE to push")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        detail = _one_line(exc.server_message or str(exc).strip().splitlines()[0])
        if status == 401:
            return StageError(STAGE, f"the hub at {endpoint} refused the token (401: {detail}) — set a valid "
                              "HF_TOKEN or run `hf auth login`")
        if status == 403:
            return StageError(STAGE, f"the hub refused to {action} {repo_id} (403: {detail}) — check that your token "
                              f"has write access to '{namespace}', or choose another --repo_id")
        if status in (400, 409, 422) and action == "create":
            return StageError(STAGE, f"the hub refused the repository name {repo_id} ({status}: {detail}) — choose "
                              "another --repo_id")
        return StageError(STAGE, f"could not {action} {repo_id} on {endpoint} ({status}: {detail}) — try again "
                          "later; nothing was pushed")
    if isinstance(exc, httpx2.TransportError):
        return StageError(STAGE, f"cannot reach the hub at {endpoint} ({type(exc).__name__}) — check --hub_endpoint "
                          "/ HF_ENDPOINT and the network")
    return StageError(STAGE, f"could not {action} {repo_id} on {endpoint}: {_one_line(exc) or type(exc).__name__}")


def _api(endpoint: str, token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="align-rlhf", library_version=package_version())


def check_push(repo_id: str, endpoint: str | None = None) -> None:
    """Preflight for pushing to `repo_id`, cheap enough to run before training: the id is well formed,
    a token is available, offline mode is off, and the hub accepts the token and lets it write to the
    namespace. Raises StageError("push", ...) with a one-line fix otherwise."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise StageError(STAGE, f"invalid --repo_id {repo_id!r}: {_one_line(exc)} — use 'namespace/name'") from None
    endpoint = hub_endpoint(endpoint)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            raise StageError(STAGE, f"{variable}={os.environ[variable]} is set, so nothing can reach the hub — "
                             f"unset {variable} for the push")
    if constants.is_offline_mode():
        raise StageError(STAGE, "offline mode is on (HF_HUB_OFFLINE) — unset HF_HUB_OFFLINE for the push")
    token = get_token()
    if not token:
        raise StageError(STAGE, "no hub token — set HF_TOKEN or run `hf auth login`")
    try:
        identity = _api(endpoint, token).whoami()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a one-line StageError
        raise _hub_error(exc, "check the token for", endpoint, repo_id) from None
    role = (identity.get("auth", {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise StageError(STAGE, f"the token of '{identity.get('name')}' is read-only — use a token with write access "
                         "(HF_TOKEN or `hf auth login`)")
    orgs = identity.get("orgs")
    if "/" in repo_id and isinstance(orgs, list):
        namespace = repo_id.split("/")[0]
        allowed = {identity.get("name"), *(org.get("name") for org in orgs if isinstance(org, dict))}
        if namespace not in allowed:
            raise StageError(STAGE, f"'{identity.get('name')}' cannot create repositories in '{namespace}' (not a "
                             f"member; namespaces: {', '.join(sorted(n for n in allowed if n))}) — choose another "
                             "--repo_id")


def stage_output_for_push(output_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(path, manifest) of a finished training stage output; a StageError for anything else."""
    path = Path(output_dir).expanduser()
    hint = "push a finished `align sft`, `align reward` or `align ppo` output directory"
    if path.name.endswith(PARTIAL_SUFFIX):
        raise StageError(STAGE, f"{path} is an unfinished run — let the stage finish (re-running its command "
                         f"resumes it), then push {path.with_name(path.name[: -len(PARTIAL_SUFFIX)])}")
    if not path.is_dir():
        raise StageError(STAGE, f"{path} not found — {hint}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StageError(STAGE, f"{path} has no {MANIFEST}, so it is not a finished stage output — {hint}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(STAGE, f"{path / MANIFEST} is unreadable ({_one_line(exc)}) — {hint}") from None
    stage = manifest.get("stage") if isinstance(manifest, dict) else None
    if stage not in TRAINING_STAGES:
        raise StageError(STAGE, f"{path} is a '{stage}' output, which has no adapter — {hint}")
    adapter = path / "adapter"
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / name).is_file()]
    if missing:
        raise StageError(STAGE, f"{adapter} lacks {', '.join(missing)} — {hint}")
    return path, manifest


def _operations(path: Path, manifest: dict, repo_id: str, license: str | None, token: str) -> list:
    """The commit: adapter/ files at the repo root (README.md re-rendered for `repo_id`) + manifest.json."""
    from huggingface_hub import CommitOperationAdd

    manifest = strip_secrets(manifest)
    contents: dict[str, bytes] = {}
    adapter = path / "adapter"
    for file in sorted(p for p in adapter.rglob("*") if p.is_file()):
        contents[file.relative_to(adapter).as_posix()] = file.read_bytes()
    contents["README.md"] = render_model_card(manifest, repo_id, license=license).encode()
    contents[MANIFEST] = (json.dumps(manifest, indent=2, default=str) + "\n").encode()
    for name, data in contents.items():
        if token.encode() in data:
            raise StageError(STAGE, f"the hub token appears in {name} — remove it from the output before pushing")
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in contents.items()]


def push_stage_output(output_dir: str | os.PathLike, repo_id: str, *, endpoint: str | None = None,
                      private: bool = True, commit_message: str | None = None, license: str | None = None) -> str:
    """Push a finished training stage's adapter and manifest to `repo_id` in one commit; returns the repo URL.

    A new repository is created private unless `private=False`; an existing one keeps its visibility (and
    pushing to an existing public repository needs `private=False`). If the repository was created by this
    call and the commit fails, it is deleted again, so a failed push leaves nothing behind.

    Raises:
        StageError: ("push", one line saying how to fix it) for a directory that is not a finished training
            output, a missing token, offline mode, an unreachable hub, a refused name or token, a failed commit.
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    path, manifest = stage_output_for_push(output_dir)
    check_push(repo_id, endpoint)
    endpoint = hub_endpoint(endpoint)
    token = get_token()
    api = _api(endpoint, token)
    operations = _operations(path, manifest, repo_id, license, token)
    stage = manifest["stage"]

    created = False
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=False))
        created = True
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise _hub_error(exc, "create", endpoint, repo_id) from None
        url = f"{endpoint}/{repo_id}"
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, "create", endpoint, repo_id) from None
    if not created:  # an existing repository: never turn a private push into a public one
        try:
            existing = api.model_info(repo_id)
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(exc, "read", endpoint, repo_id) from None
        if private and not existing.private:
            raise StageError(STAGE, f"{repo_id} already exists and is public — pass --private false to push to it "
                             "anyway, or choose another --repo_id")

    message = commit_message or f"Upload {stage} adapter (align-rlhf {manifest.get('version', '')})"
    try:
        commit = api.create_commit(
            repo_id, operations, commit_message=message,
            commit_description=f"Trained by the `{stage}` stage of align-rlhf; lineage in README.md and {MANIFEST}.",
        )
    except BaseException as exc:
        if created:
            try:
                api.delete_repo(repo_id, missing_ok=True)
            except Exception:  # noqa: BLE001 - best effort: the commit error is what the user needs to see
                logger.debug("could not delete %s after the failed commit", repo_id)
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, ValueError) and "metadata" in str(exc):
            raise StageError(STAGE, f"the hub rejected the model card's metadata ({_one_line(exc)})") from None
        raise _hub_error(exc, "push to", endpoint, repo_id) from None
    logger.info("pushed %d files from %s to %s (%s, commit %s)", len(operations), path, repo_id,
                "new private repository" if created and private else "new public repository" if created
                else "existing repository", commit.oid[:12] if commit.oid else "?")
    return url


# ----------------------------------------------------------------------------- from a training stage


def check_stage_push(stage: str, push_to_hub: bool, hub_model_id: str | None, endpoint: str | None) -> None:
    """A training stage's `--push_to_hub` preflight, before any training: a repo id is given, and `check_push`
    passes (token, offline mode, the hub reachable and accepting the token)."""
    if not push_to_hub:
        return
    if not hub_model_id:
        raise StageError(stage, "--push_to_hub needs --hub_model_id namespace/name")
    try:
        check_push(hub_model_id, endpoint)
    except StageError as exc:
        raise StageError(stage, f"cannot push to the hub: {exc.message}") from None


def push_after_stage(stage: str, output_dir: Path, hub_model_id: str, endpoint: str | None, private: bool) -> str:
    """Push a stage's just-published output; a failure leaves the output in place and says how to push it later."""
    try:
        url = push_stage_output(output_dir, hub_model_id, endpoint=endpoint, private=private)
    except StageError as exc:
        raise StageError(stage, f"the output is complete in {output_dir} but the push failed: {exc.message} (push "
                         f"it later with `align push {output_dir} --repo_id {hub_model_id}`)") from None
    logger.info("pushed to %s", url)
    return url
