"""A judge of a different family from the policy: a small head over sentence embeddings of prompt and response.

The LM reward model starts from the policy's own weights (InstructGPT's recipe), so its mistakes and the
policy's blind spots are alike — exactly what a judge that is meant to check the policy must avoid. This
judge embeds the last user turn and the response with a frozen sentence-transformers model (the default
all-MiniLM-L6-v2: another architecture, another training corpus) and scores the pair with a small head
trained through the same K-wise loss as the LM reward model. The encoder is frozen, so the embeddings are
computed once and training the head takes seconds — cheap enough to cross-validate every setting.

Features: [response, prompt * response] (the element-wise product lets the head reward a response for
fitting its prompt; any term of the prompt alone cancels in a ranking of one prompt's responses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from align.rlhf.ranking_loss import kwise_loss, ranking_pairs

JUDGE_DIR = "judge"


@dataclass
class HeadSettings:
    hidden_size: int = 16
    epochs: int = 300
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    dropout: float = 0.2
    seed: int = 0


def last_user_turn(prompt) -> str:
    """The text a judge embeds for a prompt: a string as is, a chat's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else (prompt[-1].get("content", "") if prompt else "")


class JudgeHead(nn.Module):
    """[response, prompt * response] -> a scalar; a hidden layer when `hidden_size` > 0, else linear."""

    def __init__(self, dim: int, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dim, self.hidden_size = dim, hidden_size
        inputs = 2 * dim
        if hidden_size > 0:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(inputs, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, 1))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(inputs, 1))

    def forward(self, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        """[N, D] prompt and response embeddings -> [N] scores."""
        return self.net(torch.cat([response, prompt * response], dim=-1)).squeeze(-1)


def flatten_rankings(ranks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pair indices into the flattened responses of `ranks`' rows: (better [P], worse [P], row of pair [P],
    where each row's responses start)."""
    better, worse, pair_row, starts = [], [], [], []
    offset = 0
    for row, row_ranks in enumerate(ranks):
        starts.append(offset)
        for i, j in ranking_pairs(row_ranks):
            better.append(offset + i)
            worse.append(offset + j)
            pair_row.append(row)
        offset += len(row_ranks)
    return torch.tensor(better), torch.tensor(worse), torch.tensor(pair_row), starts


def train_head(prompt_emb: torch.Tensor, response_emb: torch.Tensor, ranks: list[list[int]],
               settings: HeadSettings, progress=None) -> tuple[JudgeHead, list[float]]:
    """Fit a head on whole-batch K-wise loss (every pair of every ranking each epoch).

    `prompt_emb`, `response_emb`: [N, D], one row per response in the rows' order (the prompt's embedding
    repeated for each of its responses). Returns (head in eval mode, loss per epoch)."""
    torch.manual_seed(settings.seed)
    head = JudgeHead(response_emb.shape[-1], settings.hidden_size, settings.dropout)
    better, worse, pair_row, _ = flatten_rankings(ranks)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    losses = []
    head.train()
    for _ in range(settings.epochs):
        optimizer.zero_grad()
        loss = kwise_loss(head(prompt_emb, response_emb), better, worse, pair_row, len(ranks))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
    return head.eval(), losses


@torch.no_grad()
def head_scores(head: JudgeHead, prompt_emb: torch.Tensor, response_emb: torch.Tensor,
                ranks: list[list[int]]) -> list[list[float]]:
    """Scores of every row's responses, as nested lists in the rows' order."""
    flat = head.eval()(prompt_emb, response_emb).tolist()
    out, offset = [], 0
    for row_ranks in ranks:
        out.append(flat[offset: offset + len(row_ranks)])
        offset += len(row_ranks)
    return out


class Embedder:
    """A frozen sentence-transformers model that embeds prompts and responses (L2-normalised)."""

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path, device=device)
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.get_sentence_embedding_dimension()

    def __call__(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=progress).float().cpu()

    def rows(self, prompts: list, responses: list[list[str]], progress: bool = False) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """([N, D] prompt embedding per response, [N, D] response embeddings) for comparison rows."""
        unique = sorted({last_user_turn(p) for p in prompts})
        index = {text: i for i, text in enumerate(unique)}
        prompt_table = self(unique, progress)
        flat_responses = [r for row in responses for r in row]
        response_emb = self(flat_responses, progress)
        prompt_rows = [index[last_user_turn(p)] for p, row in zip(prompts, responses, strict=True) for _ in row]
        return prompt_table[prompt_rows], response_emb


def save_judge(directory: Path, head: JudgeHead, embedding_model: str) -> Path:
    """Write the head's weights and what rebuilds it (`EmbeddingJudge.load` reads them)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / "head.safetensors"))
    config = {"embedding_model": embedding_model, "dim": head.dim, "hidden_size": head.hidden_size}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


class EmbeddingJudge:
    """A saved embedding judge as a reward function: (prompts, responses) -> [N] scores, normalised with the
    training responses' mean and std (like `RewardModelScorer`)."""

    def __init__(self, embedder: Embedder, head: JudgeHead, mean: float = 0.0, std: float = 1.0):
        self.embedder, self.head = embedder, head.eval()
        self.mean, self.std = mean, std if std > 0 else 1.0

    @classmethod
    def from_output(cls, output_dir: str | Path, device: str = "cpu") -> EmbeddingJudge:
        """Load a finished `align reward --backbone embedding` output (its head and its reward mean/std)."""
        from safetensors.torch import load_file

        from align.core.outputs import read_manifest
        from align.lm.models import resolve_embedding_model

        output_dir = Path(output_dir)
        manifest = read_manifest(output_dir)
        config = json.loads((output_dir / JUDGE_DIR / "config.json").read_text())
        head = JudgeHead(config["dim"], config["hidden_size"])
        head.load_state_dict(load_file(str(output_dir / JUDGE_DIR / "head.safetensors")))
        embedder = Embedder(resolve_embedding_model(config["embedding_model"]), device=device)
        metrics = manifest["metrics"]
        return cls(embedder, head, metrics["reward_mean"], metrics["reward_std"])

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        prompt_emb = self.embedder([last_user_turn(p) for p in prompts])
        response_emb = self.embedder(list(responses))
        return (self.head(prompt_emb, response_emb) - self.mean) / self.std
