"""The training loop: learning happens, NaN stops it by name, interrupts resume bit-for-bit."""

import dataclasses
import os
import signal

import pytest
import torch
from helpers import PER_EPOCH_METRICS, proto_data, train_cfg, vae_cfg

from vaepipe.model.vae import VAE
from vaepipe.training.distributed import Step
from vaepipe.training.loop import TrainingDiverged, fit

CFG = vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32])


data = proto_data


def fresh():
    torch.manual_seed(0)
    return VAE(CFG)


def weights(vae):
    return torch.cat([p.detach().flatten() for p in vae.parameters()])


def test_training_improves_the_elbo_and_reports_every_term():
    x, xv = data()
    hist = fit(fresh(), x, xv, train_cfg(epochs=5, batch_size=50), "dynamic", progress=False)
    assert len(hist) == 5
    assert hist[-1].val["elbo"] > hist[0].val["elbo"]
    m = hist[-1].metrics()
    for key in (*PER_EPOCH_METRICS, "lr"):
        assert key in m and m[key] == m[key]  # present and not NaN
    assert "lr" not in hist[-1].metrics(constant_lr=True)  # the param train.lr says it
    assert hist[-1].curves()["val_elbo"] == hist[-1].val["elbo"]  # dvc.yaml's plots fields


def test_bf16_autocast_trains_in_bfloat16_products_and_keeps_float32_weights():
    x, xv = data()
    runs = {}
    for precision in ("fp32", "bf16"):
        vae = fresh()
        cfg = train_cfg(epochs=4, batch_size=50, precision=precision)
        runs[precision] = (vae, fit(vae, x, xv, cfg, "dynamic", progress=False))
    (a, fp32), (b, bf16) = runs["fp32"], runs["bf16"]
    assert all(p.dtype == torch.float32 for p in b.parameters())
    assert not torch.equal(weights(a), weights(b))  # the products really ran in bfloat16
    assert bf16[-1].val["elbo"] > bf16[0].val["elbo"]  # and it learns
    assert abs(bf16[-1].val["elbo"] - fp32[-1].val["elbo"]) < 0.02 * abs(fp32[-1].val["elbo"])


def test_same_seed_same_weights_on_cpu():
    x, xv = data()
    cfg = train_cfg(epochs=2, batch_size=64)
    a, b = fresh(), fresh()
    fit(a, x, xv, cfg, "dynamic", progress=False)
    fit(b, x, xv, cfg, "dynamic", progress=False)
    assert torch.equal(weights(a), weights(b))


@pytest.mark.parametrize(
    "binarization, options",
    [
        ("dynamic", {}),
        ("static", {}),
        # the IWAE objective, a cosine lr and the best-epoch book-keeping resume exactly too
        ("dynamic", {"objective": "iwae", "iwae_k": 3, "lr_schedule": "cosine", "lr_min": 1e-5}),
        # KL warm-up mid-ramp, free bits, a plateau lr with patience 1 and early stopping
        (
            "dynamic",
            {
                "warmup_epochs": 3,
                "free_bits": 0.2,
                "lr_schedule": "plateau",
                "lr_patience": 1,
                "early_stopping": 3,
            },
        ),
        # bfloat16 autocast: the same numbers again after a resume
        ("dynamic", {"objective": "iwae", "iwae_k": 3, "precision": "bf16"}),
    ],
    ids=["dynamic", "static", "iwae-cosine", "warmup-freebits-plateau", "iwae-bf16"],
)
def test_resume_after_interrupt_reaches_identical_weights(binarization, options):
    x, xv = data()
    cfg = train_cfg(epochs=4, batch_size=32, **options)
    ref = fresh()
    ref_hist = fit(ref, x, xv, cfg, binarization, progress=False)

    saved = []
    calls = {"n": 0}

    def interrupt_mid_epoch(state):
        saved.append(state)

    # Ctrl-C in the middle of epoch 3, sent from inside a forward pass.
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    target = 2 * steps_per_epoch + 3

    original_fwd = Step.forward

    def counting_forward(self, xb, eps, y=None):
        calls["n"] += 1
        if calls["n"] == target:
            os.kill(os.getpid(), signal.SIGINT)  # taken by the loop at the next safe point
        return original_fwd(self, xb, eps, y)

    interrupted = fresh()
    Step.forward = counting_forward
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(
                interrupted,
                x,
                xv,
                cfg,
                binarization,
                on_checkpoint=interrupt_mid_epoch,
                progress=False,
            )
    finally:
        Step.forward = original_fwd
    state = saved[-1]
    assert state["epoch"] == 2 and 0 < state["batch"] < steps_per_epoch

    resumed = fresh()
    hist = fit(resumed, x, xv, cfg, binarization, resume=state, progress=False)
    assert torch.equal(weights(resumed), weights(ref))
    assert [h.val for h in hist] == [h.val for h in ref_hist]
    assert [(h.lr, h.beta, h.best_epoch) for h in hist] == [
        (h.lr, h.beta, h.best_epoch) for h in ref_hist
    ]


