"""int8 embedding tables (per-row, weight-only): pt2e leaves ``nn.Embedding`` in float."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.engine.fake_quant import weight_qparams


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` whose table is stored as int8 with one scale per row; looked-up rows are dequantized."""

    qweight: Tensor
    scale: Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        weight = embedding.weight.detach().float()
        scale, _ = weight_qparams(weight, 8)
        self.register_buffer("qweight", torch.clamp(torch.round(weight / scale[:, None]), -128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.embedding_dim = embedding.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


def _quantize_embeddings(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """Swap the plain ``nn.Embedding`` modules of ``model`` (not inside a ``skip`` name) for ``Int8Embedding``."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Embedding or module.max_norm is not None:
            continue  # ``max_norm`` renormalizes the float table in place on lookup: keep those float
        if any(name == s or name.startswith(f"{s}.") for s in skip):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Embedding(module))
        names.append(name)
    return names
