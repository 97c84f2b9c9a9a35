"""Small reference models with real transformer structure: residual streams, pre-LayerNorm,
multi-head attention and an MLP. Their linear layers are what ``sparsify`` converts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        heads = lambda t: t.view(batch, tokens, self.n_head, width // self.n_head).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, causal, dropout)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A byte-level GPT; the output head is tied to the token embedding (so it stays dense)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Parameter(torch.zeros(config.block_size, config.d_model))
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_head, True, config.dropout)
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init_weights)  # GPT-2's initialisation: small weights, logits near uniform

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, GPT):
            nn.init.normal_(module.pos, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        tokens = idx.shape[1]
        if tokens > self.config.block_size:
            raise ValueError(f"sequence of {tokens} tokens exceeds block_size {self.config.block_size}")
        x = self.tok(idx) + self.pos[:tokens]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass(frozen=True)
class MLPConfig:
    inputs: int = 64
    hidden: int = 256
    n_layer: int = 2  # hidden layers
    n_classes: int = 10


class MLPClassifier(nn.Module):
    """ReLU MLP classifier; every hidden layer, the first one reading raw inputs included, is a
    linear layer ``sparsify`` converts; the output layer (``head``) is meant to stay dense."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        widths = [config.inputs] + [config.hidden] * config.n_layer
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(config.hidden, config.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), labels)


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    n_classes: int = 10
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0


class ViT(nn.Module):
    """A small Vision Transformer: linear patch embedding, class token, pre-LN encoder blocks."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"patch_size {config.patch_size} does not divide image_size {config.image_size}")
        self.config = config
        patches = (config.image_size // config.patch_size) ** 2
        self.patch = nn.Linear(config.channels * config.patch_size ** 2, config.d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.pos = nn.Parameter(torch.randn(1, patches + 1, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_head, False, config.dropout)
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        size = self.config.patch_size
        patches = images.unfold(2, size, size).unfold(3, size, size)  # [B, C, H/p, W/p, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, channels * size * size)
        x = torch.cat([self.cls.expand(batch, -1, -1), self.patch(patches)], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))