def test_nan_loss_stops_with_epoch_and_batch_named():
    x, xv = data()
    vae = fresh()
    with torch.no_grad():
        vae.decoder.net[-1].bias[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, batch 1"):
        fit(vae, x, xv, train_cfg(epochs=1, batch_size=50), "dynamic", progress=False)


def test_nan_gradient_is_caught_before_the_step():
    x, xv = data()
    vae = fresh()
    vae.encoder.net[0].weight.register_hook(lambda g: g * float("inf"))
    before = weights(vae).clone()
    with pytest.raises(TrainingDiverged, match=r"gradient of encoder.net.0.weight .* batch 1"):
        fit(vae, x, xv, train_cfg(epochs=1, batch_size=50), "dynamic", progress=False)
    assert torch.equal(weights(vae), before)  # the bad step was not applied


def test_sigterm_mid_training_saves_a_state_that_resumes_to_the_uninterrupted_weights():
    x, xv = data(n=3000)
    cfg = train_cfg(epochs=3, batch_size=16)
    per_epoch = -(-len(x) // 16)  # steps an epoch
    saved, steps = [], []

    def sigterm_at_step_250(module, args):  # a real SIGTERM, in the middle of a forward pass
        if module.training:
            steps.append(1)
            if len(steps) == 250:
                os.kill(os.getpid(), signal.SIGTERM)

    vae = fresh()
    vae.encoder.register_forward_pre_hook(sigterm_at_step_250)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        fit(vae, x, xv, cfg, "dynamic", on_checkpoint=saved.append, progress=False)
    state = saved[-1]
    assert (state["epoch"], state["batch"]) == (1, 250 - per_epoch)  # its step finished
    resumed = fresh()
    fit(resumed, x, xv, cfg, "dynamic", resume=state, progress=False)
    straight = fresh()
    fit(straight, x, xv, cfg, "dynamic", progress=False)
    assert torch.equal(weights(resumed), weights(straight))


def test_huge_but_finite_gradients_are_not_a_divergence():
    # The per-step check sums the gradients: a sum that overflows to Inf is then looked at
    # element by element, and finite gradients let training go on.
    x, xv = data()
    vae = fresh()
    vae.encoder.net[0].weight.register_hook(lambda g: torch.full_like(g, 3e38))
    hist = fit(vae, x, xv, train_cfg(epochs=1, batch_size=len(x)), "dynamic", progress=False)
    assert len(hist) == 1 and torch.isfinite(weights(vae)).all()


def test_opposite_infinite_gradients_are_caught():
    # +Inf in one weight and -Inf in another: their sum is NaN, never a finite number.
    x, xv = data()
    vae = fresh()
    vae.encoder.net[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    vae.decoder.net[0].weight.register_hook(lambda g: torch.full_like(g, -float("inf")))
    with pytest.raises(TrainingDiverged, match=r"encoder.net.0.weight, decoder.net.0.weight"):
        fit(vae, x, xv, train_cfg(epochs=1, batch_size=50), "dynamic", progress=False)


def test_the_fused_adam_follows_the_default_adam_within_float_tolerance():
    # The loop's Adam is the fused kernel (one pass a parameter): the same update as the
    # default implementation, rounded differently.
    from vaepipe.training.step import adam

    a, b = fresh(), fresh()
    fused, default = adam(a.parameters(), 1e-3), torch.optim.Adam(b.parameters(), lr=1e-3)
    assert fused.defaults["fused"]
    x = torch.rand(64, *CFG.image_shape, generator=torch.Generator().manual_seed(1))
    for _ in range(30):
        for vae, opt in ((a, fused), (b, default)):
            opt.zero_grad()
            vae.decode(vae.encode(x)[0]).logsumexp((1, 2, 3)).mean().backward()
            opt.step()
    assert not torch.equal(weights(a), weights(b))  # two implementations...
    torch.testing.assert_close(weights(a), weights(b), atol=1e-5, rtol=0)  # ...one update


def test_a_compiled_step_trains_the_eager_model_and_resumes_exactly():
    # train.compile hands the step's forward pass and loss to torch.compile: the same model as
    # eager within float tolerance, and a run stopped between epochs resumes to the same bits.
    x, xv = data(n=300)
    assert len(x) % 64  # a last batch smaller than the others: a graph of its own
    cfg = train_cfg(epochs=2, batch_size=64, warmup_epochs=2, compile="default")
    straight = fresh()
    fit(straight, x, xv, cfg, "dynamic", progress=False)
    eager = fresh()
    fit(eager, x, xv, dataclasses.replace(cfg, compile="none"), "dynamic", progress=False)
    torch.testing.assert_close(weights(straight), weights(eager), atol=1e-4, rtol=0)

    saved = []

    def stop_after_epoch_1(stats):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        fit(
            fresh(),
            x,
            xv,
            cfg,
            "dynamic",
            on_epoch_end=stop_after_epoch_1,
            on_checkpoint=saved.append,
            progress=False,
        )
    assert (saved[-1]["epoch"], saved[-1]["batch"]) == (1, 0)
    torch._dynamo.reset()  # resumed as in a new process: compiled afresh
    resumed = fresh()
    fit(resumed, x, xv, cfg, "dynamic", resume=saved[-1], progress=False)
    assert torch.equal(weights(resumed), weights(straight))
