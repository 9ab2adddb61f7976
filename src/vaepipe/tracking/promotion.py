"""`vaepipe promote`: move `@champion` to a better model, never to merely the last one.

A candidate (a registered decoder version newer than the champion) replaces the champion only
when its test NLL is lower by more than 2 standard errors of a *paired* comparison: both models'
NLLs of the very same test images, differenced image by image. Each side's NLLs are the run
artifact its version names in its `per_image_nll` tag (the evaluate stage names the file by its
protocol: k, n, seed and the test data's digest), checked against the version's own tags before
they are paired; a file that is missing or records another protocol refuses the comparison.
Versions registered before that tag read evaluation/per_image_nll.npz (the run's latest
evaluate) under the same check. Candidates of another dataset, image shape or latent width, or
measured on other test images, are refused unless --force. Only complete registrations are
seen. The encoder and scorer of the chosen decoder's export (its `export_id` tag) move with it;
`@challenger` marks the newest candidate, never the champion. numpy and MLflow only (no
torch): it reads the store like `vaepipe runs`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaepipe.errors import VaepipeError
from vaepipe.tracking import registry

CHAMPION, CHALLENGER = "champion", "challenger"
PER_IMAGE = "evaluation/per_image_nll.npz"  # the run's latest evaluate (versions without a tag)
SIGMAS = 2.0  # a candidate must beat the champion by more than this many standard errors
# version tags that must agree for two models to be compared at all (same task)
SAME_TASK = ("dataset", "image_shape", "latent_dim")
# ...and for their per-image NLLs to be paired (same images, same estimator)
SAME_TEST = ("test_data_digest", "nll_iwae_k", "nll_iwae_n", "evaluate_seed")
# what a per-image file records -> the version tag that must say the same
RECORDED = {"data_digest": "test_data_digest", "iwae_k": "nll_iwae_k", "seed": "evaluate_seed"}
MEAN_ATOL = 1e-3  # nats: the file's mean NLL against the version's test_nll_iwae (4 decimals)


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
    created: int = 0  # registration time, ms (orders the versions of an export)


def mismatch(candidate: dict, champion: dict, keys) -> str | None:
    """'dataset digits != fashion-mnist' for the first key that differs, else None."""
    for k in keys:
        if candidate.get(k) != champion.get(k):
            return f"{k} {candidate.get(k)} != {champion.get(k)}"
    return None


def _read(run_id: str, path: str, download) -> dict:
    """Every array of the npz `path` of run `run_id`, through `download(run_id, path, dst)`."""
    with tempfile.TemporaryDirectory() as d:
        try:
            local = download(run_id, path, Path(d))
        except VaepipeError as e:
            if "refused" not in str(e):  # the store is away: that error, not a verdict
                raise
            raise PromotionError(f"run {run_id[:8]} has no {path}") from None
        with np.load(local) as f:
            return {k: f[k] for k in f.files}


def per_image_nll(run_id: str, download, path: str = PER_IMAGE) -> np.ndarray:
    """A run's per-image NLLs (`path`: the latest evaluate's by default), unchecked."""
    return _read(run_id, path, download)["nll"]


def protocol_mismatch(recorded: dict, tags: dict) -> str | None:
    """How a per-image file's own record (k, n, seed, test digest, its mean) differs from the
    version's tags, or None when they agree."""
    nll = recorded["nll"]
    says = {tag: recorded.get(key) for key, tag in RECORDED.items()}
    says["nll_iwae_n"] = recorded.get("iwae_n", len(nll))  # older files: their length
    for tag, value in says.items():
        value = None if value is None else np.asarray(value).item()
        if value is None or str(value) != str(tags.get(tag)):
            return f"{tag} {value}, its tags say {tags.get(tag)}"
    mean, tagged = float(np.mean(nll)), tags.get("test_nll_iwae")
    if tagged is None or not abs(mean - float(tagged)) <= MEAN_ATOL:
        return f"mean NLL {mean:.4f}, its tags say {tagged}"
    return None


