"""models/vae.pt and models/checkpoints/last.pt: damaged or foreign files give a clear error that
names the file, and nothing in them is ever executed (torch.load weights_only=True)."""

import pathlib

import pytest
import torch
from helpers import train_cfg, vae_cfg

from vaepipe.errors import ModelFileError
from vaepipe.model import checkpoint
from vaepipe.model.vae import VAE
from vaepipe.training.distributed import Step

CFG = vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16])


class Payload:
    """Unpickling this would run Path.touch(marker): what a malicious .pt file could do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def model_file(tmp_path) -> pathlib.Path:
    torch.manual_seed(0)
    path = tmp_path / "vae.pt"
    checkpoint.save(path, VAE(CFG), {"run_id": "abc"})
    return path


@pytest.fixture
def state_file(tmp_path, model_file) -> pathlib.Path:
    vae, _ = checkpoint.load(model_file)
    opt = torch.optim.Adam(vae.parameters())
    state = {
        "model": vae.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": [],
        "gen": torch.Generator().get_state(),
        "epoch": 1,
        "batch": 2,
        "perm": torch.arange(5),
        "sums": torch.zeros(4, dtype=torch.float64),
        "history": [{"epoch": 1, "train": {"loss": 1.0}, "val": {}, "beta": 1.0, "lr": 1e-3}],
        "fingerprint": "f" * 64,
        "run_id": "abc",
    }
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_state(path, state)
    return path


def test_model_file_round_trip(model_file):
    vae, payload = checkpoint.load(model_file)
    assert payload["run_id"] == "abc" and vae.cfg == CFG and not vae.training


def test_the_same_weights_are_the_same_bytes_wherever_saved(model_file, tmp_path):
    """DVC compares outputs by content: a rerun that trains the same model changes nothing."""
    vae, payload = checkpoint.load(model_file)
    again = tmp_path / "elsewhere" / "model.pt"
    checkpoint.save(again, vae, {"run_id": "abc"})
    checkpoint.save(model_file, vae, {"run_id": "abc"})
    assert again.read_bytes() == model_file.read_bytes()


def test_training_state_round_trip(state_file):
    state = checkpoint.load_state(state_file)
    assert state["epoch"] == 1 and torch.equal(state["perm"], torch.arange(5))


def _damage(path: pathlib.Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif how == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\n")
    elif how == "flipped":  # same size, a run of bytes in the middle overwritten
        mid = len(blob) // 2
        path.write_bytes(blob[:mid] + b"\xff" * 64 + blob[mid + 64 :])


DAMAGE = ["truncated", "empty", "garbage", "text", "flipped"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_model_file_is_a_clear_error(model_file, how):
    _damage(model_file, how)
    with pytest.raises(ModelFileError) as e:
        checkpoint.load(model_file)
    msg = str(e.value)
    assert str(model_file) in msg and "not a valid vaepipe model file" in msg
    assert "\n" not in msg and len(msg) < 600  # one readable line, not torch's essay


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_training_checkpoint_is_a_clear_error(state_file, how):
    _damage(state_file, how)
    with pytest.raises(ModelFileError) as e:
        checkpoint.load_state(state_file)
    msg = str(e.value)
    assert str(state_file) in msg and "train.resume: false" in msg
    assert "\n" not in msg and len(msg) < 600


def test_missing_model_file_says_which_stage_makes_it(tmp_path):
    with pytest.raises(ModelFileError, match=r"vae.pt does not exist; run the train stage"):
        checkpoint.load(tmp_path / "vae.pt")


def test_missing_training_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match=r"last.pt cannot be resumed: .*No such file"):
        checkpoint.load_state(tmp_path / "last.pt")


@pytest.mark.parametrize("loader", [checkpoint.load, checkpoint.load_state])
def test_pickled_objects_are_refused_and_never_run(tmp_path, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_config": {}, "state_dict": {}, "x": Payload(marker)}, path)
    with pytest.raises(ModelFileError, match=r"a Python object \(\w+\).* refused \(torch.load"):
        loader(path)
    assert not marker.exists()


def test_torch_file_of_something_else_is_named(tmp_path, model_file):
    other = tmp_path / "other.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(ModelFileError, match=r"other.pt is not a vaepipe model file"):
        checkpoint.load(other)
    with pytest.raises(ModelFileError, match=r"other.pt is not a vaepipe training checkpoint"):
        checkpoint.load_state(other)
    # a model file is not a training checkpoint: the missing keys are named
    with pytest.raises(ModelFileError, match=r"missing model, optimizer, .*fingerprint"):
        checkpoint.load_state(model_file)


def test_model_file_with_mismatched_weights_is_named(tmp_path):
    path = tmp_path / "vae.pt"
    payload = {
        "model_config": CFG.to_dict(),
        "state_dict": VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=5)).state_dict(),
    }
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=r"vae.pt is not a valid vaepipe model file: .*size"):
        checkpoint.load(path)


def test_a_failed_save_leaves_the_previous_file(model_file, monkeypatch):
    before = model_file.read_bytes()

    write_bytes = pathlib.Path.write_bytes

    def crash(self, data):  # interrupted with part of the file written
        write_bytes(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model_file, VAE(CFG))
    assert model_file.read_bytes() == before
    assert [p.name for p in model_file.parent.iterdir()] == [model_file.name]  # no temp left


def test_a_second_ctrl_c_mid_step_never_saves_a_half_step(monkeypatch):
    """Ctrl-C twice: the second interrupts at once, possibly inside a step; the checkpoint kept
    must still be one taken between whole steps, so resuming it reproduces an unbroken run."""
    import copy
    import os
    import signal

    from vaepipe.training.loop import fit

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)[torch.randint(0, 4, (300,), generator=g)]
    x, xv = x[:250], x[250:]
    cfg = train_cfg(epochs=3, batch_size=25)

    def fresh():
        torch.manual_seed(0)
        return VAE(CFG)

    ref = fresh()
    fit(ref, x, xv, cfg, "dynamic", progress=False)

    calls = {"n": 0}
    forward = Step.forward

    def twice_mid_forward(self, xb, eps, y=None):  # both signals land inside the 25th forward pass
        calls["n"] += 1
        if calls["n"] == 25:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, xb, eps, y)

    saved = []  # copies, as the files are: a state dict shares tensors with the live model

    def save(state):
        saved.append(copy.deepcopy(state))

    monkeypatch.setattr(Step, "forward", twice_mid_forward)
    with pytest.raises(KeyboardInterrupt):
        fit(fresh(), x, xv, cfg, "dynamic", on_checkpoint=save, progress=False)
    monkeypatch.setattr(VAE, "forward", forward)

    resumed = fresh()
    fit(resumed, x, xv, cfg, "dynamic", resume=saved[-1], progress=False)
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
