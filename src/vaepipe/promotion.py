"""`vaepipe promote`: move `@champion` to a better model, never to merely the last one.

A candidate (a registered decoder version newer than the champion) replaces the champion only
when its test NLL is lower by more than 2 standard errors of a *paired* comparison: both models'
NLLs of the very same test images (the evaluate stage logs each image's IWAE NLL with the
digest of the test set), differenced image by image. Candidates of another dataset, image
shape or latent width, or measured on other test images, are refused unless --force. The
encoder and scorer of the chosen run move with the decoder; `@challenger` marks the newest
candidate. numpy and MLflow only (no torch): it reads the store like `vaepipe runs`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaepipe.errors import VaepipeError

CHAMPION, CHALLENGER = "champion", "challenger"
PER_IMAGE = "evaluation/per_image_nll.npz"
SIGMAS = 2.0  # a candidate must beat the champion by more than this many standard errors
# version tags that must agree for two models to be compared at all (same task)
SAME_TASK = ("dataset", "image_shape", "latent_dim")
# ...and for their per-image NLLs to be paired (same images, same estimator)
SAME_TEST = ("test_data_digest", "nll_iwae_k", "nll_iwae_n", "evaluate_seed")


class PromotionError(VaepipeError):
    pass


@dataclass
class Paired:
    """The candidate minus the champion, image by image."""

    diff: float  # mean NLL difference, nats (negative: the candidate is better)
    stderr: float  # its standard error over images
    better: float  # fraction of images where the candidate's NLL is lower
    n: int

    @property
    def significant(self) -> bool:
        return self.diff < -SIGMAS * self.stderr


def paired_difference(candidate: np.ndarray, champion: np.ndarray) -> Paired:
    """Paired statistics of two models' per-image NLLs of the same images (same order)."""
    if candidate.shape != champion.shape or candidate.ndim != 1 or len(candidate) < 2:
        raise PromotionError(
            f"per-image NLLs of {candidate.shape} and {champion.shape} images cannot be paired"
        )
    d = candidate.astype(np.float64) - champion.astype(np.float64)
    return Paired(
        diff=float(d.mean()),
        stderr=float(d.std(ddof=1) / math.sqrt(len(d))),
        better=float((d < 0).mean()),
        n=len(d),
    )


@dataclass
class Row:
    """One line of promote's table."""

    version: str
    run_id: str
    tags: dict
    paired: Paired | None = None
    decision: str = ""


def mismatch(candidate: dict, champion: dict, keys) -> str | None:
    """'dataset digits != fashion-mnist' for the first key that differs, else None."""
    for k in keys:
        if candidate.get(k) != champion.get(k):
            return f"{k} {candidate.get(k)} != {champion.get(k)}"
    return None


def per_image_nll(run_id: str, download) -> np.ndarray:
    """The evaluate stage's per-image NLLs of a run, through `download(run_id, path, dst)`."""
    with tempfile.TemporaryDirectory() as d:
        try:
            path = download(run_id, PER_IMAGE, Path(d))
        except VaepipeError as e:
            raise PromotionError(f"run {run_id} has no {PER_IMAGE} ({e})") from None
        with np.load(path) as f:
            return f["nll"]


def format_table(rows: list[Row], champion: Row | None) -> str:
    head = "version  run       dataset        NLL       diff vs champion  stderr  better  decision"
    lines = [head, "-" * len(head)]
    if champion is not None:
        lines.append(_line(champion, "(champion)"))
    lines += [_line(r, r.decision) for r in rows]
    return "\n".join(lines)


def _line(r: Row, decision: str) -> str:
    p = r.paired
    diff = f"{p.diff:+.2f}" if p else "-"
    se = f"{p.stderr:.2f}" if p else "-"
    better = f"{p.better:.0%}" if p else "-"
    nll = r.tags.get("test_nll_iwae", "-")
    nll = f"{float(nll):.2f}" if nll != "-" else nll
    return (
        f"v{r.version:<7} {r.run_id[:8]:<9} {r.tags.get('dataset', '?'):<14} {nll:<9} "
        f"{diff:<17} {se:<7} {better:<7} {decision}"
    )