def version_nll(row: Row, download) -> np.ndarray:
    """The per-image NLLs `row`'s version was judged on: the file its `per_image_nll` tag
    names (older versions: the run's latest), checked against its tags; PromotionError with
    the reason when it is missing or records another protocol."""
    path = row.tags.get(registry.PER_IMAGE) or PER_IMAGE
    recorded = _read(row.run_id, path, download)
    why = protocol_mismatch(recorded, row.tags)
    if why:
        raise PromotionError(f"{path} of run {row.run_id[:8]} records {why}")
    return recorded["nll"]


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
    return Row(
        version=str(v.version),
        run_id=v.run_id,
        tags=dict(v.tags),
        created=int(v.creation_timestamp or 0),
    )


class _Champion:
    """The champion's per-image NLLs, read once and only when a candidate is compared."""

    def __init__(self, decoder: str, row: Row, download):
        self.decoder, self.row, self.download = decoder, row, download
        self.nll: np.ndarray | None = None

    def get(self) -> np.ndarray:
        if self.nll is None:
            try:
                self.nll = version_nll(self.row, self.download)
            except PromotionError as e:
                raise PromotionError(
                    f"the champion {self.decoder} v{self.row.version} cannot be compared: {e}; "
                    "choose a new one with --force --version N"
                ) from None
        return self.nll


def _judge(row: Row, champion: _Champion, force: bool, download) -> None:
    """Fill row.decision (and row.paired when the two compare)."""
    tags = champion.row.tags
    why = mismatch(row.tags, tags, SAME_TASK) or mismatch(row.tags, tags, SAME_TEST)
    if why and not force:
        row.decision = f"refused: {why} (--force to override)"
        return
    if why:
        row.decision = f"forced past: {why}"
        return
    try:
        nll = version_nll(row, download)
    except PromotionError as e:
        row.decision = f"refused: {e}"
        return
    row.paired = paired_difference(nll, champion.get())
    p = row.paired
    row.decision = (
        f"better by {-p.diff / p.stderr:.1f} standard errors"
        if p.significant
        else f"not better by {SIGMAS:g} standard errors"
    )


def _candidates(decoder: str, complete: list, champion: str | None, version: str | None):
    if version is None:
        return [v for v in complete if champion is None or int(v.version) > int(champion)]
    chosen = [v for v in complete if str(v.version) == str(version)]
    if chosen:
        return chosen
    if any(str(v.version) == str(version) for v in registry.versions(decoder, True)):
        raise PromotionError(
            f"{decoder} v{version} is an incomplete registration (no `complete=true` tag): "
            "rerun the export stage of its run to finish it"
        )
    have = ", ".join(str(v.version) for v in complete)
    raise PromotionError(f"--version {version} does not exist (versions: {have})")


def incomplete(decoder: str) -> list[str]:
    """The versions of `decoder` whose registration did not finish (promote does not see
    them)."""
    return [
        str(v.version) for v in registry.versions(decoder, True) if not registry.is_complete(v)
    ]


def _champion(decoder: str, complete: list, check: bool) -> Row | None:
    """The champion's row, None when there is none; with `check`, PromotionError when the alias
    names a version promote cannot compare with."""
    champion_v = registry.alias_version(decoder, CHAMPION)
    champion = next((_row(v) for v in complete if str(v.version) == champion_v), None)
    if not check or champion_v is None:
        return champion
    if champion is None:
        raise PromotionError(
            f"the champion {decoder} v{champion_v} is an incomplete registration: nothing to "
            "compare with; choose a new one with --force --version N"
        )
    state = registry.run_state(champion.run_id)
    if state != "FINISHED":
        raise PromotionError(
            f"the champion {decoder} v{champion.version}'s run {champion.run_id} is "
            f"{state.lower()}: nothing to compare with; choose a new one with "
            "--force --version N"
        )
    return champion


