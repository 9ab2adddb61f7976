"""The evaluation layer: the figures of a trained model (likelihood, collapse, latent quality,
out-of-distribution separation, sample quality), its pictures, and the evaluate stage's report."""
