"""Typed configuration: one dataclass per config group, registered in hydra's ConfigStore.

Hydra composes YAML from configs/ onto these schemas, so a misspelled key or a wrong type is an
error at compose time. `to_config(cfg)` refuses the keys that hydra's +key= and ++key= added past the
schemas, then turns the composed DictConfig into dataclasses, which runs every `__post_init__` check below;
the rest of the code only sees validated dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fastreg.placement import auto_precision


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _check_unit_range(key: str, value: list[float]) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
        raise ValueError(f"{key} must be [min, max] with 0 < min <= max <= 1, got {value}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value}")


IMPLS = ("auto", "eager", "triton")
HEAD_KINDS = ("linear", "mlp2", "mlp2_bn", "simreg4", "seed", "mlp")


@dataclass
class HeadConfig:
    """The student's head, one instance per teacher; used in distillation only, dropped on export.

    d = student width, D = teacher width:
      linear   Linear(d,D)
      mlp2     Linear(d,2d)-Linear(2d,D)             (SimReg's --n_mlp_layers 2: mlp_arch.py adds BN/ReLU only
                                                       when n_layers == 4, so its 2-layer head is a factorized linear map)
      mlp2_bn  Linear(d,2d)-BN-ReLU-Linear(2d,D)     (a BYOL-style predictor; not in either paper)
      simreg4  Linear(d,2d)-BN-ReLU-Linear(2d,d)-Linear(d,2d)-BN-ReLU-Linear(2d,D)  (SimReg's official head)
      seed     Linear(d,d)-ReLU-Linear(d,D)                                           (SEED's student MLP)
      mlp      Linear layers through `hidden`, with BN and/or ReLU between them as `bn`/`relu` say
    """

    kind: str = "simreg4"
    hidden: list[int] = field(default_factory=list)  # mlp only: hidden widths, e.g. [1024, 512]
    bn: bool = True  # mlp only: BatchNorm1d after every hidden Linear
    relu: bool = True  # mlp only: ReLU after every hidden Linear (after BN)
    # triton (fastreg.kernels' FusedMLPHead: BN statistics in the GEMM epilogues) | eager | auto: triton only on
    # the GPUs and dtypes where a committed benchmark shows it faster than eager (fastreg.kernel_choice.HEAD_WINS),
    # else eager; train.log says why. Both have the same state_dict, so a checkpoint moves between them.
    impl: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("head.kind", self.kind, HEAD_KINDS)
        _check_choice("head.impl", self.impl, IMPLS)
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("head.kind=mlp needs head.hidden, e.g. head.hidden=[1024,512]")
        if self.kind != "mlp" and self.hidden:
            raise ValueError(f"head.hidden is only used by head.kind=mlp, not {self.kind!r}")


CACHE_REQUIRED = "required"  # teacher.cache in a recipe that needs one (python -m fastreg.cache_teacher unsets it)
TEACHER_FORMATS = ("auto", "torchvision", "moco", "mocov3", "swav", "byol", "simsiam", "dino", "dinov2", "dinov3")


@dataclass
class TeacherConfig:
    """A frozen teacher. Its output is the pooled backbone feature (SimReg) unless `projection`."""

    arch: str = "resnet50"
    # Path to the teacher's weights. "random" builds an untrained teacher: benchmarks and tests only.
    checkpoint: str | None = None
    format: str = "auto"  # checkpoint layout; auto detects it from the key names
    projection: bool = False  # regress the projection head's output (SEED on MoCo) where the checkpoint has one
    momentum_encoder: bool = False  # MoCo v3: load module.momentum_encoder instead of module.base_encoder
    weight: float = 1.0  # weight of this teacher's loss in the weighted mean over teachers
    head: HeadConfig | None = None  # this teacher's head; None uses the global `head`
    name: str | None = None  # label in logs and metrics; defaults to arch (made unique)
    # folded: a conv teacher's BatchNorms folded into its convolutions and its weights stored in the training
    # precision (no per-step casts; fastreg.teacher_inference); the same features up to rounding. eager: the
    # network as loaded, under autocast. auto: folded on CUDA (where eval-mode BatchNorm as its own kernel costs
    # the teacher most), eager elsewhere (CPU runs keep the exact features). Vision transformers run eager either
    # way (nothing to fold).
    inference: str = "auto"
    # folded only: torch.compile the folded backbone with inductor's freezing (weights become graph constants,
    # bias + ReLU and add + ReLU fuse into the convolutions). Costs a compile at the first steps; off by default:
    # turn it on where the throughput ablation's "+compiled teacher" row shows it faster on your GPU.
    compile: bool = False
    # The features of this teacher that `python -m fastreg.cache_teacher` wrote (SimReg's --use_cache): each image's
    # stored feature of its center crop is the target, the teacher never runs and no checkpoint is needed. The whole
    # table is loaded onto the device (ImageNet at 2048-d fp16: 5.2 GB). Its dataset and teacher are checked against
    # this run's at start-up. A cached recipe sets it to "required": the run stops until it is given.
    cache: str | None = None
    # Vision transformers: which tokens make the feature (after the final norm). cls: the class token (dim), as
    # DINO, DINOv2 and DINOv3 use it. cls_avgpool: [class token, mean of the patch tokens] (2 x dim), DINOv2's linear
    # evaluation's input. Register (storage) tokens never enter it.
    feature: str = "cls"
    # The side of the square image the teacher sees: the student's crop is resized to it once on the device
    # (bilinear, antialiased), not decoded twice; so are SEED's small patches (data.small_patches), each one costing
    # a full-size forward. None: the crop as the pipeline gives it. DINOv2 and DINOv3 were trained at 224 (16 x 16
    # patches of 14 px, 14 x 14 of 16 px): their configs set 224. A ViT's input side must be a multiple of its patch.
    input_size: int | None = None
    # The teacher's weights and compute dtype. auto: bf16 for a transformer of 1B+ parameters (ViT-g, 7B) when
    # trainer.precision is bf16, stored so with no autocast around it (half the memory of fp32 weights); every
    # other teacher runs under the run's autocast. fp32: the weights as loaded, under autocast. bf16: always bf16.
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("teacher.format", self.format, TEACHER_FORMATS)
        _check_choice("teacher.feature", self.feature, ("cls", "cls_avgpool"))
        _check_choice("teacher.dtype", self.dtype, ("auto", "fp32", "bf16"))
        if self.input_size is not None:
            _check_positive("teacher.input_size", self.input_size)
        _check_choice("teacher.inference", self.inference, ("auto", "folded", "eager"))
        if self.compile and self.inference == "eager":
            raise ValueError("teacher.compile=true compiles the folded teacher: set teacher.inference=folded or auto")
        _check_positive("teacher.weight", self.weight)
        if self.cache == CACHE_REQUIRED:
            raise ValueError(
                "teacher.cache must be set: this recipe trains against cached teacher features. Write them with "
                "python -m fastreg.cache_teacher PATH <the same overrides>, then pass teacher.cache=PATH"
            )


@dataclass
class StudentConfig:
    arch: str = "resnet18"


@dataclass
class LossConfig:
    """simreg: mean_b ||s/|s| - t/|t|||^2.  seed: cross-entropy of similarity distributions over a queue.
    mse: mean_b ||s - t||^2 (no normalization)."""

    name: str = "simreg"
    # Subtract a running mean of the teacher features before regressing them (DINO-style centering).
    # Off in the papers' recipes. Helps when post-ReLU teacher features share one dominant direction.
    center_teacher: bool = False
    center_momentum: float = 0.9  # center <- m*center + (1-m)*batch_mean; closer to 1 = slower
    queue_size: int = 65536  # seed: teacher embeddings kept; a multiple of the global batch
    tau_s: float = 0.2  # seed: student temperature
    tau_t: float = 1e-4  # seed: teacher temperature; 1e-4 makes p_t almost one-hot on the positive
    # simreg: triton (fastreg.kernels' fused loss and gradient) | eager (PyTorch ops) | auto: triton on CUDA.
    impl: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("loss.name", self.name, ("simreg", "seed", "mse"))
        _check_choice("loss.impl", self.impl, IMPLS)
        if self.impl == "triton" and self.name != "simreg":
            raise ValueError(
                f"loss.impl=triton is the fused simreg loss; loss.name={self.name} runs eager: "
                "set loss.impl=auto or eager"
            )
        _check_positive("loss.tau_s", self.tau_s)
        _check_positive("loss.tau_t", self.tau_t)
        _check_positive("loss.queue_size", self.queue_size)
        if not 0 <= self.center_momentum < 1:
            raise ValueError(f"loss.center_momentum must be in [0, 1), got {self.center_momentum}")


LOADERS = ("auto", "dali", "torchvision", "synthetic")
AUGMENTS = ("weak", "strong", "simclr")
TEACHER_VIEWS = ("same", "weak")
TEACHER_CROPS = ("shared", "independent")


@dataclass
class DataConfig:
    # auto: dali (mixed GPU decoder on cuda, CPU mode otherwise); torchvision only when DALI cannot be imported.
    # dali | torchvision (ImageFolder + PIL, the reference) | synthetic (random tensors on the device)
    loader: str = "auto"
    root: str | None = None  # training ImageFolder (class subfolders of images)
    file_list: str | None = None  # optional "relpath label" list under root instead of scanning it
    val_root: str | None = None  # labelled ImageFolder for k-NN evaluation; None skips evaluation
    knn_train_root: str | None = None  # k-NN memory bank; None uses `root`
    crop_size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random-resized-crop area (SimReg: weak)
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # random-resized-crop aspect ratio
    # The student's view, which the teachers share unless teacher_view=weak (DALI only, except weak):
    #   weak    random-resized crop + flip: SimReg (run.sh: --single_aug --weak_weak)
    #   strong  + MoCo-v2's ColorJitter(0.4,0.4,0.4,0.1) p=0.8 in a random order per image, grayscale p=0.2,
    #           blur p=0.5: SEED with a MoCo-v2 teacher (tools/utils.py mocov2_aug), and with a SwAV teacher at
    #           data.scale=[0.14,1] (swav_aug)
    #   simclr  + grayscale p=0.2, then ColorJitter(0.4,0.4,0.4,0.4) on every image in a random order, no blur:
    #           SEED with a SimCLR teacher (simclr_aug, the same as its mocov1_aug)
    augment: str = "weak"
    # What the teachers see. same: the student's view. weak: a weak view (crop + flip, no colours), the student
    # getting data.augment's colours on top; its crop box and flip are data.teacher_crop's. DALI only.
    teacher_view: str = "same"
    # With teacher_view=weak, where the teachers' crop comes from:
    #   shared       the student's very crop box and flip, so the teacher's target describes the pixels the student
    #                sees (a setting of fastreg's, not in SimReg's Table 7).
    #   independent  a random-resized crop and a flip of their own, drawn apart from the student's: SimReg's
    #                --weak_strong (dataloader.py TwoCropsTransform) with augment=strong, or --weak_weak without
    #                --single_aug with augment=weak. SimReg's Table 7 (MoCo-v2 R50 -> ResNet-18) finds different
    #                crops no better: weak/weak 54.7 1-NN against 54.8 for one shared view, and the weak teacher /
    #                strong student pair 51.1. Keep shared unless reproducing those rows. The image is then decoded
    #                whole, without DALI's region-of-interest decode, as with small patches.
    # Only teacher_view=weak has a crop of its own: independent with teacher_view=same is an error.
    teacher_crop: str = "shared"
    # SEED's small patches (main_small-patch.py, swav_small_aug): per image this many extra crops of
    # small_patch_size px at small_patch_scale, each with its own crop, flip and data.augment colours, through
    # student and teachers; loss=seed adds their term over a second queue. 0: none; SEED's recipe: 6 at 96 px,
    # scale 0.05-0.14. With teacher_view=weak the teachers still see the patches with their colours (SEED's teacher
    # sees the student's patches; the official code has no weak view). Each patch is one more forward of both
    # networks at (96/224)^2 of the pixels: 6 patches cost about as much as the global view again. DALI only; the
    # image is decoded whole (no region-of-interest decode).
    small_patches: int = 0
    small_patch_size: int = 96
    small_patch_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    batch_size: int = 256  # per process; lr scales with the global batch (batch_size x world size)
    workers: int = 8  # CPU threads per process: DataLoader workers or DALI threads; ~ CPU cores / GPUs
    # DALI: share of JPEGs sent to the hardware decoder (A100/H100 NVJPG); the rest go to nvJPEG's CUDA
    # path. The best value depends on data.workers: sweep it with python -m benchmarks.data_throughput.
    hw_decoder_load: float = 0.65
    prefetch: int = 2  # DALI batches prepared ahead; raise it when the data loader time is spiky
    # DALI resize: antialias=false is faster on CPU (15-24% on 2 cores: python -m benchmarks.data_throughput)
    # but aliases on downscaled crops.
    antialias: bool = True
    max_bad_fraction: float = 0.01  # fail when more of the images than this fail the index's decode check
    synthetic_batches: int = 50  # synthetic: batches per epoch
    synthetic_classes: int = 10  # synthetic: number of random labels

    def __post_init__(self) -> None:
        _check_choice("data.loader", self.loader, LOADERS)
        _check_choice("data.augment", self.augment, AUGMENTS)
        _check_positive("data.batch_size", self.batch_size)
        _check_positive("data.crop_size", self.crop_size)
        _check_positive("data.prefetch", self.prefetch)
        _check_unit_range("data.scale", self.scale)
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"data.ratio must be [min, max] with 0 < min <= max, got {self.ratio}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"data.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.augment != "weak" and self.loader == "torchvision":
            raise ValueError(f"data.augment={self.augment} is built with DALI ops: use data.loader=dali or auto")
        _check_choice("data.teacher_view", self.teacher_view, TEACHER_VIEWS)
        _check_choice("data.teacher_crop", self.teacher_crop, TEACHER_CROPS)
        if self.teacher_crop == "independent" and self.teacher_view != "weak":
            raise ValueError(
                f"data.teacher_crop=independent draws the teachers' own crop, and data.teacher_view={self.teacher_view} "
                "shows them the student's view: set data.teacher_view=weak or data.teacher_crop=shared"
            )
        if self.teacher_view == "weak" and self.augment == "weak" and self.teacher_crop == "shared":
            raise ValueError(
                "data.teacher_view=weak gives the teachers the weak view of the student's crop and the student "
                "data.augment's, which is weak too: set data.augment=strong (SimReg's --weak_strong), "
                "data.teacher_crop=independent (two weak crops) or data.teacher_view=same"
            )
        if self.small_patches < 0:
            raise ValueError(f"data.small_patches must be >= 0 (0: none), got {self.small_patches}")
        _check_positive("data.small_patch_size", self.small_patch_size)
        if self.small_patches and self.small_patch_size > self.crop_size:
            raise ValueError(
                f"data.small_patch_size={self.small_patch_size} is larger than data.crop_size={self.crop_size}: "
                "the small patches are small crops beside the global view (SEED: 96 px at crop 224); set "
                f"data.small_patch_size <= {self.crop_size}"
            )
        _check_unit_range("data.small_patch_scale", self.small_patch_scale)
        if self.loader == "torchvision" and (self.teacher_view == "weak" or self.small_patches):
            raise ValueError(
                "data.teacher_view=weak and data.small_patches are built with DALI ops: use data.loader=dali or auto"
            )


OPTIMIZERS = ("sgd", "lars", "lamb", "apex_sgd", "apex_lamb")


SCHEDULES = ("iteration", "epoch")


@dataclass
class OptimConfig:
    name: str = "sgd"
    base_lr: float = 0.05  # lr at a global batch of 256; the run uses base_lr * global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # iteration: linear warmup from 0 to the peak lr, then cosine to min_lr, set every step (smoother at large
    #            batch). epoch: the official codes' rule, set once per epoch (SEED tools/utils.py
    #            adjust_learning_rate; SimReg tools.py is the same with no warmup): while epoch < warmup_epochs
    #            lr = base_lr + (peak - base_lr) * epoch / warmup_epochs (flat at a global batch of 256), then
    #            peak * 0.5 * (1 + cos(pi * epoch / epochs)), the cosine counted from epoch 0.
    schedule: str = "iteration"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0  # iteration schedule only: the cosine's floor
    # The global batch (data.batch_size x processes) that the recipe reproduces, as the paper ran it (SimReg and
    # SEED: 256). A run at another global batch scales the lr linearly and says so in a warning; None: no recipe.
    recipe_batch: int | None = None

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        _check_positive("optim.base_lr", self.base_lr)
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.schedule == "epoch" and self.min_lr:
            raise ValueError(
                f"optim.min_lr={self.min_lr} is the iteration schedule's floor; the epoch schedule (the "
                "official codes' rule) decays to 0: set optim.min_lr=0 or optim.schedule=iteration"
            )
        if self.recipe_batch is not None:
            _check_positive("optim.recipe_batch", self.recipe_batch)


@dataclass
class TrainerConfig:
    epochs: int = 130
    # Autocast dtype of teacher and student: bf16 | fp16 (with a GradScaler) | fp32 (no autocast) | auto: bf16 on
    # CUDA and on CPUs with native bf16, fp32 on other CPUs (which emulate bf16 20-40x slower than fp32). auto is
    # resolved here, so train.log and checkpoints hold the precision that ran.
    precision: str = "auto"
    channels_last: bool = True
    # torch.compile the student and heads (one graph) and the losses (another); train.log gives the graphs and graph
    # breaks after the first step (none for the registered students, heads and losses). Off by default: turn it on
    # where `bash benchmarks/gpu_check.sh step` shows it faster on your GPU (compilation costs the first steps).
    compile: bool = False
    # torch.compile's mode: default | max-autotune-no-cudagraphs (autotuned GEMMs and convolutions: longer first
    # steps) | reduce-overhead (CUDA graphs: a static batch, the last partial batch of an epoch recompiles).
    compile_mode: str = "default"
    # Capture the whole update (forward, teachers, losses, backward, NaN guard, fused SGD) as one CUDA graph after
    # 3 eager steps and replay it for every batch (fastreg.step_graph): no Python between the step's kernels. One
    # CUDA process, bf16 or fp32, optim=sgd, not with compile_mode=reduce-overhead. Off by default: turn it on
    # where `bash benchmarks/gpu_check.sh step` shows it faster on your GPU.
    cuda_graph: bool = False
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    # CPU runs: intra-op threads; 0 keeps torch's default. Tiny models run fastest with 1 (on the 2-core CI
    # machines 2 threads ran the demo's CNNs 10x slower than 1: the threads spin against each other).
    cpu_threads: int = 0
    seed: int = 0
    deterministic: bool = False  # bitwise-reproducible kernels (slower); needed for exact resume checks
    # Iterations between logged metrics, and each epoch's last one (the only host syncs in the loop). Lower it to
    # see the loss move within an epoch; each one costs a host sync.
    log_every: int = 50
    # Consecutive steps with a NaN or inf loss that stop training. Each one is skipped on the device (weights
    # and optimizer state as before it; it still counts for the lr schedule and the data position) and
    # logged as skipped_steps. A few isolated ones (a bad batch, an fp16 overflow in the forward) are
    # harmless; a long run means divergence. Checked at logging steps and saves, so the stop comes up to
    # log_every steps later, every step in between skipped. 1 stops at the first bad step.
    max_bad_steps: int = 10
    eval_every: int = 0  # epochs between k-NN evaluations; 0 = only at the end
    # auto: the newest readable checkpoint in out_dir (an unreadable one is skipped with a warning) | none: start
    # afresh, the folder's earlier files moved into out_dir/previous/<UTC time>/ (never deleted) |
    # path/to/checkpoint.pt (must be readable: no fallback). A run folder holds one run (fastreg.run_folder).
    resume: str = "auto"
    # Resume although settings that change the result differ from the checkpoint's (e.g. more trainer.epochs:
    # the cosine schedule is stretched from the resumed step on). false refuses, listing every difference;
    # logging, saving, evaluation and worker settings may differ either way (fastreg.checkpoint.FREE_KEYS).
    resume_force: bool = False
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, tensorboard
    # Newest epoch-end checkpoints kept (0: all), and as many saves inside the epoch after them; older ones of
    # this run are deleted after a save, never the one just written nor a newer one.
    keep_checkpoints: int = 2
    # Steps between checkpoints inside an epoch (0: only at epoch ends): a killed run loses at most this
    # many steps. Each save writes the student, heads, optimizer state and the data position.
    checkpoint_every: int = 0
    # With several processes: steps between the ranks' agreement on a stop signal (SIGTERM or SIGUSR1, see
    # README "Preemption on Slurm"): an all-reduce of one int and a host sync, both small. After the signal
    # the run trains up to this many steps, then saves; keep stop_check_every x step time + the save time
    # well inside the grace period (Slurm's --signal=USR1@120: 120 s; preemption's GraceTime: often 30-120 s).
    # A single process checks at every step, at no cost.
    stop_check_every: int = 20
    progress: bool = True  # rich progress bar (rank 0)
    # Rank 0 samples its GPU through NVML (utilization, memory, power, SM clock) every 0.1 s and logs their
    # mean and peak since the last logging step as gpu/*. The sampler thread costs < 1% of a CPU core; false
    # removes it. CPU runs and machines without NVML log the reason once and nothing else.
    monitor: bool = True

    def __post_init__(self) -> None:
        _check_positive("trainer.epochs", self.epochs)
        _check_choice("trainer.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _check_choice("trainer.device", self.device, ("auto", "cuda", "cpu"))
        if self.precision == "auto":
            self.precision = auto_precision(self.device)
        _check_choice(
            "trainer.compile_mode", self.compile_mode, ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
        )
        _check_positive("trainer.log_every", self.log_every)
        if self.max_bad_steps < 1:
            raise ValueError(
                f"trainer.max_bad_steps must be >= 1 (1: stop at the first NaN or inf loss), got {self.max_bad_steps}"
            )
        if self.cpu_threads < 0:
            raise ValueError(f"trainer.cpu_threads must be >= 0, got {self.cpu_threads}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"trainer.keep_checkpoints must be >= 0 (0: keep all), got {self.keep_checkpoints}")
        if self.checkpoint_every < 0:
            raise ValueError(f"trainer.checkpoint_every must be >= 0 (0: epoch ends only), got {self.checkpoint_every}")
        _check_positive("trainer.stop_check_every", self.stop_check_every)
        if self.cuda_graph and self.precision == "fp16":
            raise ValueError(
                "trainer.cuda_graph=true cannot capture fp16's GradScaler, which updates its scale on the "
                "host: use trainer.precision=bf16 (or fp32), or trainer.cuda_graph=false"
            )
        if self.cuda_graph and self.compile_mode == "reduce-overhead":
            raise ValueError(
                "trainer.compile_mode=reduce-overhead captures CUDA graphs of its own inside the step that "
                "trainer.cuda_graph=true captures whole: pick one (compile_mode=default with cuda_graph)"
            )


@dataclass
class EvalConfig:
    # k-NN during and after training: the knn_k nearest by cosine similarity vote twice, once each (SimReg's
    # majority vote, eval_knn.py) and weighted by exp(sim / knn_t) (DINO's); logged as eval/knn<k>_majority,
    # eval/knn<k>_weighted and eval/nn1
    knn_k: int = 20
    knn_t: float = 0.07
    batch_size: int = 256
    workers: int = 8
    # the features' precision: fp32 as python -m fastreg.eval's default, so that a run's k-NN and the CLI's on
    # its checkpoint agree (bf16 moved them by 1-2 points on the demo); bf16 or fp16 is faster on a GPU
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check_choice("eval.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.knn_k < 1:
            raise ValueError(f"eval.knn_k must be >= 1 (the neighbours that vote), got {self.knn_k}")
        _check_positive("eval.knn_t", self.knn_t)
        _check_positive("eval.batch_size", self.batch_size)
        if self.workers < 0:
            raise ValueError(f"eval.workers must be >= 0, got {self.workers}")


@dataclass
class TrainConfig:
    name: str = "default"  # run name; the output directory is runs/<name> unless hydra.run.dir is set
    teacher: TeacherConfig | None = None  # one teacher (the teacher= group) ...
    teachers: list[TeacherConfig] = field(default_factory=list)  # ... or several; replaces `teacher`
    student: StudentConfig = field(default_factory=StudentConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: bool = False  # experiment=demo: build (or reuse) the demo's data and teacher, and set their paths

    def __post_init__(self) -> None:
        # each teacher's key in overrides and messages: teacher, or teachers.<i> (not a field: not saved)
        self.teacher_keys = [f"teachers.{i}" for i in range(len(self.teachers))] or ["teacher"]
        if not self.teachers:
            if self.teacher is None:
                raise ValueError("no teacher: pick one with teacher=<arch> or list several under teachers:")
            self.teachers = [self.teacher]
        self.teacher = None
        _name_teachers(self.teachers)
        for t in self.teachers:
            if t.head is None:
                t.head = self.head
        self._check_required()
        self._check_views()
        if self.trainer.cuda_graph and self.optim.name != "sgd":
            raise ValueError(
                f"trainer.cuda_graph=true needs optim=sgd (torch's fused SGD takes its lr as a device "
                f"tensor), not optim={self.optim.name}: set optim=sgd or trainer.cuda_graph=false"
            )

    def paths(self) -> dict[str, str]:
        """The data folders, file list and teacher weights this config names, by key: those that are set."""
        d = self.data
        keys = {
            "data.root": d.root,
            "data.file_list": d.file_list,
            "data.val_root": d.val_root,
            "data.knn_train_root": d.knn_train_root,
            **{f"{key}.checkpoint": t.checkpoint for key, t in zip(self.teacher_keys, self.teachers)},
            **{f"{key}.cache": t.cache for key, t in zip(self.teacher_keys, self.teachers)},
        }
        return {key: value for key, value in keys.items() if value is not None}

    def _check_views(self) -> None:
        """What each view needs: small patches a loss with their term, a cached teacher dataset positions and no
        view of its own."""
        d = self.data
        if d.small_patches and self.loss.name != "seed":
            raise ValueError(
                f"data.small_patches={d.small_patches} feeds SEED's second queue, and loss={self.loss.name}: set "
                "loss=seed or data.small_patches=0"
            )
        for key, t in zip(self.teacher_keys, self.teachers):
            if t.cache is None:
                continue
            if d.teacher_view != "same" or d.small_patches:
                raise ValueError(
                    f"{key}.cache holds one feature per image; it cannot see data.teacher_view=weak or small patches: "
                    f"unset {key}.cache or those"
                )
            if d.loader == "synthetic":
                raise ValueError(f"{key}.cache is looked up by dataset position, and data.loader=synthetic has none")

    def _check_required(self) -> None:
        """Values without a sensible default (checked here, not in the groups, whose defaults must build)."""
        for key, t in zip(self.teacher_keys, self.teachers):
            if t.checkpoint is None and t.cache is None and not self.demo:  # the demo trains its own teacher
                raise ValueError(
                    f"{key}.checkpoint is not set (teacher {t.name!r}): pass {key}.checkpoint=/path/to/weights.pth "
                    f"(or {key}.checkpoint=random for an untrained teacher in benchmarks)"
                )
        if self.data.loader != "synthetic" and self.data.root is None and not self.demo:
            raise ValueError(f"data.root is not set: pass data.root=/path/to/ImageFolder (loader={self.data.loader})")


def _name_teachers(teachers: list[TeacherConfig]) -> None:
    """Give every teacher a unique label: its name, else its arch, suffixed by its index on a clash."""
    labels = [t.name or t.arch for t in teachers]
    for i, t in enumerate(teachers):
        t.name = labels[i] if labels.count(labels[i]) == 1 else f"{labels[i]}_{i}"


def to_config(cfg: DictConfig) -> TrainConfig:
    """Resolve and validate a composed config into dataclasses (runs every __post_init__)."""
    _check_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig)
    return OmegaConf.to_object(cfg)


def _check_keys(node: object, schema: type, prefix: str = "") -> None:
    """Refuse every key of the composed config (plain dicts and lists) that the dataclass `schema` lacks, at
    any depth. Hydra's +key= and ++key= add keys that no schema checks (hydra suggests +key= for a key it
    does not know), and OmegaConf.to_object drops them without a word: a misspelled setting would run with
    its default. (hydra.* is not in the composed config.)"""
    if not isinstance(node, dict):
        return  # None (an Optional section that is not set) or an interpolation
    known = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        if key not in known:
            raise ValueError(_not_a_setting(f"{prefix}{key}", prefix, known))
        section = _section_schema(hints[key])
        if section is None:
            continue
        if isinstance(value, list):  # teachers: list[TeacherConfig]
            for i, item in enumerate(value):
                _check_keys(item, section, f"{prefix}{key}.{i}.")
        else:
            _check_keys(value, section, f"{prefix}{key}.")


def _section_schema(hint: object) -> type | None:
    """The dataclass a field holds: the field's type, or X in `X | None` and `list[X]`; None for a value."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)


def _not_a_setting(key: str, prefix: str, known: list[str]) -> str:
    """'optim.lrr is not a setting (optim has: name, base_lr, ...; did you mean optim.min_lr or optim.base_lr?)'"""
    section = f"{prefix[:-1]} has" if prefix else "the config's top level has"
    # cutoff 0.4: 'lrr' is 0.44 like 'min_lr' and 0.4 like 'base_lr' (difflib's default 0.6 finds neither)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3, cutoff=0.4)
    guess = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    return (
        f"{key} is not a setting ({section}: {', '.join(known)}{guess}): fix its name or remove it (hydra adds a "
        "key given with + or ++ whatever its name, and the run would ignore it)"
    )


NO_DATA_FOLDER_NAME = "custom"  # experiment=none without data.root (data=synthetic)


def run_name(root: str | None) -> str:
    """experiment=none's run name (the `run_name` resolver): the data folder's name, so that runs on two folders
    land in two run folders; a folder named train is named by its parent (/data/flowers/train: flowers), as
    ImageFolder datasets hold train/ and val/. `name=` on the command line replaces it."""
    if root is None:
        return NO_DATA_FOLDER_NAME
    path = os.path.abspath(os.path.expanduser(root))  # not resolve(): a symlink's own name is the one given
    name = os.path.basename(path)
    if name == "train":
        name = os.path.basename(os.path.dirname(path))
    return name or NO_DATA_FOLDER_NAME  # "/" has no name


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=TrainConfig)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)


register_configs()
