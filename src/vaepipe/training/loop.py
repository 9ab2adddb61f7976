"""The training loop: Adam on the (beta-)ELBO or the IWAE bound, data held as tensors on the
training device; KL warm-up, free bits, learning-rate schedules, early stopping on the validation
objective, and the best epoch's weights kept.

No file I/O and no MLflow here: each finished epoch is handed to `on_epoch_end`, and the full
loop state (weights, optimizer, RNG, position in the epoch) to `on_checkpoint` after every epoch
and when the loop is interrupted, so the stage script can log, save and later resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vaepipe import signals
from vaepipe.config import TrainConfig
from vaepipe.data.arrays import binarize
from vaepipe.errors import ConfigError
from vaepipe.evaluation.likelihood import evaluate_elbo, iwae_log_likelihood
from vaepipe.model.vae import VAE
from vaepipe.training import distributed
from vaepipe.training.step import (
    TrainingDiverged,
    adam,
    check_finite,
    forward,
    step_loss_terms,
)

__all__ = ["EpochStats", "TrainingDiverged", "fit", "kl_weight", "cosine_lr"]

# Validation examples per forward pass (memory only: the eps of each pass are drawn in turn
# from one generator, so the figures follow the seed, not this size)
VALIDATION_BATCH = 1000


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train: dict[str, float]  # loss, recon, kl, elbo: means over the epoch's examples
    val: dict[str, float]  # recon, kl, elbo on the validation set
    beta: float
    lr: float
    seconds: float
    kl_per_dim: list[float] = field(default_factory=list)  # validation KL per latent dim
    best_epoch: int = 0  # the epoch with the best validation objective so far

    def metrics(self, constant_lr: bool = False) -> dict[str, float]:
        """MLflow's names (docs/metrics.md): `quantity/split` (one run-page section per
        quantity); lr only where a schedule changes it (a constant one is train.lr)."""
        out = {f"{k}/{split}": v for split, k, v in self._terms()}
        out.update({"beta": self.beta, "epoch_seconds": self.seconds})
        out.update({} if constant_lr else {"lr": self.lr})
        return {**out, "best_epoch": self.best_epoch}

    def curves(self) -> dict[str, float]:
        """One row of plots/train/curves.json: `split_quantity` (dvc.yaml's plots)."""
        out = {f"{split}_{k}": v for split, k, v in self._terms()}
        return {**out, "beta": self.beta, "lr": self.lr, "best_epoch": self.best_epoch}

    def _terms(self):
        both = {"train": self.train, "val": self.val}
        return [(split, k, v) for split, terms in both.items() for k, v in terms.items()]


class _Loop:
    """Training state that must survive an interruption: enough to resume bit-for-bit on CPU."""

    def __init__(self, vae: VAE, cfg: TrainConfig, device: torch.device, group: distributed.Group):
        self.vae = vae
        self.opt = adam(vae.parameters(), cfg.lr)
        self.group = group
        # Under torchrun: the VAE in DistributedDataParallel, taking (x slice, eps slice).
        self.model = distributed.wrap(vae, group) if group.enabled else distributed.Step(vae)
        if cfg.compile != "none" and group.enabled:  # torchrun started by hand
            raise ConfigError(
                f"param 'train.compile' = '{cfg.compile}' is for one training process, not "
                f"{group.world_size}; set it to none"
            )
        self.loss_terms = step_loss_terms(self.model, vae, cfg)
        # the KL weight as a device scalar the compiled step reads (None: eager, a float)
        self.beta_scalar = None if cfg.compile == "none" else torch.zeros((), device=device)
        self.cfg = cfg
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.epoch = 0  # epochs completed
        self.batch = 0  # batches completed within the current epoch
        self.perm: torch.Tensor | None = None  # the current epoch's order
        self.y_train: torch.Tensor | None = None  # labels of a conditional model [N]
        self.y_val: torch.Tensor | None = None
        # the data as the epochs see it (`_start`): validation binarized once, and training too
        # for static binarization
        self.x_train: torch.Tensor | None = None
        self.x_val: torch.Tensor | None = None
        self.binarization = "none"
        self.sums = torch.zeros(
            4, device=device, dtype=torch.float64
        )  # n * (loss, recon, kl, elbo)
        self.history: list[EpochStats] = []
        # the best validation objective so far, its epoch and weights (kept as the model)
        self.best_score = -float("inf")
        self.best_epoch = 0
        self.best_model: dict | None = None
        self.bad_epochs = 0  # epochs since the best one (early stopping)
        self.plateau_bad = 0  # epochs without improvement since the last lr cut (plateau)
        self.stopped = False  # early stopping ended the run

    def state_dict(self) -> dict:
        """Tensors, numbers and lists only: loadable with torch.load(weights_only=True)."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.vae.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "gen": self.gen.get_state(),
            "epoch": self.epoch,
            "batch": self.batch,
            "perm": None if self.perm is None else self.perm.cpu(),
            "sums": self.sums.cpu(),
            "history": [dataclasses.asdict(h) for h in self.history],
            "best": {
                "score": self.best_score,
                "epoch": self.best_epoch,
                "model": self.best_model,
                "bad_epochs": self.bad_epochs,
                "plateau_bad": self.plateau_bad,
                "stopped": self.stopped,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.sums.device
        self.vae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.gen.set_state(state["gen"])
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.perm = None if state["perm"] is None else state["perm"].to(device)
        self.sums = state["sums"].to(device)
        self.history = [EpochStats(**h) for h in state["history"]]
        best = state["best"]
        self.best_score, self.best_epoch = best["score"], best["epoch"]
        self.best_model = best["model"]
        self.bad_epochs, self.plateau_bad = best["bad_epochs"], best["plateau_bad"]
        self.stopped = best["stopped"]


def kl_weight(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """beta at optimizer step `step` (0-based): a linear ramp from ~0 to beta over the first
    warmup_epochs epochs (Bowman et al. 2016; Sønderby et al. 2016), then beta."""
    if cfg.warmup_epochs == 0:
        return cfg.beta
    return cfg.beta * min(1.0, (step + 1) / (cfg.warmup_epochs * steps_per_epoch))


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch `epoch` + 1 (epoch = epochs done): lr down to lr_min."""
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs))


