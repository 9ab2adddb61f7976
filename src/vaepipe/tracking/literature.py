"""Our runs beside the published table: the literature's evaluation protocol, each cell of the
published Fashion-MNIST table as a named configuration (params only), and the results page
read from the MLflow store (`vaepipe literature list | run | page`).

The table: dynamically binarized Fashion-MNIST, test log-likelihood by importance sampling
with 5,000 samples on all 10,000 test images (Norouzi et al., Exemplar VAE, NeurIPS 2020,
with the architectures of Tomczak & Welling's VampPrior paper). Its recipe: 50,000 training
and 10,000 validation images, Adam at 5e-4, batches of 100, KL warm-up over 100 epochs, up to
2,000 epochs with early stopping after 50 without improvement; gated dense layers of 300
units and 40-dim latents (each layer of the two-layer models); 500 VampPrior pseudo-inputs.
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
PRIORS = (("standard", "Gaussian", STANDARD), ("vamp", "VampPrior", VAMP))
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


def _same(logged: str | None, wanted) -> bool:
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
        _same(run_params.get(k), v) for k, v in c.params.items() if not k.startswith("evaluate.")
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


# --- the page ----------------------------------------------------------------------------------

PAGE = Path("docs/literature.md")
BUDGETS = (  # beyond the table: the best protocol run within each training budget
    ("30 minutes of training on a CPU", "cpu", 30 * 60),
    ("1 hour of training on one GPU", "cuda", 60 * 60),
)


def _nll(r) -> str:
    return f"{r.metrics['test/nll_iwae']:.2f} ± {r.metrics.get('test/nll_iwae_stderr', 0):.2f}"


def _columns(r) -> list[str]:
    """The epochs (best), training, evaluation and device columns of a run."""

    def minutes(key: str) -> str:
        return f"{r.metrics[key] / 60:.1f} min" if key in r.metrics else "?"

    run = r.metrics.get("epochs_run", r.metrics.get("epochs_logged", 0))
    epochs = f"{run:.0f} ({r.metrics.get('best_epoch', 0):.0f})"
    where = r.tags.get("device_name") or r.tags.get("device", "?")
    return [epochs, minutes("train_seconds"), minutes("evaluate_seconds"), where]


def _trained(r) -> str:
    return " | ".join(_columns(r))


def _differences(r, defaults: dict[str, object]) -> str:
    """The run's params that differ from params.yaml's, as `-S` flags."""
    flags = [
        f"`{k}={v}`"
        for k, v in sorted(r.params.items())
        if k in defaults and not k.startswith("evaluate.") and not _same(v, defaults[k])
    ]
    return " ".join(flags) or "(params.yaml as it is)"


INTRO = (
    "Every figure: dynamically binarized Fashion-MNIST, −log p(x) in nats by importance "
    f"sampling (the IWAE bound) with k = {PROTOCOL_K:,} on all {TEST_IMAGES:,} test images, "
    "the test set binarized once (`evaluate.seed`). Published: Norouzi et al., Exemplar "
    "VAE (NeurIPS 2020), with the VampPrior paper's architectures; its ± is over training "
    "runs, ours the standard error over the test images. A cell counts a run when it "
    "trained with every param of the cell's configuration and was evaluated on this "
    "protocol; the lowest NLL is shown. Training: MLflow's `train_seconds`, or the sum of "
    "the run's `epoch_seconds` where that is larger; evaluation: `evaluate_seconds` (the "
    "whole evaluate stage, the NLL most of it)."
)
REPRODUCE = """## Reproduce

```sh
vaepipe literature list                   # the configurations and their cells
vaepipe literature run vae-vamp --queue   # dvc exp run --queue with its params
dvc queue start                           # then, when they are done:
vaepipe literature page                   # this page, from the MLflow store
```

