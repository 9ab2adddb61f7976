"""Model cards: a markdown page per registered version, generated from the run, never by hand.

The export stage writes one for each graph it registers (encoder, decoder, scorer); it becomes
the version's description in the MLflow registry (what `mlflow ui`'s model page shows) and an
artifact of the run. Pure: dicts in, markdown out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = {
    "encoder": "x -> mu, logvar: the posterior q(z|x) of an image",
    "decoder": "z -> x_mean: the image E[x|z] of a latent point",
    "scorer": "x -> nll: how likely an image is under the model, in nats",
}


@dataclass
class CardFacts:
    """Everything a card states, gathered by the export stage from its inputs."""

    role: str  # encoder | decoder | scorer
    name: str  # registered model name ("" when not registered)
    version: str | None
    run_id: str
    git_commit: str
    dvc_exp: str | None
    params: dict  # flattened params of the run
    train: dict  # metrics/train.json
    evaluate: dict  # metrics/evaluate.json
    export: dict  # metrics/export.json
    contract: list[tuple[str, str, str, str]]  # (in/out, name, shape, values)
    extra: dict = field(default_factory=dict)  # role-specific facts, e.g. scorer_k


def _f(v, fmt=".2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def _data(c: CardFacts) -> list[str]:
    p, digests = c.params, c.train.get("data_digest", {})
    return [
        "## Data",
        f"- dataset `{p.get('data.dataset')}`, binarization `{p.get('data.binarize')}`, "
        f"validation fraction {p.get('data.val_fraction')} (split seed {p.get('data.seed')})",
        "- content digests (SHA-256 of the arrays, 16 hex): "
        + ", ".join(f"{k} `{v}`" for k, v in digests.items())
        + f", test `{c.evaluate.get('data_digest', 'n/a')}` "
        + f"({c.evaluate.get('n_test', '?')} images)",
    ]


def _params(c: CardFacts) -> list[str]:
    kept = ("model", "train")
    rows = [f"| `{k}` | `{v}` |" for k, v in c.params.items() if k.split(".")[0] in kept]
    return ["## Params (model and training)", "| param | value |", "|---|---|", *rows]


def _results(c: CardFacts) -> list[str]:
    e = c.evaluate
    sep = e.get("separation", {})
    aurocs = ", ".join(
        f"{k} {v['auroc']:.3f}" for k, v in sep.items() if isinstance(v, dict) and "auroc" in v
    )
    return [
        "## What it achieves (test set)",
        f"- NLL (IWAE, k = {e.get('iwae_k')}, first {e.get('iwae_n')} test images): "
        f"**{_f(e.get('test/nll_iwae'))} ± {_f(e.get('test/nll_iwae_stderr'))} nats** "
        f"({_f(e.get('test/bits_per_dim'), '.4f')} bits/dim)",
        f"- ELBO {_f(e.get('test/elbo'))} = -(reconstruction {_f(e.get('test/recon'))} + "
        f"KL {_f(e.get('test/kl'))}) nats; best epoch {c.train.get('best_epoch')} of "
        f"{c.train.get('epochs')}",
        f"- active units {e.get('test/active_units')} of {c.params.get('model.latent_dim')}; "
        f"I(x; z) {_f(e.get('test/mutual_info'))} nats; linear probe accuracy "
        f"{_f(e.get('test/probe_accuracy'), '.3f')}",
        f"- separation by the likelihood score (AUROC against the test images, "
        f"{sep.get('n', '?')} each, k = {sep.get('k', '?')}): {aurocs or 'n/a'}",
    ]


def _export(c: CardFacts) -> list[str]:
    x = c.export
    lines = [
        "## Export",
        f"- ONNX opset {x.get('opset')}; onnxruntime ran on `{x.get('provider')}` at export",
        "| file | max abs error vs PyTorch |",
        "|---|---:|",
    ]
    for key in sorted(k for k in x if k.startswith("parity/") and c.role in k):
        lines.append(f"| {key.removeprefix('parity/')} | {x[key]:.3g} |")
    return lines


def _contract(c: CardFacts) -> list[str]:
    cells = [(io, n, shape, values.replace("|", "\\|")) for io, n, shape, values in c.contract]
    rows = [f"| {io} | `{n}` | {shape} | {values} |" for io, n, shape, values in cells]
    return [
        f"## Contract ({ROLES[c.role]})",
        "| | name | float32 shape | values |",
        "|---|---|---|---|",
        *rows,
        "Batch axis dynamic; no random op inside; metadata_props describe the model "
        "(`vaepipe info FILE` prints them).",
    ]


def _usage(c: CardFacts) -> list[str]:
    inp = c.contract[0]
    uri = f"models:/{c.name}@champion" if c.name else f"runs:/{c.run_id}/{c.role}"
    return [
        "## How to call it",
        "```python",
        "import numpy as np, onnxruntime as ort",
        f'sess = ort.InferenceSession("models/{c.role}.onnx", providers=["CPUExecutionProvider"])',
        f'out = sess.run(None, {{"{inp[1]}": batch}})  # batch: float32 {inp[2]}',
        "```",
        "```sh",
        f"mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001",
        "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
        f"-d '{{\"inputs\": [...rows of {inp[2]}...]}}'",
        "```",
        "Bad payloads (wrong width, NaN, strings, no rows, values out of range, too many rows) "
        "get HTTP 400 with a short message.",
    ]


def _limits(c: CardFacts) -> list[str]:
    e, sep = c.evaluate, c.evaluate.get("separation", {})
    lines = [
        "## Known limits (measured)",
        f"- prior hole: KL(q(z) || p(z)) = {_f(e.get('test/aggregate_kl'))} nats between the "
        "codes the decoder saw in training and the N(0, I) that generation samples: decoded "
        "prior samples come partly from regions the decoder never learned.",
        f"- {c.params.get('model.latent_dim', 0) - (e.get('test/active_units') or 0)} latent "
        "dims are inactive (posterior collapse); moving them changes nothing.",
    ]
    low = [k for k, v in sep.items() if isinstance(v, dict) and v.get("auroc", 1) < 0.5]
    if low:
        lines.append(
            f"- the likelihood score rates {', '.join(low)} as *more* likely than its own test "
            "images (AUROC below 0.5): it is not an out-of-distribution detector for those "
            "(Nalisnick et al. 2019)."
        )
    over = {k: v["nonfinite"] for k, v in sep.items() if isinstance(v, dict) and "nonfinite" in v}
    if over:
        lines.append(
            "- the score overflows float32 (not a finite number; ranked least likely) on "
            + ", ".join(f"{n} {k}" for k, n in over.items())
            + " images: the encoder's variance explodes on them."
        )
    if c.params.get("model.likelihood") == "bernoulli":
        lines.append(
            "- a Bernoulli likelihood: NLLs are of binarized images; grey images are scored as "
            "pixel probabilities."
        )
    return lines


def render(c: CardFacts) -> str:
    title = f"{c.name} v{c.version}" if c.name and c.version else f"{c.role}.onnx"
    head = [
        f"# {title}: {c.params.get('data.dataset')} VAE {c.role}",
        f"MLflow run `{c.run_id}`, git commit `{c.git_commit}`"
        + (f", DVC experiment `{c.dvc_exp}`" if c.dvc_exp else "")
        + ". Generated by the export stage from the run; do not edit.",
    ]
    if c.role == "scorer":
        head.append(
            f"The score is minus the IWAE bound with k = {c.extra.get('scorer_k')} samples of a "
            f"fixed noise (seed {c.extra.get('scorer_seed')}), the same for every image: "
            "deterministic, comparable between images, an upper bound on -log p(x)."
        )
    sections = [head, _data(c), _results(c), _limits(c), _contract(c), _usage(c), _export(c)]
    sections.append(_params(c))
    return "\n\n".join("\n".join(s) for s in sections) + "\n"
