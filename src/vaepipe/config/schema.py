"""What the params are: one dataclass per section of params.yaml, each field with its type and
what it allows (choices, a range), and no default: params.yaml is where every value lives.

Parsing and the checks of combinations are in vaepipe.config (`load`, `from_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DATASETS = ("fashion-mnist", "mnist", "digits", "npz")
BINARIZE = ("dynamic", "static", "none")
LIKELIHOODS = ("bernoulli", "gaussian", "continuous_bernoulli")
HIERARCHICAL_ARCHS = ("hvae", "hvae_topdown", "convhvae")  # two stochastic layers
ARCHS = ("mlp", "conv", *HIERARCHICAL_ARCHS)
ACTIVATIONS = ("relu", "silu", "elu", "tanh", "gated")
IWAE_GRADIENTS = ("standard", "dreg")
PRIORS = ("standard", "vamp", "mog", "exemplar")
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "cosine", "plateau")
PRECISIONS = ("fp32", "bf16")
# torch.compile of the training step: none, or one of torch.compile's modes
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
DEVICES = ("auto", "cpu", "cuda")
PROVIDERS = ("auto", "cpu", "cuda")


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    return {"range": (lo, hi, lo_open, hi_open)}


# torch and numpy seeds: 0 .. 2^32 - 1 keeps every generator (and seed + 1) in range
SEED = _range(0, 2**32 - 1)
# Widths of layers and of z: far beyond any VAE, yet small enough that torch can size every
# weight (larger ones overflow its int64 shapes); memory is checked against the real model.
MAX_WIDTH = 2**20
# torch's intra-op threads: beyond any machine's cores (libgomp fails to allocate far above)
MAX_THREADS = 1024


# No defaults here: params.yaml is the one place where every key has its value (and its unit
# and meaning in a comment). A key missing from it is an error, never a silent fallback.


@dataclass
class DataConfig:
    dataset: str = field(metadata=_choice(*DATASETS))
    root: str = field(metadata={})
    npz_path: str = field(metadata={})
    download: bool = field(metadata={})
    mirror: str = field(metadata={})
    val_fraction: float = field(metadata=_range(0, 1, lo_open=True, hi_open=True))
    binarize: str = field(metadata=_choice(*BINARIZE))
    seed: int = field(metadata=SEED)


@dataclass
class ModelConfig:
    arch: str = field(metadata=_choice(*ARCHS))
    hidden: list = field(metadata={"item": int})
    channels: list = field(metadata={"item": int})
    latent_dim: int = field(metadata=_range(1, MAX_WIDTH))
    likelihood: str = field(metadata=_choice(*LIKELIHOODS))
    gaussian_sigma: float = field(metadata=_range(0, lo_open=True))
    learn_sigma: bool = field(metadata={})
    min_sigma: float = field(metadata=_range(0, lo_open=True))
    prior: str = field(metadata=_choice(*PRIORS))
    prior_components: int = field(metadata=_range(1, 1_000_000))
    z1_dim: int = field(metadata=_range(1, MAX_WIDTH))
    conditional: bool = field(metadata={})
    activation: str = field(metadata=_choice(*ACTIVATIONS))


@dataclass
class TrainConfig:
    epochs: int = field(metadata=_range(1))
    batch_size: int = field(metadata=_range(1))
    lr: float = field(metadata=_range(0, lo_open=True))
    objective: str = field(metadata=_choice(*OBJECTIVES))
    iwae_k: int = field(metadata=_range(1, 10_000))
    iwae_gradient: str = field(metadata=_choice(*IWAE_GRADIENTS))
    beta: float = field(metadata=_range(0))
    warmup_epochs: int = field(metadata=_range(0))
    free_bits: float = field(metadata=_range(0))
    lr_schedule: str = field(metadata=_choice(*LR_SCHEDULES))
    lr_min: float = field(metadata=_range(0))
    lr_patience: int = field(metadata=_range(1))
    lr_factor: float = field(metadata=_range(0, 1, lo_open=True, hi_open=True))
    early_stopping: int = field(metadata=_range(0))
    image_every: int = field(metadata=_range(0))
    seed: int = field(metadata=SEED)
    device: str = field(metadata=_choice(*DEVICES))
    threads: int = field(metadata=_range(0, MAX_THREADS))
    precision: str = field(metadata=_choice(*PRECISIONS))
    compile: str = field(metadata=_choice(*COMPILE_MODES))
    resume: bool = field(metadata={})
    # torchrun launched by the stage itself (distributed.launch) when nproc * nnodes > 1
    nproc: int = field(metadata=_range(1, 1024))
    nnodes: int = field(metadata=_range(1, 1024))
    node_rank: int = field(metadata=_range(0, 1023))
    rdzv_endpoint: str = field(metadata={})


@dataclass
class EvaluateConfig:
    # [k, batch, pixels] samples at once; beyond 1e5 per image it no longer fits in memory
    iwae_k: int = field(metadata=_range(1, 100_000))
    iwae_n: int = field(metadata=_range(0))
    batch_size: int = field(metadata=_range(1))
    seed: int = field(metadata=SEED)
    # a grid of more images is unreadable (and the worst-reconstruction picture decodes them all)
    n_images: int = field(metadata=_range(1, 1024))
    active_threshold: float = field(metadata=_range(0, lo_open=True))
    probe_train_size: int = field(metadata=_range(0))
    knn_k: int = field(metadata=_range(1))
    traversal_dims: int = field(metadata=_range(1))
    ood_n: int = field(metadata=_range(1))
    fid_n: int = field(metadata=_range(2))


@dataclass
class ClassifierConfig:
    epochs: int = field(metadata=_range(1))
    batch_size: int = field(metadata=_range(1))
    lr: float = field(metadata=_range(0, lo_open=True))
    seed: int = field(metadata=SEED)


@dataclass
class ExportConfig:
    # torch's exporter writes opset 18 and up (lower ones silently come out as 18);
    # onnxruntime 1.31 loads up to 26 (and newer opsets fall back to 18 in the converter)
    opset: int = field(metadata=_range(18, 26))
    parity_atol: float = field(metadata=_range(0, lo_open=True))
    fp16_parity_atol: float = field(metadata=_range(0, lo_open=True))
    int8_parity_atol: float = field(metadata=_range(0, lo_open=True))
    provider: str = field(metadata=_choice(*PROVIDERS))
    encoder_model: str = field(metadata={})
    decoder_model: str = field(metadata={})
    scorer_model: str = field(metadata={})
    serve_max_batch: int = field(metadata=_range(1))
    # [k, batch, pixels] floats per call: more than 1e4 samples an image is a benchmark, not a
    # deployment
    scorer_k: int = field(metadata=_range(1, 10_000))
    scorer_seed: int = field(metadata=SEED)
    scorer_max_batch: int = field(metadata=_range(1))


@dataclass
class MlflowConfig:
    experiment: str = field(metadata={"nonempty": True})


@dataclass
class Params:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    classifier: ClassifierConfig
    export: ExportConfig
    mlflow: MlflowConfig


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "classifier": ClassifierConfig,
    "export": ExportConfig,
    "mlflow": MlflowConfig,
}