`vaepipe literature run protocol` evaluates the current params' model on this protocol (DVC
reruns only the evaluate stage).
"""


def _cell_rows(runs: list, shown: list) -> list[str]:
    rows = [
        "| model | prior | published | ours | ours − published | configuration | run | "
        "epochs (best) | training | evaluation | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in CELLS:
        r = best(runs, lambda run, c=c: matches(run.params, c))
        paper = f"{c.published[0]:.2f} ± {c.published[1]:.2f}"
        if r is None:
            rows.append(_unfinished_row(c, paper, runs, shown))
            continue
        gap = r.metrics["test/nll_iwae"] - c.published[0]
        shown.append(r)
        rows.append(
            f"| {c.model} | {c.prior} | {paper} | {_nll(r)} | {gap:+.2f} | `{c.name}` | "
            f"`{r.run_id[:8]}` | {_trained(r)} |"
        )
    return rows


def unfinished(runs: list, c: Cell):
    """The run of a cell that went furthest without a finished protocol evaluation (training,
    stopped, or trained but not evaluated on the protocol), or None."""
    mine = [r for r in runs if matches(r.params, c)]
    return max(mine, key=lambda r: r.metrics.get("epochs_logged", 0), default=None)


def _unfinished_row(c: Cell, paper: str, runs: list, shown: list) -> str:
    r = unfinished(runs, c)
    if r is None:
        return f"| {c.model} | {c.prior} | {paper} | not run | | `{c.name}` | | | | | |"
    shown.append(r)
    state = (
        "trained, not evaluated on the protocol"
        if r.status == "FINISHED"
        else f"not finished (MLflow: {r.status})"
    )
    epochs, training, _, where = _columns(r)
    return (
        f"| {c.model} | {c.prior} | {paper} | {state} | | `{c.name}` | `{r.run_id[:8]}` | "
        f"{epochs} | {training} | | {where} |"
    )


def _budget_rows(runs: list, defaults: dict[str, object], shown: list) -> list[str]:
    rows = [
        "| budget | ours | run | epochs (best) | training | evaluation | device | params beyond "
        "params.yaml |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for title, device, seconds in BUDGETS:
        r = best(
            runs,
            lambda run, device=device, seconds=seconds: (
                run.tags.get("device", "").startswith(device)
                and run.metrics.get("train_seconds", math.inf) <= seconds
            ),
        )
        if r is None:
            rows.append(f"| {title} | no run yet | | | | | | |")
        else:
            shown.append(r)
            rows.append(
                f"| {title} | {_nll(r)} | `{r.run_id[:8]}` | {_trained(r)} | "
                f"{_differences(r, defaults)} |"
            )
    return rows


NOTE_TAG = "mlflow.note.content"  # a run's description, as `mlflow ui` edits it
NOTE_CHARS = 600  # a longer description is cut there (the whole stays in MLflow)


def _notes(shown: list) -> list[str]:
    """The descriptions of the runs on the page (what a reader should know about a run, such as
    a machine shared with other work), one line each."""
    notes, seen = [], set()
    for r in shown:
        text = " ".join(r.tags.get(NOTE_TAG, "").split())
        if len(text) > NOTE_CHARS:
            text = text[: NOTE_CHARS - 1].rstrip() + "…"
        if text and r.run_id not in seen:
            seen.add(r.run_id)
            notes.append(f"- `{r.run_id[:8]}` ({r.name}): {text}")
    if not notes:
        return []
    return ["## Notes on these runs", "", "Each run's MLflow description.", "", *notes, ""]


def page(runs: list, defaults: dict[str, object], experiment: str) -> str:
    """The results page: each published cell beside our best run of it, then the best runs
    within the training budgets, all on the literature's protocol."""
    exemplar = ", ".join(
        f"{title.split(',')[0]} {PUBLISHED[key, 'exemplar'][0]:.2f}" for key, title, _ in MODELS
    )
    shown: list = []  # the runs on the page, in order
    cells, budgets = _cell_rows(runs, shown), _budget_rows(runs, defaults, shown)
    lines = [
        "# Results beside the literature",
        "",
        f"Written by `vaepipe literature page` from the MLflow store (experiment "
        f"`{experiment}`); run it again after new runs rather than editing this page.",
        "",
        INTRO,
        "",
        "## The published table",
        "",
        *cells,
        "",
        f"The published Exemplar prior column ({exemplar}) has no configuration here.",
        "",
        "## Beyond the table",
        "",
        *budgets,
        "",
        *_notes(shown),
        REPRODUCE,
    ]
    return "\n".join(lines)


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


def whole_training(runs: list) -> None:
    """From each run's `epoch_seconds` history, for the runs the page may show (a finished
    protocol run, or any run of a cell): `epochs_logged`, and train_seconds raised to the sum
    of its epochs' own seconds where it is lower (a checkpoint without the seconds it carried,
    written before they were kept, left a resumed run with only its last part; an unfinished
    run has none). Budgets then count the whole training."""
    import mlflow

    from vaepipe import tracking

    client = mlflow.MlflowClient()
    for r in runs:
        protocol_run = r.status == "FINISHED" and on_protocol(r.protocol)
        if not protocol_run and not any(matches(r.params, c) for c in CELLS):
            continue
        history = tracking.call(
            lambda r=r: client.get_metric_history(r.run_id, "epoch_seconds"), "reading metrics"
        )
        epochs = {m.step: m.value for m in history}  # a step logged twice counts once
        r.metrics["epochs_logged"] = max(epochs, default=0)
        r.metrics["train_seconds"] = max(r.metrics.get("train_seconds", 0.0), sum(epochs.values()))


def cmd_page(args) -> str:
    from vaepipe import config, paths
    from vaepipe.tracking import compare

    runs = compare.load_runs(args.experiment)
    whole_training(runs)
    defaults = config.flatten(config.load(paths.PARAMS)) if paths.PARAMS.is_file() else {}
    text = page(runs, defaults, args.experiment)
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
