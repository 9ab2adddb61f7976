"""Compare the runs of an experiment without a browser: a terminal table and a PNG plot.

Reads the same store the pipeline writes (tracking.tracking_uri), so after a `dvc exp` sweep
`vaepipe runs` shows every run side by side, sortable by any metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from vaepipe.errors import VaepipeError

DEFAULT_PARAMS = (
    "model.arch",
    "model.latent_dim",
    "model.hidden",
    "train.objective",
    "train.beta",
    "train.epochs",
    "train.lr",
)
PLOT_METRICS = ("test/nll_iwae", "test/active_units", "test/probe_accuracy")
DEFAULT_METRICS = (
    "test/nll_iwae",
    "test/elbo",
    "test/kl",
    "test/active_units",
    "test/probe_accuracy",
    "train_seconds",
)

# a `vaepipe tune` study's trials: what they were judged on (most train only)
TRIAL_METRICS = ("elbo/val", "iwae/val", "best_epoch", "test/nll_iwae", "train_seconds")

PROTOCOL_TAG = "test.nll_protocol"  # set by evaluate: how test/nll_iwae was measured


def metric_name(key: str) -> str:
    """Today's name of a metric: per-epoch curves were once logged `split/quantity`
    (train/elbo); they are `quantity/split` (elbo/train), so old and new runs line up."""
    split, _, quantity = key.partition("/")
    if split in ("train", "val") and quantity and "/" not in quantity:
        return f"{quantity}/{split}"
    return key


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    protocol: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def load_runs(experiment: str, study: str | None = None) -> list[RunRow]:
    """The experiment's runs; with `study`, only the trials of that `vaepipe tune` study (the
    trial number as the param `trial`, the params each trial searched)."""
    import mlflow

    from vaepipe import tracking

    tracking.setup_existing_uri()
    client = tracking.call(mlflow.MlflowClient, "opening the store")
    exp = tracking.call(lambda: client.get_experiment_by_name(experiment), "reading experiments")
    if exp is None:
        raise VaepipeError(
            f"no experiment '{experiment}' in the MLflow store {tracking.tracking_uri()}; "
            "run the pipeline first (dvc repro) or pass --experiment"
        )
    query = f"tags.`vaepipe.study` = '{study}'" if study else ""
    runs = tracking.call(
        lambda: client.search_runs([exp.experiment_id], query, max_results=5000), "reading runs"
    )
    if study:  # the trials, not the study's own run
        runs = [r for r in runs if "vaepipe.trial" in r.data.tags]
    if study and not runs:
        raise VaepipeError(f"no run of study '{study}' in experiment '{experiment}'")
    return [
        RunRow(
            run_id=r.info.run_id,
            name=r.info.run_name or r.info.run_id[:8],
            status=r.info.status,
            params=_params(r, study),
            metrics={metric_name(k): v for k, v in r.data.metrics.items()},
            protocol=r.data.tags.get(PROTOCOL_TAG),
            tags=dict(r.data.tags),
        )
        for r in runs
    ]


def _params(run, study: str | None) -> dict[str, str]:
    if not study:
        return dict(run.data.params)
    return {"trial": run.data.tags.get("vaepipe.trial", "?"), **run.data.params}


def varying_params(runs: list[RunRow]) -> list[str]:
    """The params whose values differ between the runs (a study's searched ones)."""
    keys = sorted({k for r in runs for k in r.params} - {"trial"})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def sort_runs(runs: list[RunRow], key: str | None, descending: bool = False) -> list[RunRow]:
    if not key:
        return runs
    known = {k for r in runs for k in r.metrics} | {k for r in runs for k in r.params}
    if runs and key not in known:
        raise VaepipeError(
            f"cannot sort by '{key}': no run has it; known: {', '.join(sorted(known))}"
        )

    def value(r: RunRow):
        v = r.metrics.get(key, r.params.get(key))
        try:
            v = float(v)
        except (TypeError, ValueError):
            return (1, 0.0, str(v))  # missing or non-numeric: last
        if math.isnan(v):
            return (1, 0.0, "")
        return (0, -v if descending else v, "")

    return sorted(runs, key=value)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_table(runs: list[RunRow], params=DEFAULT_PARAMS, metrics=DEFAULT_METRICS) -> str:
    """A fixed-width table: name, status, the chosen params and metrics (missing: '-'). Beside
    test/nll_iwae, the protocol it was measured under when the runs differ in it (a letter per
    protocol, spelled out below the table): such NLLs are not comparable."""
    params = [p for p in params if any(p in r.params for r in runs)]
    metrics = [m for m in metrics if any(m in r.metrics for r in runs)]
    protocols = sorted(
        {r.protocol or "not recorded" for r in runs if "test/nll_iwae" in r.metrics}
    )
    marked = len(protocols) > 1 and "test/nll_iwae" in metrics
    letter = {p: chr(ord("A") + i) for i, p in enumerate(protocols)}
    header = ["run", "status", *params, *metrics, *(["nll protocol"] if marked else [])]
    rows = [
        [
            r.name,
            r.status,
            *(r.params.get(p) for p in params),
            *(r.metrics.get(m) for m in metrics),
            *([letter.get(r.protocol or "not recorded", "-")] if marked else []),
        ]
        for r in runs
    ]
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if marked:
        lines.append(
            "\ntest/nll_iwae was measured under different protocols; compare only rows with "
            "the same letter:"
        )
        lines += [f"  {letter[p]}: {p}" for p in protocols]
    return "\n".join(lines)


def _param_number(r: RunRow, x: str) -> float:
    try:
        return float(r.params[x])
    except ValueError:
        raise VaepipeError(f"param '{x}' = {r.params[x]!r} is not a number") from None


def _groups(done: list[RunRow], x: str, hue: str | None) -> tuple[str | None, dict]:
    """(hue, runs by hue value): by default the first other key param that varies, since runs
    differing in it would otherwise be joined into one line."""
    if hue is None:
        hue = next(
            (p for p in DEFAULT_PARAMS if p != x and len({r.params.get(p) for r in done}) > 1),
            None,
        )
    groups: dict[str, list[RunRow]] = {}
    for r in done:
        groups.setdefault(r.params.get(hue, "-") if hue else "", []).append(r)
    return hue, groups


def comparison_plot(
    runs: list[RunRow], out: str | Path, x: str, ys: list[str], hue: str | None = None
) -> Path:
    """One panel per metric in `ys` against param `x` for the finished runs, one line per value
    of param `hue` (e.g. train.beta; by default the first other key param that varies), saved
    as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vaepipe.fileio import output_path

    done = [r for r in runs if r.status == "FINISHED" and x in r.params]
    if not done:
        raise VaepipeError(f"no finished run has param '{x}' to plot against")
    hue, groups = _groups(done, x, hue)
    xs = [_param_number(r, x) for r in done]
    ncols = min(3, len(ys))
    nrows = -(-len(ys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(ys) :]:
        ax.set_visible(False)
    for ax, y in zip(axes.flat, ys, strict=False):
        for label, members in sorted(groups.items()):
            pts = sorted((_param_number(r, x), r.metrics[y]) for r in members if y in r.metrics)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker="o", label=f"{hue}={label}" if hue else None
                )
        ax.set(xlabel=x, ylabel=y, title=f"{y} vs {x}")
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if hue:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    with output_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
