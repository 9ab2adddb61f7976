"""models/vae.pt (weights, model config, params) and the training checkpoint: written atomically
with a SHA-256 of their content, read with torch.load(weights_only=True) and checked."""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vaepipe.errors import ModelFileError
from vaepipe.fileio import atomic_path
from vaepipe.model.vae import VAE, VAEConfig

FORMAT_VERSION = 1
# What training.loop's state_dict writes, plus training.session's keys: all needed to resume.
STATE_KEYS = (
    *("model", "optimizer", "torch_rng", "cuda_rng", "gen", "epoch", "batch", "perm", "sums"),
    *("history", "fingerprint", "run_id"),
)


def _brief(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _torch_load(path: Path, device: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True), its many failure types turned into one short reason."""
    # torch's own messages suggest weights_only=False: never for a file we did not write.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": a foreign pickle
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            reason = (
                f"it holds a Python object ({unsafe.group(1)}), not only tensors and plain "
                "data, and was refused (torch.load weights_only=True)"
            )
        else:
            reason = "not a file torch.save wrote (torch.load weights_only=True cannot parse it)"
    except EOFError:
        reason = "the file is empty or truncated"
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        reason = f"cannot read it ({e.strerror or _brief(e)})"
    except OSError:  # EINVAL from the zip reader: the archive ends early
        reason = "unreadable: truncated or not a torch file"
    except Exception as e:  # RuntimeError from the zip reader: no central directory, bad CRC
        reason = f"unreadable ({_brief(e).split('. ')[0]}); truncated or not a torch file"
    raise ModelFileError(reason)


def _digest(obj: Any) -> str:
    """SHA-256 of every tensor and value in `obj`. torch.load does not check the CRCs of its zip
    archive, so a damaged byte inside a tensor would otherwise load silently."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"tensor {t.dtype} {tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def _save_with_digest(path: str | Path, payload: dict[str, Any]) -> None:
    # Saved through a buffer: torch.save names the archive's members after the file it writes,
    # and the temp file's name is random, so the same weights would give different bytes (DVC
    # would see a changed output after a rerun that produced the same model).
    buffer = io.BytesIO()
    torch.save({**payload, "sha256": _digest(payload)}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _check_digest(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` without its digest, or ModelFileError when the content does not match it
    (files written before digests were added have none and pass)."""
    payload = dict(payload)
    digest = payload.pop("sha256", None)
    if digest is not None and digest != _digest(payload):
        raise ModelFileError("its content does not match its SHA-256 (the file is damaged)")
    return payload


def save(path: str | Path, vae: VAE, extra: dict[str, Any] | None = None) -> None:
    payload = {
        "format_version": FORMAT_VERSION,
        "model_config": vae.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        **(extra or {}),
    }
    _save_with_digest(path, payload)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[VAE, dict[str, Any]]:
    """(VAE in eval mode on `device`, the whole payload); a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; run the train stage (dvc repro)")
    try:
        payload = _torch_load(path, device)
        if isinstance(payload, dict):
            payload = _check_digest(payload)
    except ModelFileError as e:
        raise ModelFileError(f"{path} is not a valid vaepipe model file: {e}") from None
    if not isinstance(payload, dict) or not {"model_config", "state_dict"} <= payload.keys():
        raise ModelFileError(
            f"{path} is not a vaepipe model file (no model_config and state_dict); "
            "rerun the train stage (dvc repro)"
        )
    try:
        vae = VAE(VAEConfig.from_dict(payload["model_config"]))
        vae.load_state_dict(payload["state_dict"])
    except Exception as e:  # missing or extra keys, shape mismatches: a damaged model file
        raise ModelFileError(f"{path} is not a valid vaepipe model file: {_brief(e)}") from None
    return vae.to(device).eval(), payload


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """A training-loop state (train._Loop.state_dict plus our keys), written atomically."""
    _save_with_digest(path, state)


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = _torch_load(path)
        if isinstance(state, dict):
            state = _check_digest(state)
    except ModelFileError as e:  # truncated file, not a torch file, unsafe pickle content
        raise ModelFileError(
            f"training checkpoint {path} cannot be resumed: {e}; delete it or set "
            "train.resume: false"
        ) from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise ModelFileError(
            f"{path} is not a vaepipe training checkpoint (missing {', '.join(missing)}); "
            "delete it or set train.resume: false"
        )
    return state
