"""Stage classifier: a small CNN trained once on the prepared training images; its features
measure sample quality (FID, precision/recall) in the evaluate stage.

Writes models/classifier.pt and metrics/classifier.json (its test accuracy, reported beside the
FID it defines). It depends on the data and its own params only, so DVC reruns it when the
dataset changes, not when the VAE does. A dataset without labels gets no classifier: both files
say so, and evaluate skips the sample-quality figures with that reason.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import torch

from vaepipe import config, data, paths, quality
from vaepipe.device import set_threads
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import atomic_path, write_json


def grey(split: data.Split) -> torch.Tensor:
    return torch.from_numpy(data.to_unit(split.x))


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    c = params.classifier
    set_threads(params.train.threads)
    train, test = data.load_split(paths.prepared("train")), data.load_split(paths.prepared("test"))
    if train.y is None or test.y is None:
        why = "the dataset has no labels to train a classifier on"
        with atomic_path(paths.CLASSIFIER) as tmp:
            torch.save({"skipped": why}, tmp)
        write_json(paths.CLASSIFIER_METRICS, {"skipped": why})
        print(f"classifier: skipped: {why}")
        return
    y = torch.from_numpy(train.y)
    model = quality.train_classifier(grey(train), y, c.epochs, c.batch_size, c.lr, c.seed)
    acc = quality.accuracy(model, grey(test), torch.from_numpy(test.y))
    with atomic_path(paths.CLASSIFIER) as tmp:
        torch.save(
            {
                "state_dict": model.state_dict(),
                "channels": int(train.x.shape[1]),
                "n_classes": int(y.max()) + 1,
            },
            tmp,
        )
    write_json(
        paths.CLASSIFIER_METRICS,
        {"test_accuracy": acc, "features": quality.FEATURES, "epochs": c.epochs},
    )
    print(f"classifier: test accuracy {acc:.4f} after {c.epochs} epochs -> {paths.CLASSIFIER}")


if __name__ == "__main__":
    main()
