"""Stage prepare: read the configured dataset, hold out validation, write data/prepared/*.npz."""

import _venv  # noqa: F401  (first: run with the project's packages)

from pathlib import Path

from vaepipe import config, paths
from vaepipe.data import arrays, sources
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import published


def warn_untracked_source(cfg: config.DataConfig) -> None:
    """DVC reruns this stage when a file under data.root changes (dvc.yaml); a data.npz_path
    elsewhere is read but not tracked, so a changed file would go unnoticed."""
    if cfg.dataset != "npz":
        return
    npz, root = Path(cfg.npz_path).resolve(), Path(cfg.root).resolve()
    if not npz.is_relative_to(root):
        print(
            f"prepare: note: {cfg.npz_path} is outside data.root ({cfg.root}), so DVC will not "
            "rerun this stage when it changes; keep source files under data.root"
        )


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    warn_untracked_source(params.data)
    splits = sources.prepare_splits(params.data)
    with published(paths.PREPARED) as out:
        for name, split in splits.items():
            arrays.save_split(out(paths.PREPARED) / paths.prepared(name).name, split)
    for name, split in splits.items():
        labels = "no labels" if split.y is None else "labels"
        print(
            f"prepare: {name:5s} {split.x.shape} {split.x.dtype}, {labels}, digest "
            f"{arrays.digest(split)} -> {paths.prepared(name)}"
        )


if __name__ == "__main__":
    main()
