"""models/vae.pt: weights, model config and params, loadable with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vaepipe.errors import ModelFileError
from vaepipe.fileio import atomic_path
from vaepipe.model import VAE, VAEConfig

FORMAT_VERSION = 1


def save(path: str | Path, vae: VAE, extra: dict[str, Any] | None = None) -> None:
    payload = {
        "format_version": FORMAT_VERSION,
        "model_config": vae.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[VAE, dict[str, Any]]:
    """(VAE in eval mode on `device`, the whole payload); a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; run the train stage (dvc repro)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        vae = VAE(VAEConfig.from_dict(payload["model_config"]))
        vae.load_state_dict(payload["state_dict"])
    except Exception as e:  # unpickling, missing keys and shape mismatches all mean "bad file"
        raise ModelFileError(f"{path} is not a valid vaepipe model file: {e}") from None
    return vae.to(device).eval(), payload


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """A training-loop state (train._Loop.state_dict plus our keys), written atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle content
        raise ModelFileError(
            f"training checkpoint {path} is unreadable ({e}); delete it or set train.resume: false"
        ) from None
    if not isinstance(state, dict) or "fingerprint" not in state or "model" not in state:
        raise ModelFileError(
            f"{path} is not a vaepipe training checkpoint; delete it or set train.resume: false"
        )
    return state
