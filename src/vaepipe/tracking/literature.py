"""Our runs beside the published table: the literature's evaluation protocol, each cell of the
published Fashion-MNIST table as a named configuration (params only), and the results page
read from the MLflow store (`vaepipe literature list | run | page`).

The table: dynamically binarized Fashion-MNIST, test log-likelihood by importance sampling
with 5,000 samples on all 10,000 test images (Norouzi et al., Exemplar VAE, NeurIPS 2020,
with the architectures of Tomczak & Welling's VampPrior paper). Its recipe: 50,000 training
and 10,000 validation images, Adam at 5e-4, batches of 100, KL warm-up over 100 epochs, up to
2,000 epochs with early stopping after 50 without improvement; gated dense layers of 300
units and 40-dim latents (each layer of the two-layer models); 500 VampPrior pseudo-inputs;
the Exemplar prior over the 50,000 training images, 25,000 of them drawn for each step.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vaepipe.errors import VaepipeError
from vaepipe.fileio import output_path

# The published evaluation: k = 5,000, every test image, the test set binarized once (the
# draw of evaluate.seed). evaluate records k, n and the draw in the run's protocol tag.
PROTOCOL = {"evaluate.iwae_k": 5000, "evaluate.iwae_n": 0}
PROTOCOL_K, TEST_IMAGES = 5000, 10000
RECIPE = {
    "data.dataset": "fashion-mnist",
    "data.binarize": "dynamic",
    "data.val_fraction": 0.1666667,  # 10,000 of the 60,000 training images
    "train.objective": "elbo",
    "train.lr": 0.0005,
    "train.batch_size": 100,
    "train.warmup_epochs": 100,
    "train.epochs": 2000,
    "train.early_stopping": 50,
    "train.lr_schedule": "constant",
    "model.activation": "gated",
    "model.hidden": [300, 300],
    "model.latent_dim": 40,
    **PROTOCOL,
}
TWO_LAYERS = {"model.z1_dim": 40}
VAMP = {"model.prior": "vamp", "model.prior_components": 500}
# the Exemplar VAE's recipe: 25,000 of the 50,000 training images drawn for each step's prior
EXEMPLAR = {"model.prior": "exemplar", "model.prior_components": 25000}
STANDARD = {"model.prior": "standard"}
CONV = {"model.arch": "convhvae", "model.channels": [32, 64], "model.hidden": [300], **TWO_LAYERS}


@dataclass(frozen=True)
class Cell:
    name: str
    model: str
    prior: str
    published: tuple[float, float]  # nats, ± as published
    params: dict


MODELS = (
    ("vae", "VAE, one stochastic layer (MLP)", {"model.arch": "mlp"}),
    ("hvae", "HVAE, two stochastic layers", {"model.arch": "hvae_topdown", **TWO_LAYERS}),
    ("convhvae", "ConvHVAE", CONV),
)
PUBLISHED = {  # (model, prior): (nats, ±)
    ("vae", "standard"): (228.70, 0.15),
    ("vae", "vamp"): (227.35, 0.05),
    ("vae", "exemplar"): (226.75, 0.07),
    ("hvae", "standard"): (227.37, 0.1),
    ("hvae", "vamp"): (226.72, 0.08),
    ("hvae", "exemplar"): (226.53, 0.09),
    ("convhvae", "standard"): (225.38, 0.08),
    ("convhvae", "vamp"): (224.67, 0.03),
    ("convhvae", "exemplar"): (224.63, 0.06),
}
PRIORS = (
    ("standard", "Gaussian", STANDARD),
    ("vamp", "VampPrior", VAMP),
    ("exemplar", "Exemplar", EXEMPLAR),
)
CELLS = tuple(
    Cell(f"{key}-{prior}", title, label, PUBLISHED[key, prior], {**RECIPE, **arch, **extra})
    for key, title, arch in MODELS
    for prior, label, extra in PRIORS
)


def cell(name: str) -> Cell:
    for c in CELLS:
        if c.name == name:
            return c
    if name == "protocol":
        return Cell("protocol", "the current params", "", (math.nan, math.nan), dict(PROTOCOL))
    names = ", ".join(["protocol", *(c.name for c in CELLS)])
    raise VaepipeError(f"no configuration '{name}'; choose one of: {names}")


def param_text(value) -> str:
    """A value as `dvc exp run -S key=value` reads it (YAML): [300,300], true, 0.0005."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(param_text(v) for v in value) + "]"
    return str(value)


