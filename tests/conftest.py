import pytest
import torch

from vaepipe.model import VAE, VAEConfig


@pytest.fixture
def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(image_shape=(1, 8, 8), latent_dim=3, hidden=[16])).eval()
