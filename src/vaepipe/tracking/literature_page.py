"""The results page of `vaepipe literature page` (docs/literature.md): each published cell beside
our best run of it on the literature's protocol (or the run of it that went furthest), the best
runs within the training budgets, and the MLflow descriptions of the runs shown. Pure text
from run rows but for `whole_training`, which reads each shown run's per-epoch seconds.
"""

from __future__ import annotations

import math

from vaepipe.tracking.literature import (
    CELLS,
    PROTOCOL_K,
    TEST_IMAGES,
    Cell,
    best,
    matches,
    on_protocol,
    same_value,
)

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
        if k in defaults and not k.startswith("evaluate.") and not same_value(v, defaults[k])
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
        "## Beyond the table",
        "",
        *budgets,
        "",
        *_notes(shown),
        REPRODUCE,
    ]
    return "\n".join(lines)


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
