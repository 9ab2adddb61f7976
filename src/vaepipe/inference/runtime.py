"""onnxruntime sessions with an explicit provider policy, honest reporting and checked inputs.

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

import numpy as np

from vaepipe.errors import ModelFileError, RuntimeProviderError, VaepipeError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
POLICIES = ("auto", "cuda", "tensorrt", "cpu")
GPU_PROVIDERS = (CUDA, TENSORRT)
# The CUDA provider does float32 MatMul/Gemm in TF32 (10-bit mantissa) unless told not to: on an
# H100 that put the scorer 0.05 nats and the decoder's probabilities 1e-3 away from PyTorch's
# float32. fp32 graphs keep float32 math; the fp16 graphs are the fast path on a GPU.
CUDA_OPTIONS = {"use_tf32": "0"}
# TensorRT builds an engine per graph and input shape on first use (seconds to minutes); the
# cache folder keeps them between processes. VAEPIPE_TRT_CACHE overrides it.
TRT_CACHE = ".trt-cache"
# ONNX tensor types a vaepipe graph exposes at its inputs/outputs (fp16 only inside graphs).
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class InferenceInputError(VaepipeError):
    """An inference input (CLI file, served payload) that the graph cannot take."""


@dataclass
class Session:
    session: object  # onnxruntime.InferenceSession
    provider: (
        str  # the provider that runs the graph: CUDAExecutionProvider or CPUExecutionProvider
    )
    path: Path
    reason: str = ""  # why this provider (e.g. why CUDA was not used under `auto`)

    @property
    def device(self) -> str:
        return "cuda" if self.provider in GPU_PROVIDERS else "cpu"

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def input_shape(self) -> tuple[int | None, ...]:
        """The first input's shape with None for dynamic axes, e.g. (None, 32)."""
        dims = self.session.get_inputs()[0].shape
        return tuple(d if isinstance(d, int) else None for d in dims)

    def run(self, feeds: dict) -> list:
        return self.session.run(None, feeds)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def check(self, value, *, value_range=None, max_batch: int | None = None) -> np.ndarray:
        """`value` as the float32 batch the first input takes, or InferenceInputError."""
        return check_batch(
            value,
            self.input_name,
            self.input_shape(),
            where=self.path.name,
            value_range=value_range,
            max_batch=max_batch,
        )

    def _output_buffers(self, n: int) -> dict:
        """name -> (a device buffer for n rows of the output, its dtype, bytes per row)."""
        import onnxruntime as ort

        outs = {}
        for o in self.session.get_outputs():
            if not all(isinstance(d, int) for d in o.shape[1:]):
                raise InferenceInputError(f"{self.path.name}: output {o.name} has dynamic dims")
            dtype = NP_TYPES[o.type]
            outs[o.name] = (
                ort.OrtValue.ortvalue_from_shape_and_type(
                    (n, *o.shape[1:]), dtype, self.device, 0
                ),
                dtype,
                int(np.prod(o.shape[1:])) * np.dtype(dtype).itemsize,  # bytes per row
            )
        return outs

    def run_batched(
        self, x: np.ndarray, batch_size: int, extra: dict | None = None
    ) -> dict[str, np.ndarray]:
        """All outputs for the batch `x` (the first input; `extra`: the other inputs by name,
        same rows, e.g. a conditional model's one-hot labels y), in chunks of `batch_size`
        rows, with IO binding.

        The whole input is copied to the session's device once, each chunk's outputs are written
        in place into one preallocated device buffer (no per-chunk allocation or host copy), and
        the result comes back to the host once at the end.
        """
        import onnxruntime as ort

        n = x.shape[0]
        device = self.device
        inputs = {}  # name -> (device copy, dtype, bytes per row, row shape)
        for i, (name, arr) in enumerate({self.input_name: x, **(extra or {})}.items()):
            dtype = NP_TYPES[self.session.get_inputs()[i].type]
            arr = np.ascontiguousarray(arr, dtype=dtype)
            row = int(np.prod(arr.shape[1:])) * arr.itemsize
            inputs[name] = (
                ort.OrtValue.ortvalue_from_numpy(arr, device, 0),
                dtype,
                row,
                arr.shape[1:],
            )
        outs = self._output_buffers(n)
        binding = self.session.io_binding()
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            for name, (buf, dtype, row_bytes, shape) in inputs.items():
                binding.bind_input(
                    name, device, 0, dtype, [rows, *shape], buf.data_ptr() + start * row_bytes
                )
            for name, (buf, dtype, row_bytes) in outs.items():
                shape = [rows, *buf.shape()[1:]]
                binding.bind_output(
                    name, device, 0, dtype, shape, buf.data_ptr() + start * row_bytes
                )
            self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return {name: buf.numpy() for name, (buf, _, _) in outs.items()}


def _as_batch(value, name: str, shape: tuple[int | None, ...], where: str, want: str):
    """`value` as a numeric array of `shape`'s rank and fixed dims, or InferenceInputError."""
    try:
        arr = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise InferenceInputError(
            f"input '{name}' is not a rectangular array ({e}); {where} expects {want}"
        ) from None
    if arr.dtype.kind not in "fiu":
        kind = "strings" if arr.dtype.kind in "USO" else f"dtype {arr.dtype}"
        raise InferenceInputError(
            f"input '{name}' holds {kind}; {where} expects float32 numbers of shape {want}"
        )
    if arr.ndim != len(shape) or any(
        d is not None and d != s for d, s in zip(shape, arr.shape, strict=True)
    ):
        raise InferenceInputError(
            f"input '{name}' has shape {list(arr.shape)}; {where} expects {want}"
        )
    return arr