def decide(
    decoder: str, version: str | None = None, force: bool = False
) -> tuple[Row | None, list[Row], Row | None]:
    """(champion, candidate rows with decisions, the row to promote or None): reads only.
    Incomplete registrations are not candidates."""
    complete = registry.versions(decoder)
    if not complete:
        unfinished = incomplete(decoder)
        raise PromotionError(
            f"no complete registered versions of {decoder} (v{', v'.join(unfinished)} "
            "incomplete): rerun the export stage of their runs"
            if unfinished
            else f"no registered versions of {decoder}: run the pipeline first (dvc repro)"
        )
    forced = version is not None and force
    champion = _champion(decoder, complete, check=not forced)
    newer_than = champion.version if champion else None
    rows = [_row(v) for v in _candidates(decoder, complete, newer_than, version)]
    for row in rows:
        state = registry.run_state(row.run_id)
        if state != "FINISHED":
            row.decision = f"skipped: its run is {state.lower()}"
    live = [r for r in rows if not r.decision]
    if forced:
        for r in live:
            r.decision = "forced"
        return champion, rows, live[0] if live else None
    if champion is None:  # the first model of a dataset becomes champion directly
        if not live:
            return None, rows, None
        dataset = live[-1].tags.get("dataset")
        same = [r for r in live if r.tags.get("dataset") == dataset]
        best = min(same, key=lambda r: float(r.tags.get("test_nll_iwae", "inf")))
        for r in live:
            r.decision = "no champion yet: lowest NLL of its dataset" if r is best else "-"
        return None, rows, best
    judged = _Champion(decoder, champion, registry.download)
    for r in live:
        _judge(r, judged, force, registry.download)
    better = [r for r in live if r.paired is not None and r.paired.significant]
    return champion, rows, min(better, key=lambda r: r.paired.diff) if better else None


def companion(name: str, winner: Row) -> tuple[str | None, str]:
    """(the version of registered model `name` exported with the winning decoder version, or
    None; what to say). The one with the winner's export_id; a version registered before that
    tag pairs with the untagged version of its run registered closest in time to it."""
    export = winner.tags.get(registry.EXPORT_ID)
    if export:
        same = [v for v in registry.versions(name) if v.tags.get(registry.EXPORT_ID) == export]
        if same:
            return str(same[-1].version), f"{name}@{CHAMPION} -> v{same[-1].version}"
        return None, f"{name}: no complete version of export {export} (not moved)"
    legacy = [
        v
        for v in registry.versions(name)
        if v.run_id == winner.run_id and registry.EXPORT_ID not in v.tags
    ]
    if not legacy:
        return None, f"{name}: no version of run {winner.run_id[:8]}'s export (not moved)"
    twin = min(legacy, key=lambda v: abs(int(v.creation_timestamp or 0) - winner.created))
    return str(twin.version), f"{name}@{CHAMPION} -> v{twin.version} (registered with it)"


def challenger(rows: list[Row], champion: Row | None, winner: Row | None) -> Row | None:
    """The newest candidate that is not the champion after the move (None: no other left)."""
    after = winner or champion
    newer = [
        r
        for r in rows
        if not r.decision.startswith("skipped")
        and (champion is None or int(r.version) > int(champion.version))
        and (after is None or r.version != after.version)
    ]
    return newer[-1] if newer else None


def move(decoder: str, companions: list[str], winner: Row | None, newest: Row | None):
    """Set @champion on the winner's decoder and the versions of its export of the companion
    models, @challenger on `newest` (or remove it when None); the lines saying what moved."""
    said = []
    if winner is not None:
        said.append(f"{decoder}@{CHAMPION} -> v{winner.version}")
        registry.set_alias(decoder, CHAMPION, winner.version)
        for name in companions:
            version, line = companion(name, winner)
            if version is not None:
                registry.set_alias(name, CHAMPION, version)
            said.append(line)
    if newest is not None:
        registry.set_alias(decoder, CHALLENGER, newest.version)
        said.append(f"{decoder}@{CHALLENGER} -> v{newest.version}")
    elif registry.delete_alias(decoder, CHALLENGER):
        said.append(f"{decoder}@{CHALLENGER} removed (no candidate besides the champion)")
    return said
