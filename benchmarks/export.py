"""The four ONNX graphs of a model, recorded two ways side by side: torch.onnx's tracer (what
the export stage uses) and torch.export (torch.onnx.export(dynamo=True)).

    python benchmarks/export.py                 # params.yaml's model on 28x28 images
    python benchmarks/export.py --repeats 5 --image-shape 1,8,8 --hidden 32 --latent-dim 4

Each round runs both in fresh processes (so each pays its own imports), alternating, and
prints per exporter the median seconds of the process's imports, of the four exports, and of
both, then their ratio. Both graphs of each kind must give the same outputs in onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process: imports, the four exports, the seconds of each as one JSON line.
CHILD = r"""
import json, sys, time, warnings
t0 = time.perf_counter()
import dataclasses
import torch
from vaepipe import config
from vaepipe.export import graphs
from vaepipe.model.vae import VAE, VAEConfig
way, out, shape, hidden, latent = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
if way == "dynamo":
    import onnxscript  # noqa: F401  (torch.export's ONNX translation imports it on first use)
    import torch.export  # noqa: F401
t1 = time.perf_counter()
torch.manual_seed(0)
model = dataclasses.replace(config.load({params!r}).model, latent_dim=int(latent),
                            hidden=[int(h) for h in hidden.split(",")])
cfg = VAEConfig.from_params(tuple(map(int, shape.split(","))), model, 0)
vae = VAE(cfg).eval()
eps = torch.randn(8, vae.noise_dim)
if way == "traced":
    graphs.export_models(vae, __import__("pathlib").Path(out), 18, {{}}, scorer_eps=eps)
else:
    modules = {{
        "encoder": (graphs.EncoderGraph(vae), (torch.rand(2, *cfg.image_shape),), ["x"]),
        "decoder": (graphs.DecoderMean(vae), (torch.randn(2, cfg.latent_dim),), ["z"]),
        "scorer": (graphs.ScorerGraph(vae, eps), (torch.rand(2, *cfg.image_shape),), ["x"]),
        "prior": (graphs.PriorSampler(vae), (torch.randn(2, cfg.latent_dim), torch.rand(2)),
                  ["eps", "u"]),
    }}
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (module, example, inputs) in modules.items():
            torch.onnx.export(module, example, f"{{out}}/{{name}}.onnx", input_names=inputs,
                              opset_version=18, dynamo=True, external_data=False,
                              dynamic_shapes={{n: {{0: batch}} for n in inputs}})
t2 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "export": t2 - t1}}))
"""


def run(way: str, out: Path, args) -> dict:
    code = CHILD.format(params=str(ROOT / "params.yaml"))
    argv = [way, str(out), args.image_shape, args.hidden, str(args.latent_dim)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{way} export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_outputs(traced: Path, dynamo: Path, shape: tuple, latent: int) -> float:
    """The largest difference between the two files' outputs, over the four graphs."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {
        "encoder": {"x": rng.random((5, *shape), dtype=np.float32)},
        "decoder": {"z": rng.standard_normal((5, latent), dtype=np.float32)},
        "scorer": {"x": rng.random((5, *shape), dtype=np.float32)},
        "prior": {
            "eps": rng.standard_normal((5, latent), dtype=np.float32),
            "u": rng.random(5, dtype=np.float32),
        },
    }
    worst = 0.0
    for name, feed in feeds.items():
        a, b = (
            ort.InferenceSession(str(d / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            for d in (traced, dynamo)
        )
        for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-shape", default="1,28,28")
    ap.add_argument("--hidden", default="512,256")
    ap.add_argument("--latent-dim", type=int, default=32)
    args = ap.parse_args()
    times: dict[str, list[dict]] = {"traced": [], "dynamo": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for way in times:
                out = Path(tmp) / f"{way}-{r}"
                out.mkdir()
                times[way].append(run(way, out, args))
        shape = tuple(map(int, args.image_shape.split(",")))
        err = same_outputs(Path(tmp) / "traced-0", Path(tmp) / "dynamo-0", shape, args.latent_dim)
    print(f"model: images {args.image_shape}, hidden {args.hidden}, latent {args.latent_dim}; "
          f"median of {args.repeats} fresh processes each")  # fmt: skip
    print("| exporter | imports s | four exports s | both s |")
    print("|---|---|---|---|")
    both = {}
    for way, rows in times.items():
        imports = statistics.median(t["imports"] for t in rows)
        export = statistics.median(t["export"] for t in rows)
        both[way] = statistics.median(t["imports"] + t["export"] for t in rows)
        print(f"| {way} | {imports:.2f} | {export:.2f} | {both[way]:.2f} |")
    print(
        f"torch.export / traced: {both['dynamo'] / both['traced']:.1f}x; "
        f"largest output difference between the two: {err:.2e}"
    )


if __name__ == "__main__":
    main()
