"""The model layer: the VAE and its parts, as pure torch code with no file or MLflow I/O.

vae (VAEConfig, Encoder, Decoder, VAE, LatentSample), gaussian (the densities), likelihoods
(p(x|z)), priors (p(z)), objectives (ELBO, IWAE, DReG) and checkpoint (models/vae.pt).
"""
