"""vaepipe: a reproducible VAE experiment pipeline (DVC stages, MLflow tracking, ONNX export)."""

__version__ = "0.1.0"
