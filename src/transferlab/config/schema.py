"""Typed schema of an experiment.

`conf/` holds plain YAML so that both Hydra (``python -m transferlab``) and
DVC's Hydra composition (``dvc exp run -S``) can compose it without importing
this package. Every entry point then passes the composed config through
:func:`transferlab.config.validate.load_config`, which merges it into these
dataclasses (wrong types and unknown keys fail there) and checks ranges and
names before any tensor exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class DataConfig:
    source: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | imagefolder
    root: str = "data/raw"  # where torchvision datasets are (or get downloaded)
    path: Optional[str] = None  # imagefolder: one subfolder per class
    # What prepare reads from disk, a DVC dependency of stage prepare (dvc.yaml): the image
    # folder, or the loader code for built-in sources. Set by the data group.
    inputs: Optional[str] = "src/transferlab/data/sources.py"
    # The stored size, at prepare time (imagefolder needs it): an image folder's images get their
    # shorter side resized to image_size, then are centre-cropped to a square (aspect kept). Leave
    # room for random-resized-crop: about 1.14x backbone.input_size (torchvision's 256 -> 224).
    image_size: Optional[int] = None
    channels: Optional[int] = None  # 1 or 3; null keeps the source's
    classes: Optional[List[str]] = None  # names (or indices) of the target classes; null = all
    positive_class: Optional[str] = None  # one-vs-rest: this class against all others
    # Cap the training images per class (low-data fine-tuning); validation and test stay whole.
    max_per_class: Optional[int] = None
    # Stratified split fractions. An image folder with train/ and val/ subfolders brings its own
    # split and val_fraction does not apply; test_fraction only carves test from train/ when
    # there is no test/ subfolder.
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    # Seed of the split and of max_per_class's choice; null: the experiment's ``seed``. Set it to vary
    # ``seed`` (initialisation, batch order, augmentation) over one fixed split, as `transferlab report` does.
    split_seed: Optional[int] = None
    download: bool = True


@dataclass
class BackboneConfig:
    # small_cnn | mlp | inception_v3 | any torchvision classification model (resnet18, vit_b_16, ...)
    # | timm/<any timm model> (timm/resnet18, timm/vit_tiny_patch16_224, ...)
    name: str = "small_cnn"
    # null | source | the backbone's published weights: torchvision's (DEFAULT, IMAGENET1K_V1, ...) or
    # timm's (DEFAULT or a pretrained tag, e.g. augreg_in21k_ft_in1k)
    # | a local .safetensors / .pt file | runs:/<id>/<path> | models:/<name>/<version>
    weights: Optional[str] = None
    # Side of the square image the backbone sees (resized on the device). null:
    # the weights' own size (torchvision weights' crop size, or the size an
    # earlier run used), else the data's size, at least the backbone's minimum.
    input_size: Optional[int] = None
    channels: int = 1  # channels the backbone expects; grayscale data is repeated to 3
    # Re-initialise the last N layers (README: "What is a layer") after loading the weights: the early,
    # generic layers transfer, the top ones relearn (with weights=null every layer is random already).
    reinit_last_n: int = 0
    width: int = 32  # small_cnn: channels of the first block (doubles per block)
    depth: int = 3  # small_cnn: number of conv blocks
    hidden: List[int] = field(default_factory=list)  # mlp backbone: hidden layer sizes
    activation: str = "relu"  # mlp backbone


@dataclass
class HeadConfig:
    name: str = "linear"  # linear | mlp | binary | overcomplete
    hidden: List[int] = field(default_factory=list)  # hidden layers before the output layer
    activations: List[str] = field(default_factory=lambda: ["relu"])  # one, or one per hidden layer
    num_units: Optional[int] = None  # overcomplete: output units in all (>= classes)
    pooling: str = "logsumexp"  # overcomplete: logsumexp | max | mean
    init: str = "default"  # default (PyTorch's) | normal (N(0, 0.05), zero bias: Keras' RandomNormal)


@dataclass
class DropoutConfig:
    input: float = 0.2  # on the pixels the backbone sees (the note: 20% on inputs)
    features: float = 0.0  # on the backbone's flattened features
    hidden: float = 0.5  # after each hidden layer of the head (the note: 50%)
    per_layer: Optional[List[float]] = None  # overrides `hidden`, one value per hidden layer


@dataclass
class MaxNormConfig:
    enabled: bool = False
    value: float = 5.0
    layers: List[str] = field(default_factory=lambda: ["head.*"])  # module name patterns


@dataclass
class FreezeConfig:
    first_n: int = 0  # freeze the first N backbone layers (see README: "What is a layer")
    patterns: List[str] = field(default_factory=list)  # parameter name patterns, e.g. backbone.layer1.*
    backbone: bool = False  # freeze the whole backbone
    method: str = "requires_grad"  # requires_grad | zero_lr
    head_only_epochs: int = 0  # train the head alone first, then the configured freezing applies


@dataclass
class RegularisationConfig:
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    max_norm: MaxNormConfig = field(default_factory=MaxNormConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    label_smoothing: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw | adadelta
    lr: float = 0.05  # head learning rate
    backbone_lr_mult: float = 1.0  # backbone lr = lr * this (small for pretrained weights)
    # Layer-wise lr decay (timm's, MMPretrain's): with L backbone layers (README: "What is a layer"), layer i
    # (0-based, input first) gets lr * backbone_lr_mult * layer_decay ** (L - i), the head lr; null: off.
    layer_decay: Optional[float] = None
    weight_decay: float = 0.0  # never applied to biases and norm weights
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    rho: float = 0.9  # adadelta
    eps: float = 1e-8
    # timm's lr_base_size rule: null uses lr as given; else lr is the rate for a batch of lr_base_size and
    # is scaled to the effective batch (trainer.batch_size x accumulate_grad_batches), linearly or by sqrt.
    lr_base_size: Optional[int] = None
    lr_base_scale: str = "linear"  # linear | sqrt


@dataclass
class MomentumScheduleConfig:
    enabled: bool = False
    start: float = 0.5
    end: float = 0.99  # reached at the last epoch, linearly


@dataclass
class SchedulerConfig:
    name: str = "none"  # none | step | exponential | cosine | onecycle | plateau
    step_size: int = 5  # step
    gamma: float = 0.5  # step, exponential
    min_lr_mult: float = 0.0  # cosine: lr * this after the last epoch (T_max = epochs)
    pct_start: float = 0.3  # onecycle
    factor: float = 0.5  # plateau
    patience: int = 2  # plateau
    # Linear learning-rate warm-up before any schedule, per optimiser step: the lr is multiplied by
    # warmup_start_factor at the first step, rising linearly to 1 after warmup_steps steps
    # (or warmup_epochs epochs' worth of steps); 0: no warm-up.
    warmup_epochs: int = 0
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    momentum: MomentumScheduleConfig = field(default_factory=MomentumScheduleConfig)


@dataclass
class AugmentConfig:
    # none | flip | light | standard | digits: applied to each training batch on the device (never to
    # evaluation); see transferlab/training/augment.py for what each does
    name: str = "none"
    p: float = 0.5  # flip, light, standard: probability that a sample is flipped horizontally
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # light, standard: crop area / image area
    ratio: List[float] = field(default_factory=lambda: [0.75, 4 / 3])  # light, standard: crop width / height
    policy: str = "trivial"  # standard: trivial (TrivialAugmentWide) | rand (RandAugment) | none
    num_ops: int = 2  # standard, policy=rand: ops per sample
    magnitude: int = 9  # standard, policy=rand: magnitude bin, 0-30
    erase_p: float = 0.1  # standard: probability of random erasing per sample
    degrees: float = 10.0  # digits: rotation drawn from [-degrees, degrees]
    translate: float = 0.1  # digits: shift drawn from [-translate, translate] x the image's width (height)
    # Mixing of the whole batch after the per-sample transforms (every choice but none), timm's Mixup
    # with per-sample lambdas: mixup and/or cutmix when their alpha > 0 (Beta(alpha, alpha)); each
    # sample is mixed with probability mix_prob (timm: prob); with both on, cutmix with switch_prob.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: Optional[str] = None  # val_acc | val_loss; null: trainer.monitor
    patience: int = 5  # epochs without an improvement before training stops
    min_delta: float = 0.0  # an improvement beats the best so far by more than this


@dataclass
class EmaConfig:
    enabled: bool = False  # evaluate, checkpoint and log an exponential moving average of the weights
    decay: float = 0.999  # per optimiser step
    start_epoch: int = 0  # before this epoch (0-based) the average follows the weights


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1024
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (auto: CUDA, else MPS, else the CPU)
    monitor: str = "val_acc"  # val_acc | val_loss: picks the best checkpoint
    aux_loss_weight: float = 0.4  # inception_v3 auxiliary logits
    amp: bool = False  # mixed precision (autocast) on CUDA, in amp_dtype
    # bfloat16 | float16 (timm's --amp-dtype): float16 adds a gradient scaler, for GPUs without bf16 (T4, V100)
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch
    progress: bool = True
    num_threads: Optional[int] = None  # CPU threads; null = torch's default
    # Memory the training and validation images may occupy on the device (on a CPU run, in RAM), in MB;
    # null: half of what is free. A split that does not fit streams from the prepared files instead.
    memory_budget_mb: Optional[float] = None
    # null | balanced: weight each class's training loss by n_samples / (n_classes * count of the class)
    # in the training split (scikit-learn's class_weight='balanced'); evaluation losses stay unweighted
    class_weight: Optional[str] = None
    accumulate_grad_batches: int = 1  # optimiser step every k batches (the loss of each divided by k)
    # A training split too small for batch_size to give this many optimiser steps per epoch gets smaller
    # batches (n // min_steps_per_epoch): large GPU batches on a few hundred images would leave 2-3 steps.
    min_steps_per_epoch: Optional[int] = None
    # A budget in optimiser steps (Lightning's max_steps): training ends after max_steps optimiser steps or
    # `epochs` epochs, whichever comes first, so that a small training split trains as many steps as a large
    # one. Rounded up to whole epochs (ceil(max_steps / steps per epoch)); counted after min_steps_per_epoch
    # has chosen the batch. null: `epochs` alone. Early stopping can end it sooner.
    max_steps: Optional[int] = None
    gradient_clip_val: Optional[float] = None  # clip the gradients' global L2 norm to this; null: off
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class PretrainConfig:
    """The source task (backbone.weights=source) and its own recipe: optimizer and scheduler take
    the same choices and keys as the top-level groups; the trainer's device settings carry over."""

    classes: Optional[List[str]] = None  # source-task classes (same data source)
    max_per_class: Optional[int] = None
    epochs: int = 5
    batch_size: int = 64
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(name="onecycle"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the source task's own augmentation
    input_dropout: float = 0.2  # the source task's dropout on the pixels (the note's 20%; its head is linear)


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "transferlab"
    run_name: Optional[str] = None
    log_model: bool = True
    log_graph: bool = True
    # Register the run's logged model (a sweep's: the job with the best optimized_metric) under this name in
    # the MLflow model registry, and point the alias at the new version: models:/<name>@<alias> loads it.
    register: Optional[str] = None
    register_alias: str = "champion"


@dataclass
class PathsConfig:
    prepared: str = "data/prepared"  # prepare writes target/ and source/ here
    weights: str = "weights/backbone.safetensors"  # pretrain writes the initial backbone here
    model: str = "models"  # finetune writes best.pt, history and the run id here
    metrics: str = "metrics"
    plots: str = "plots"
    cache: str = "outputs/cache"  # python -m transferlab: prepared data and source weights shared by runs


# trainer.amp_dtype: the autocast dtypes (torch.<name>); float16 trains with a gradient scaler.
AMP_DTYPES = ("bfloat16", "float16")

# Baselines the evaluate stage can fit on the pixels of the training split (``baseline``).
BASELINES = ("logistic",)

# What a sweep's job may return for the sweeper to optimise (``optimized_metric``).
VALIDATION_METRICS = ("best_val_acc", "best_val_loss")


@dataclass
class ExperimentConfig:
    seed: int = 0
    # What a sweep's job returns for the sweeper to optimise: a validation metric (best_val_acc |
    # best_val_loss), never a test metric, so that choosing among the jobs does not select on the test set.
    optimized_metric: str = "best_val_acc"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    regularisation: RegularisationConfig = field(default_factory=RegularisationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # null | logistic: a baseline fitted on the pixels of the same training split. evaluate scores it on the
    # test split beside the model (baseline_test_acc); finetune compares it with a linear probe on the initial
    # backbone's features (on the validation split) and warns when pretrained features lose to raw pixels.
    baseline: Optional[str] = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    composition: Dict[str, str] = field(default_factory=dict)  # conf/ and params digests (compose.py)

    @property
    def split_seed(self) -> int:
        """The seed the data split follows: ``data.split_seed``, else ``seed``."""
        return self.seed if self.data.split_seed is None else self.data.split_seed
