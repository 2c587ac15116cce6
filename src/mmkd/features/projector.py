"""Owns the multi-teacher autoencoder that maps each teacher's native embeddings to the student's dimension."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from mmkd.config import AlignCfg
from mmkd.progress import progress
from mmkd import atomic


class MultiTeacherAutoencoder(nn.Module):
    """One linear in/out layer per teacher around a shared MLP encoder/decoder (the reference design)."""

    def __init__(self, dims: dict[str, int], latent: int, hidden: int, dropout: float):
        super().__init__()
        self.dims, self.latent, self.hidden = dict(dims), latent, hidden
        self.inp = nn.ModuleDict({t: nn.Linear(d, hidden) for t, d in dims.items()})
        self.encoder = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(),
                                     nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, hidden), nn.GELU())
        self.out = nn.ModuleDict({t: nn.Linear(hidden, d) for t, d in dims.items()})

    def encode(self, teacher: str, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.inp[teacher](x))

    def forward(self, teacher: str, x: torch.Tensor) -> torch.Tensor:
        return self.out[teacher](self.decoder(self.encode(teacher, x)))

    @torch.no_grad()
    def project(self, teacher: str, x: torch.Tensor) -> torch.Tensor:
        """Student-dimension targets, L2-normalised (the reference forgot this; its MSE assumes it)."""
        self.eval()
        return F.normalize(self.encode(teacher, x), dim=-1)


def train_projector(features: dict, latent: int, cfg: AlignCfg, seed: int) -> tuple[MultiTeacherAutoencoder, dict]:
    """features: teacher -> rows [N, D_t] (image and text rows together): a tensor, or anything with len(),
    .shape and batch indexing returning a float tensor (features.align.StoreRows streams them from the store).
    Reconstruction MSE with input noise."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dims = {t: int(x.shape[1]) for t, x in features.items()}
    model = MultiTeacherAutoencoder(dims, latent, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    model.train()
    names = list(features)
    for _ in progress(range(cfg.epochs), desc="projector", unit="epoch"):
        # every teacher's batches, shuffled together: the shared encoder never trains on one teacher for long
        batches = []
        for t in names:
            order = torch.randperm(len(features[t]), generator=gen)
            batches += [(t, order[i : i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
        totals = {t: [0.0, 0] for t in names}
        for k in torch.randperm(len(batches), generator=gen).tolist():
            t, rows = batches[k]
            batch = features[t][rows.sort().values]  # sorted: kinder to memory-mapped shards
            noisy = batch + cfg.noise_std * torch.randn(batch.shape, generator=gen)
            loss = F.mse_loss(model(t, noisy), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            totals[t][0] += loss.item() * len(batch)
            totals[t][1] += len(batch)
        losses = {t: total / max(1, count) for t, (total, count) in totals.items()}
    model.eval()
    return model, {f"recon_mse_{t}": v for t, v in losses.items()}


def save_projector(model: MultiTeacherAutoencoder, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(folder / "projector.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    meta = {"dims": model.dims, "latent": model.latent, "hidden": model.hidden}
    atomic.write_json(folder / "projector.json", meta, sort_keys=True)


def load_projector(folder: Path) -> MultiTeacherAutoencoder:
    meta = json.loads((folder / "projector.json").read_text())
    model = MultiTeacherAutoencoder(meta["dims"], meta["latent"], meta["hidden"], dropout=0.0)
    model.load_state_dict(load_file(folder / "projector.safetensors"))
    return model.eval()