def _row(v) -> Row:
    return Row(version=str(v.version), run_id=v.run_id, tags=dict(v.tags))


def _judge(row: Row, champion: Row, champion_nll, force: bool, download) -> None:
    """Fill row.decision (and row.paired when the two compare)."""
    why = mismatch(row.tags, champion.tags, SAME_TASK) or mismatch(
        row.tags, champion.tags, SAME_TEST
    )
    if why and not force:
        row.decision = f"refused: {why} (--force to override)"
        return
    if why:
        row.decision = f"forced past: {why}"
        return
    row.paired = paired_difference(per_image_nll(row.run_id, download), champion_nll)
    p = row.paired
    row.decision = (
        f"better by {-p.diff / p.stderr:.1f} standard errors"
        if p.significant
        else f"not better by {SIGMAS:g} standard errors"
    )


def _candidates(all_versions: list, champion: str | None, version: str | None) -> list:
    if version is None:
        return [v for v in all_versions if champion is None or int(v.version) > int(champion)]
    chosen = [v for v in all_versions if str(v.version) == str(version)]
    if not chosen:
        have = ", ".join(str(v.version) for v in all_versions)
        raise PromotionError(f"--version {version} does not exist (versions: {have})")
    return chosen


def decide(
    decoder: str, version: str | None = None, force: bool = False
) -> tuple[Row | None, list[Row], Row | None]:
    """(champion, candidate rows with decisions, the row to promote or None): reads only."""
    from vaepipe.tracking import registry

    all_versions = registry.versions(decoder)
    if not all_versions:
        raise PromotionError(
            f"no registered versions of {decoder}: run the pipeline first (dvc repro)"
        )
    champion_v = registry.alias_version(decoder, CHAMPION)
    champion = next((_row(v) for v in all_versions if str(v.version) == champion_v), None)
    rows = [_row(v) for v in _candidates(all_versions, champion_v, version)]
    for row in rows:
        state = registry.run_state(row.run_id)
        if state != "FINISHED":
            row.decision = f"skipped: its run is {state.lower()}"
    live = [r for r in rows if not r.decision]
    if champion is None:  # the first model of a dataset becomes champion directly
        if not live:
            return None, rows, None
        dataset = live[-1].tags.get("dataset")
        same = [r for r in live if r.tags.get("dataset") == dataset]
        best = min(same, key=lambda r: float(r.tags.get("test_nll_iwae", "inf")))
        for r in live:
            r.decision = "no champion yet: lowest NLL of its dataset" if r is best else "-"
        return None, rows, best
    state = registry.run_state(champion.run_id)
    if state != "FINISHED":
        raise PromotionError(
            f"the champion {decoder} v{champion.version}'s run {champion.run_id} is "
            f"{state.lower()}: nothing to compare with; choose a new one with "
            "--force --version N"
        )
    if version is not None and force:
        for r in live:
            r.decision = "forced"
        return champion, rows, live[0] if live else None
    champion_nll = per_image_nll(champion.run_id, registry.download)
    for r in live:
        _judge(r, champion, champion_nll, force, registry.download)
    better = [r for r in live if r.paired is not None and r.paired.significant]
    return champion, rows, min(better, key=lambda r: r.paired.diff) if better else None


def move(decoder: str, companions: list[str], winner: Row | None, newest: Row | None):
    """Set @champion on the winner's decoder and its run's companion versions, @challenger on
    the newest candidate; the lines saying what moved."""
    from vaepipe.tracking import registry

    said = []
    if winner is not None:
        said.append(f"{decoder}@{CHAMPION} -> v{winner.version}")
        registry.set_alias(decoder, CHAMPION, winner.version)
        for name in companions:
            twin = [v for v in registry.versions(name) if v.run_id == winner.run_id]
            if twin:
                registry.set_alias(name, CHAMPION, str(twin[-1].version))
                said.append(f"{name}@{CHAMPION} -> v{twin[-1].version}")
            else:
                said.append(f"{name}: no version of run {winner.run_id[:8]} (not moved)")
    if newest is not None:
        registry.set_alias(decoder, CHALLENGER, newest.version)
        said.append(f"{decoder}@{CHALLENGER} -> v{newest.version}")
    return said