def _train_epoch(loop: _Loop, interrupts):
    """Finish the current epoch from loop.batch on; returns ((loss, recon, kl, elbo) means,
    the KL weight of the epoch's last step)."""
    vae, x_train, cfg = loop.vae, loop.x_train, loop.cfg
    n, bs = len(x_train), cfg.batch_size
    vae.train()
    # Interrupts are taken only between whole steps, and never between drawing the epoch's
    # order and its first step, so a saved state always resumes to the same numbers.
    _, stop = _sync_step(loop, interrupts, loop.sums.new_zeros(4))
    if stop:
        raise KeyboardInterrupt(stop)
    if loop.batch == 0:
        # Under torchrun every rank draws the same order and binary pixels: one global draw.
        loop.perm = torch.randperm(n, generator=loop.gen, device=x_train.device)
        loop.sums.zero_()
    steps = math.ceil(n / bs)
    beta = kl_weight(cfg, loop.epoch * steps + loop.batch, steps)
    for i in range(loop.batch * bs, n, bs):
        idx = loop.perm[i : i + bs]
        xb = x_train[idx]
        yb = None if loop.y_train is None else loop.y_train[idx]
        if loop.binarization == "dynamic":
            xb = binarize(xb, loop.gen)
        beta = kl_weight(cfg, loop.epoch * steps + loop.batch, steps)
        with _exemplars(vae, idx, loop.gen):
            loss, check, stats = forward(loop, xb, beta, yb)
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(vae, check, loop.epoch + 1, loop.batch + 1)
        loop.opt.step()
        stats, stop = _sync_step(loop, interrupts, stats)
        loop.sums += stats
        loop.batch += 1
        if stop:
            raise KeyboardInterrupt(stop)
    return (loop.sums / n).tolist(), beta


def _exemplars(vae: VAE, rows: torch.Tensor, generator: torch.Generator):
    """The Exemplar prior's draw for the step on training examples `rows` (see
    ExemplarPrior.drawn); no-op for the other priors."""
    drawn = getattr(vae.prior, "drawn", None)
    return contextlib.nullcontext() if drawn is None else drawn(rows, generator)


def _sync_step(loop: _Loop, interrupts, stats: torch.Tensor):
    """(`stats` summed over the ranks, why to stop or None). Under torchrun one small
    all-reduce carries both, so every rank stops after the same step: a rank stopping alone
    would leave the others waiting in the next gradient all-reduce."""
    if not loop.group.enabled:
        return stats, interrupts.requested
    asked = torch.tensor([float(interrupts.requested is not None)], device=stats.device)
    both = distributed.all_reduce_sum(torch.cat([stats, asked.double()]), loop.group)
    stop = interrupts.requested or ("another rank was interrupted" if both[-1] > 0 else None)
    return both[:-1], stop


