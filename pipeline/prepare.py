"""Stage prepare: read the configured dataset, hold out validation, write data/prepared/*.npz."""

from pathlib import Path

from vaepipe import config, data
from vaepipe.errors import exit_on_user_error

OUT = Path("data/prepared")


@exit_on_user_error
def main() -> None:
    params = config.load("params.yaml")
    splits = data.prepare_splits(params.data)
    for name, split in splits.items():
        data.save_split(OUT / f"{name}.npz", split)
        labels = "no labels" if split.y is None else "labels"
        print(f"prepare: {name:5s} {split.x.shape} {split.x.dtype}, {labels} -> {OUT / name}.npz")


if __name__ == "__main__":
    main()
