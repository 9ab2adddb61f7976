import pytest
import torch
from _project import vae_cfg

from vaepipe.model import VAE


@pytest.fixture
def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16])).eval()