def check_batch(
    value,
    name: str,
    shape: tuple[int | None, ...],
    *,
    where: str = "the model",
    value_range: tuple[float, float] | None = None,
    max_batch: int | None = None,
) -> np.ndarray:
    """Validate an inference batch against `shape` (None = any size); return it as float32.

    Each failure names the input, what was expected and what came: wrong rank or width,
    strings or other non-numbers, an empty batch, NaN/inf, values outside `value_range`,
    more than `max_batch` rows.
    """
    want = "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"
    arr = _as_batch(value, name, shape, where, want)
    if arr.shape[0] == 0:
        raise InferenceInputError(f"input '{name}' is empty (0 rows); {where} expects {want}")
    if max_batch is not None and arr.shape[0] > max_batch:
        raise InferenceInputError(
            f"input '{name}' has {arr.shape[0]} rows, more than the limit of {max_batch} per "
            "request; split it into smaller batches"
        )
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise InferenceInputError(
            f"input '{name}' contains NaN or infinite values (first in row {row})"
        )
    if value_range is not None:
        lo, hi = value_range
        if arr.min() < lo or arr.max() > hi:
            raise InferenceInputError(
                f"input '{name}' has values in [{arr.min():g}, {arr.max():g}]; {where} expects "
                f"values in [{lo:g}, {hi:g}]"
            )
    return arr


NO_GPU = "no NVIDIA driver found (libcuda.so.1 cannot be loaded): no GPU here"


def cuda_status() -> tuple[bool, str]:
    """(usable, reason): can the CUDA provider load on this machine?"""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, NO_GPU
    if hasattr(ort, "preload_dlls"):
        try:  # CUDA/cuDNN from pip packages (nvidia-*) are found only after this
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - any failure here just means "try anyway"
            return True, f"preload_dlls failed ({e}); trying the CUDA provider anyway"
    return True, "libcuda found"


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): has this onnxruntime build the TensorRT provider, and is TensorRT's
    library (libnvinfer, not shipped with onnxruntime-gpu) installed?"""
    import onnxruntime as ort

    if TENSORRT not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no TensorRT provider"
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True, f"{name} found"
        except OSError:
            continue
    return False, "TensorRT's library (libnvinfer.so.10) is not installed"


def _providers(policy: str) -> tuple[list, str]:
    """(providers to ask onnxruntime for, why) under `policy`; raises when a GPU policy cannot
    be met on this machine."""

    if policy == "cpu":
        return [CPU], "provider policy is cpu"
    usable, reason = cuda_status()
    if policy == "tensorrt":
        trt_usable, trt_reason = tensorrt_status()
        if not (usable and trt_usable):  # no GPU first: TensorRT alone would not help
            why = trt_reason if usable else reason
            raise RuntimeProviderError(f"provider 'tensorrt' requested but {why}")
        cache = os.environ.get("VAEPIPE_TRT_CACHE") or TRT_CACHE
        Path(cache).mkdir(parents=True, exist_ok=True)
        trt = {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
        }
        return [(TENSORRT, trt), (CUDA, CUDA_OPTIONS), CPU], f"TensorRT fp16, engine cache {cache}"
    if usable:
        return [(CUDA, CUDA_OPTIONS), CPU], reason
    if policy == "cuda":
        raise RuntimeProviderError(f"provider 'cuda' requested but {reason}")
    return [CPU], reason


def open_session(path: str | Path, policy: str = "auto") -> Session:
    """A session on the provider `policy` asks for; raises with the reason if it can't.

    auto: CUDA when it really loads, else CPU; cuda / tensorrt: that provider or an error (a
    session that silently fell back to the CPU is one too); cpu. VAEPIPE_ORT_THREADS sets
    onnxruntime's intra-op threads (default: one per core, which measured fastest for this MLP
    even at batch 1 on 2 cores).
    """
    import onnxruntime as ort

    path = Path(path)
    if policy not in POLICIES:
        raise RuntimeProviderError(f"provider {policy!r} is not one of {', '.join(POLICIES)}")
    if not path.is_file():
        raise ModelFileError(f"ONNX model {path} does not exist")
    providers, reason = _providers(policy)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # our own report replaces ORT's fallback warnings
    threads = os.environ.get("VAEPIPE_ORT_THREADS")
    if threads:
        if not threads.isdigit():
            raise RuntimeProviderError(
                f"VAEPIPE_ORT_THREADS={threads!r} must be a whole number (0 = one per core)"
            )
        opts.intra_op_num_threads = int(threads)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelFileError(f"{path} is not a loadable ONNX model: {e}") from None
    used = sess.get_providers()[0]
    wanted = {"cuda": CUDA, "tensorrt": TENSORRT}.get(policy)
    if wanted and used != wanted:
        raise RuntimeProviderError(
            f"provider '{policy}' requested but onnxruntime fell back to {used} ({reason}); "
            "check the CUDA, cuDNN (and TensorRT) versions this onnxruntime-gpu build needs"
        )
    if used == CUDA:
        reason = "the CUDA provider loaded"
    elif policy == "auto" and CUDA in providers:
        reason = f"the CUDA provider did not load ({reason})"
    return Session(sess, used, path, reason)