def command(c: Cell, name: str | None = None, queue: bool = False) -> list[str]:
    """`dvc exp run [--queue] -n NAME -S key=value ...` for a configuration."""
    argv = ["dvc", "exp", "run", *(["--queue"] if queue else []), "-n", name or c.name]
    for key, value in c.params.items():
        argv += ["-S", f"{key}={param_text(value)}"]
    return argv


# --- matching runs -----------------------------------------------------------------------------

_PROTOCOL_RE = re.compile(r"IWAE k=(\d+), (\d+) of (\d+) test images")


def on_protocol(tag: str | None) -> bool:
    """Whether a run's test.nll_protocol tag is the literature's: k = 5,000, all 10,000."""
    m = _PROTOCOL_RE.match(tag or "")
    return bool(m) and int(m[1]) == PROTOCOL_K and int(m[2]) == int(m[3]) == TEST_IMAGES


def same_value(logged: str | None, wanted) -> bool:
    if logged is None:
        return False
    if isinstance(wanted, bool) or isinstance(wanted, str):
        return logged == str(wanted)
    if isinstance(wanted, list):
        return logged.replace(" ", "") == param_text(wanted)
    try:
        return math.isclose(float(logged), float(wanted), rel_tol=1e-9)
    except ValueError:
        return False


def matches(run_params: dict[str, str], c: Cell) -> bool:
    """A run is of a cell when it trained with each of the cell's model, data and train
    params (evaluate's are checked by the protocol tag: they may change after training)."""
    return all(
        same_value(run_params.get(k), v)
        for k, v in c.params.items()
        if not k.startswith("evaluate.")
    )


def best(runs: list, keep) -> object | None:
    """The finished protocol run with the lowest test NLL among those `keep` accepts."""
    done = [
        r
        for r in runs
        if r.status == "FINISHED"
        and on_protocol(r.protocol)
        and "test/nll_iwae" in r.metrics
        and keep(r)
    ]
    return min(done, key=lambda r: r.metrics["test/nll_iwae"], default=None)


PAGE = Path("docs/literature.md")


# --- the command -------------------------------------------------------------------------------


def cmd_list(args) -> str:
    print(f"{'configuration':<20} {'published':>16}  model, prior")
    for c in CELLS:
        print(
            f"{c.name:<20} {c.published[0]:>8.2f} ± {c.published[1]:<5.2f}  {c.model}, {c.prior}"
        )
    print(f"{'protocol':<20} {'':>16}  the current params, evaluated on the protocol")
    if args.params:
        print("\n" + shlex.join(command(cell(args.params))))
    return ""


def cmd_run(args) -> int | str:
    argv = command(cell(args.configuration), args.name, args.queue)
    print(shlex.join(argv), flush=True)
    try:
        proc = subprocess.run(argv)
    except FileNotFoundError:
        raise VaepipeError("no `dvc` on PATH: install the project (make install)") from None
    if proc.returncode != 0:
        raise VaepipeError(f"dvc exp run exited with {proc.returncode}")
    return ""


def cmd_page(args) -> str:
    from vaepipe import config, paths
    from vaepipe.tracking import compare
    from vaepipe.tracking import literature_page as results

    runs = compare.load_runs(args.experiment)
    results.whole_training(runs)
    defaults = config.flatten(config.load(paths.PARAMS)) if paths.PARAMS.is_file() else {}
    text = results.page(runs, defaults, args.experiment)
    with output_path(args.out) as tmp:
        tmp.write_text(text)
    found = sum(1 for r in runs if on_protocol(r.protocol))
    return f"{len(runs)} runs, {found} on the protocol -> {args.out}"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "literature", help="the published Fashion-MNIST table: configurations, runs, page"
    )
    inner = p.add_subparsers(dest="literature_command", required=True, metavar="ACTION")
    q = inner.add_parser("list", help="the configurations of the published cells")
    q.add_argument("--params", metavar="NAME", help="also print that one's dvc exp run line")
    q.set_defaults(fn=cmd_list)
    q = inner.add_parser("run", help="dvc exp run with a configuration's params")
    q.add_argument("configuration", help="a name from `vaepipe literature list`, or protocol")
    q.add_argument("--name", help="the experiment's name (default: the configuration's)")
    q.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
    q.set_defaults(fn=cmd_run)
    q = inner.add_parser("page", help="write the results page from the MLflow store")
    q.add_argument("--experiment", default="vaepipe", help="MLflow experiment (vaepipe)")
    q.add_argument("--out", default=str(PAGE), help=f"the page to write ({PAGE})")
    q.set_defaults(fn=cmd_page)
