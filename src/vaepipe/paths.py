"""Every path the stages read and write, relative to the project root (where DVC runs them).

dvc.yaml declares the same paths; keeping them here means a stage script, the CLI and the tests
never spell one twice.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")
MODELS = Path("models")
MODEL = MODELS / "vae.pt"
CHECKPOINT = MODELS / "checkpoints" / "last.pt"
ENCODER = MODELS / "encoder.onnx"
DECODER = MODELS / "decoder.onnx"
SCORER = MODELS / "scorer.onnx"
CLASSIFIER = MODELS / "classifier.pt"
TRAIN_METRICS = Path("metrics/train.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
# the headline figures: the one file DVC lists as metrics (`dvc exp show`, `dvc metrics diff`)
SUMMARY_METRICS = Path("metrics/summary.json")
EXPORT_METRICS = Path("metrics/export.json")
CLASSIFIER_METRICS = Path("metrics/classifier.json")
CURVES = Path("plots/train/curves.json")
EVALUATE_PLOTS = Path("plots/evaluate")
KL_PER_DIM = EVALUATE_PLOTS / "kl_per_dim.json"


def prepared(split: str) -> Path:
    """data/prepared/<split>.npz for split train, val or test."""
    return PREPARED / f"{split}.npz"
