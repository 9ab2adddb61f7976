"""The decoder's ONNX contract (docs/onnx.md), checked on the file before anything deploys it.

decoder.onnx: one input `z` float32 [batch, latent_dim], one output `x_mean` float32
[batch, C, H, W], metadata_props naming at least REQUIRED_META in agreement with the graph, and
its weights inside the file. onnx and the standard library only: no session is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vaepipe.errors import ModelFileError

REQUIRED_META = ("latent_dim", "image_shape", "likelihood", "dataset")
FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class DecoderInfo:
    latent_dim: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    metadata: dict[str, str]


def _dims(value) -> list[int | str]:
    """A graph input/output's shape: ints for fixed dims, the symbol (or '?') for dynamic."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def _float_tensor(value, rank: int, path: Path, what: str) -> list[int | str]:
    t = value.type.tensor_type
    dims = _dims(value)
    if t.elem_type != FLOAT or len(dims) != rank:
        raise ModelFileError(
            f"{path}: {what} '{value.name}' is elem type {t.elem_type} of rank {len(dims)}; the "
            f"decoder contract needs float32 of rank {rank}"
        )
    return dims


def _meta_shape(meta: dict[str, str], path: Path) -> tuple[int, tuple[int, int, int]]:
    try:
        latent_dim = int(meta["latent_dim"])
        shape = tuple(int(s) for s in meta["image_shape"].split(","))
    except ValueError:
        raise ModelFileError(
            f"{path}: metadata latent_dim={meta['latent_dim']!r}, image_shape="
            f"{meta['image_shape']!r} are not a whole number and 'C,H,W'"
        ) from None
    if latent_dim < 1 or len(shape) != 3 or min(shape) < 1:
        raise ModelFileError(
            f"{path}: metadata latent_dim={latent_dim}, image_shape={meta['image_shape']!r}: "
            "need latent_dim >= 1 and three positive sizes C,H,W"
        )
    return latent_dim, shape  # type: ignore[return-value]


def read_decoder(path: Path) -> DecoderInfo:
    """The decoder's latent size, image shape and metadata; ModelFileError naming what breaks
    the contract."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    if not path.is_file():
        raise ModelFileError(f"decoder {path} does not exist (the export stage writes it)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common type
        raise ModelFileError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from None
    graph = model.graph
    feeds = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    names = ([i.name for i in feeds], [o.name for o in graph.output])
    if names != (["z"], ["x_mean"]):
        raise ModelFileError(
            f"{path}: inputs {names[0]} and outputs {names[1]}; the decoder contract is one "
            "input 'z' and one output 'x_mean'"
        )
    z_dims = _float_tensor(feeds[0], 2, path, "input")
    x_dims = _float_tensor(graph.output[0], 4, path, "output")
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ModelFileError(
            f"{path}: metadata_props lack {', '.join(missing)} (has: {', '.join(meta) or 'none'})"
            "; export the decoder with the export stage, which writes them"
        )
    latent_dim, shape = _meta_shape(meta, path)
    for got, want, what in ((z_dims[1:], [latent_dim], "z"), (x_dims[1:], list(shape), "x_mean")):
        if any(isinstance(g, int) and g != w for g, w in zip(got, want, strict=True)):
            raise ModelFileError(
                f"{path}: {what} has dims {got} after the batch axis but metadata says {want}"
            )
    if any(uses_external_data(t) for t in graph.initializer):
        raise ModelFileError(f"{path} keeps weights in external data; the page needs one file")
    return DecoderInfo(latent_dim, shape, meta)
