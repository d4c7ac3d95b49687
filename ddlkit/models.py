"""Built-in models: small enough for two CPU processes, built as flat stacks of
blocks so that later strategies can cut them into pipeline stages or shard
their linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset

LM_HEADS = 4  # attention heads of the built-in lm


def build_model(name: str, dataset: Dataset, hidden: int = 128, seq_len: int = 32) -> nn.Module:
    """Create a built-in model for a dataset; call ``torch.manual_seed`` first for
    identical weights on every rank.

    >>> from ddlkit.data import load_dataset
    >>> model = build_model("mlp", load_dataset("digits"))
    >>> model(torch.zeros(4, 64)).shape
    torch.Size([4, 10])
    """
    if name == "mlp":
        features = dataset.inputs.shape[1]
        return nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, dataset.num_outputs),
        )
    if name == "cnn":  # digits are 8x8 grey images
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, dataset.num_outputs),
        )
    if name == "lm":
        return CharTransformer(dataset.num_outputs, dim=hidden, seq_len=seq_len)
    raise ValueError(f"model={name!r} is invalid: valid values are ['mlp', 'cnn', 'lm']")


def loss_fn(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of each task, a mean over the batch (so averaging gradients
    across equal-sized rank batches equals the large-batch gradient)."""
    if task == "regress":
        return F.mse_loss(output, target)
    if task == "lm":
        return F.cross_entropy(output.flatten(0, 1), target.flatten())
    return F.cross_entropy(output, target)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP. Separate
    q/k/v/o and up/down projections are what Megatron-style tensor parallelism shards."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        # -1 rather than self.heads: under tensor parallelism each rank holds a
        # slice of the heads.
        q, k, v = (proj(h).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))

    @property
    def head_dim(self) -> int:
        return self.o.in_features // self.heads


class CharTransformer(nn.Module):
    """A tiny GPT over characters: embeddings, blocks, a head."""

    def __init__(self, vocab: int, dim: int = 128, seq_len: int = 32, layers: int = 2, heads: int = LM_HEADS):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))