def fit(
    vae: VAE,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    cfg: TrainConfig,
    binarization: str,
    *,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    progress: bool = True,
    group: distributed.Group = distributed.SINGLE,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[EpochStats]:
    """Train `vae` on float images in [0, 1] ([N, C, H, W], already on the training device).

    binarization: 'dynamic' draws new binary pixels each epoch, 'static' once, 'none' trains
    on the intensities. `resume`: a state from `on_checkpoint`, continued exactly. `group`: the
    torchrun group; every rank calls fit alike. labels: (train, val) [N] for a conditional model.
    """
    from tqdm.auto import tqdm

    loop = _start(vae, (x_train, x_val), cfg, binarization, resume=resume, group=group)
    loop.y_train, loop.y_val = labels or (None, None)
    bar = tqdm(
        total=cfg.epochs, initial=loop.epoch, desc="train", unit="epoch", disable=not progress
    )
    try:
        with signals.deferred() as interrupts:
            while loop.epoch < cfg.epochs and not loop.stopped:
                stats = _epoch(loop, interrupts)
                loop.history.append(stats)
                _show(bar, stats)
                # saved before it is logged: a store that fails now loses no training
                if on_checkpoint is not None:
                    on_checkpoint(loop.state_dict())
                if on_epoch_end is not None:
                    on_epoch_end(stats)
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM, taken between two steps: save the exact position, then stop. A
        # second one stops at once, maybe mid-step: the last position saved then stays.
        if on_checkpoint is not None and not isinstance(e, signals.InterruptedAtOnce):
            on_checkpoint(loop.state_dict())
        raise
    finally:
        bar.close()
    if loop.best_model is not None:  # the model handed back is the best epoch's
        vae.load_state_dict(loop.best_model)
    return loop.history


def _show(bar, stats: EpochStats) -> None:
    bar.update(1)
    bar.set_postfix_str(f"ELBO train {stats.train['elbo']:.2f} val {stats.val['elbo']:.2f}")


def _start(vae, data, cfg: TrainConfig, binarization: str, *, resume, group) -> _Loop:
    """The loop state (fresh, or `resume`d) holding the data (train, val) as the epochs see it:
    the validation set binarized once with a fixed draw, the training set too for static
    binarization."""
    x_train, x_val = data
    device = x_train.device
    if resume is None and hasattr(vae.prior, "init_from"):  # VampPrior: start at data
        pick = torch.Generator().manual_seed(cfg.seed + 2)  # its own stream: no RNG drift
        idx = torch.randperm(len(x_train), generator=pick)[: len(vae.prior.raw)]
        vae.prior.init_from(x_train[idx.to(device)])
    if vae.cfg.arch == "conv":  # NHWC weights: the convolutions take their faster kernels
        vae.to(memory_format=torch.channels_last)  # (a conv IWAE-5 epoch ~1.2x faster on CPU)
    torch.manual_seed(cfg.seed)
    loop = _Loop(vae, cfg, device, group)
    val_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if binarization != "none":
        x_val = binarize(x_val, val_gen)  # fixed draw: val figures comparable across epochs
    if binarization == "static":
        x_train = binarize(x_train, loop.gen)
    if resume is not None:
        loop.load_state_dict(resume)
    loop.x_train, loop.x_val, loop.binarization = x_train, x_val, binarization
    if hasattr(vae.prior, "use_exemplars"):  # the Exemplar prior: the images as epochs see them
        vae.prior.use_exemplars(x_train)
    return loop


def _epoch(loop: _Loop, interrupts):
    """One epoch (or the rest of a resumed one) and its validation: its EpochStats."""
    t0 = time.perf_counter()
    cfg, x_val = loop.cfg, loop.x_val
    if cfg.lr_schedule == "cosine":
        _set_lr(loop, cosine_lr(cfg, loop.epoch))
    lr = loop.opt.param_groups[0]["lr"]
    (loss, recon, kl, elbo), beta = _train_epoch(loop, interrupts)
    if hasattr(loop.vae.prior, "refresh"):  # the Exemplar prior validates on all exemplars
        loop.vae.prior.refresh()
    val, kl_d = evaluate_elbo(
        loop.vae, x_val, batch_size=VALIDATION_BATCH, seed=cfg.seed, y=loop.y_val
    )
    if cfg.objective == "iwae":
        log_px = iwae_log_likelihood(loop.vae, x_val, cfg.iwae_k, seed=cfg.seed, y=loop.y_val)
        val["iwae"] = log_px.mean().item()
    loop.epoch, loop.batch = loop.epoch + 1, 0
    _after_epoch(loop, cfg, val["iwae" if cfg.objective == "iwae" else "elbo"])
    return EpochStats(
        epoch=loop.epoch,
        train={"loss": loss, "recon": recon, "kl": kl, "elbo": elbo},
        val=val,
        beta=beta,
        lr=lr,
        seconds=time.perf_counter() - t0,
        kl_per_dim=kl_d.tolist(),
        best_epoch=loop.best_epoch,
    )


def _set_lr(loop: _Loop, lr: float) -> None:
    for g in loop.opt.param_groups:
        g["lr"] = lr


def _after_epoch(loop: _Loop, cfg: TrainConfig, score: float) -> None:
    """Book-keeping on the validation objective `score` (higher is better) of the epoch just
    done: the best weights, the plateau lr cut, and early stopping."""
    if score > loop.best_score:
        loop.best_score, loop.best_epoch = score, loop.epoch
        loop.best_model = {k: v.detach().cpu().clone() for k, v in loop.vae.state_dict().items()}
        loop.bad_epochs = loop.plateau_bad = 0
    else:
        loop.bad_epochs += 1
        loop.plateau_bad += 1
    if cfg.lr_schedule == "plateau" and loop.plateau_bad >= cfg.lr_patience:
        _set_lr(loop, max(cfg.lr_min, loop.opt.param_groups[0]["lr"] * cfg.lr_factor))
        loop.plateau_bad = 0
    if cfg.early_stopping and loop.bad_epochs >= cfg.early_stopping:
        loop.stopped = True
