"""Stage classifier: a small CNN trained once on the prepared training images; its features
measure sample quality (FID, precision/recall) in the evaluate stage.

Writes models/classifier.pt and metrics/classifier.json (its test accuracy, reported beside the
FID it defines). It depends on the data and its own params only, so DVC reruns it when the
dataset changes, not when the VAE does. A dataset without labels gets no classifier: both files
say so, and evaluate skips the sample-quality figures with that reason.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import torch

from vaepipe import config, paths
from vaepipe.data import arrays
from vaepipe.device import set_threads
from vaepipe.errors import exit_on_user_error
from vaepipe.evaluation import quality
from vaepipe.fileio import published, write_json


def grey(split: arrays.Split) -> torch.Tensor:
    return torch.from_numpy(arrays.to_unit(split.x))


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    c = params.classifier
    set_threads(params.train.threads)
    train, test = (arrays.load_split(paths.prepared(name)) for name in ("train", "test"))
    if train.y is None or test.y is None:
        why = "the dataset has no labels to train a classifier on"
        with published(paths.CLASSIFIER, paths.CLASSIFIER_METRICS) as out:
            torch.save({"skipped": why}, out(paths.CLASSIFIER))
            write_json(out(paths.CLASSIFIER_METRICS), {"skipped": why})
        print(f"classifier: skipped: {why}")
        return
    y = torch.from_numpy(train.y)
    model = quality.train_classifier(
        grey(train), y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, seed=c.seed
    )
    acc = quality.accuracy(model, grey(test), torch.from_numpy(test.y))
    with published(paths.CLASSIFIER, paths.CLASSIFIER_METRICS) as out:
        torch.save(
            {
                "state_dict": model.state_dict(),
                "channels": int(train.x.shape[1]),
                "n_classes": int(y.max()) + 1,
            },
            out(paths.CLASSIFIER),
        )
        write_json(
            out(paths.CLASSIFIER_METRICS),
            {"test_accuracy": acc, "features": quality.FEATURES, "epochs": c.epochs},
        )
    print(f"classifier: test accuracy {acc:.4f} after {c.epochs} epochs -> {paths.CLASSIFIER}")


if __name__ == "__main__":
    main()
