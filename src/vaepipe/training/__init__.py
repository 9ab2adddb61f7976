"""The training layer: the loop (`loop.fit`), data-parallel processes (`distributed`), what one
training process works with (`session`: data, model, the checkpoint to resume) and the run as
MLflow and DVC see it (`run`: logging, pictures, checkpoints, outputs)."""
