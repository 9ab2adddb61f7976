"""onnxruntime sessions with an explicit provider policy and honest reporting.

onnxruntime-gpu silently falls back to CPU when the CUDA provider cannot load; here `auto`
uses CUDA only when it really loaded (checked with get_providers() after creation), `cuda`
fails with the reason, and every caller gets back the provider that actually runs.
Imports onnxruntime and numpy only (no torch), so the CLI starts fast.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from vaepipe.errors import ModelFileError, RuntimeProviderError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
POLICIES = ("auto", "cuda", "cpu")


@dataclass
class Session:
    session: object  # onnxruntime.InferenceSession
    provider: (
        str  # the provider that runs the graph: CUDAExecutionProvider or CPUExecutionProvider
    )
    path: Path

    @property
    def device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"

    def run(self, feeds: dict) -> list:
        return self.session.run(None, feeds)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


def cuda_status() -> tuple[bool, str]:
    """(usable, reason): can the CUDA provider load on this machine?"""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver found (libcuda.so.1 cannot be loaded): no GPU here"
    if hasattr(ort, "preload_dlls"):
        try:  # CUDA/cuDNN from pip packages (nvidia-*) are found only after this
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - any failure here just means "try anyway"
            return True, f"preload_dlls failed ({e}); trying the CUDA provider anyway"
    return True, "libcuda found"


def open_session(path: str | Path, policy: str = "auto") -> Session:
    """A session on the provider `policy` asks for; raises with the reason if it can't."""
    import onnxruntime as ort

    path = Path(path)
    if policy not in POLICIES:
        raise RuntimeProviderError(f"provider {policy!r} is not one of {', '.join(POLICIES)}")
    if not path.is_file():
        raise ModelFileError(f"ONNX model {path} does not exist")
    providers = [CPU]
    reason = "provider policy is cpu"
    if policy in ("auto", "cuda"):
        usable, reason = cuda_status()
        if usable:
            providers = [CUDA, CPU]
        elif policy == "cuda":
            raise RuntimeProviderError(f"provider 'cuda' requested but {reason}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # our own report replaces ORT's fallback warnings
    threads = os.environ.get("VAEPIPE_ORT_THREADS")
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelFileError(f"{path} is not a loadable ONNX model: {e}") from None
    used = sess.get_providers()[0]
    if policy == "cuda" and used != CUDA:
        raise RuntimeProviderError(
            f"provider 'cuda' requested but onnxruntime fell back to {used} ({reason}); "
            "check the CUDA and cuDNN versions this onnxruntime-gpu build needs"
        )
    return Session(sess, used, path)
