"""The training loop: AMP, DDP, per-iteration schedule, logging, checkpoints, k-NN evaluation.

    for epoch:
        for images in loader.epoch(epoch):          # one weakly augmented view, on device
            loss = distiller(images)                # every teacher and the student see `images`
            backward; optimizer step; lr(step)      # warmup, then cosine, per iteration or per epoch
        checkpoint (atomic); k-NN every eval_every epochs
    SIGTERM or SIGUSR1: every rank stops at the same step boundary, saves, and fit raises Preempted (exit 75)

No host sync inside the step except at logging steps (and, with several processes, every
trainer.stop_check_every steps: the ranks agree on a stop signal). A step whose loss is NaN or inf is
skipped on the device (fastreg.nonfinite) and counted there; trainer.max_bad_steps consecutive ones stop
training at the next logging step or save, before a checkpoint is written.
The step's parts are named phases (fastreg.monitor.PHASES) for torch.profiler and nsys; rank 0's GPU
telemetry is logged with the metrics as gpu/*.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from fastreg import checkpoint as ckpt
from fastreg.config import OptimConfig, TrainConfig
from fastreg.distiller import build_distiller, compile_report
from fastreg.monitor import GPUMonitor, data_phase, phase
from fastreg.nonfinite import BadSteps, BadStepsSeen, build_guard
from fastreg.pipelines import build_loader
from fastreg.preemption import EXIT_PREEMPTED, Preempted, StopSignals
from fastreg.run_log import MetricsLog, attach_log_file, make_progress
from fastreg.step_graph import StepGraph, check_device, lr_tensors

log = logging.getLogger(__name__)


# ============ distributed set-up ============

def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world, device


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed per (seed, epoch, rank): each epoch's randomness is fixed, so a resumed run repeats it exactly."""
    s = (seed * 1_000_003 + epoch * 10_007 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = not on


# ============ optimizer and schedule ============

def build_optimizer(cfg: OptimConfig, params: list, lr: float, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and the name of the implementation that runs (logged)."""
    kw = dict(lr=lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        fused = device.type == "cuda"
        return torch.optim.SGD(params, momentum=cfg.momentum, fused=fused, **kw), f"torch.optim.SGD(fused={fused})"
    if cfg.name in ("lars", "lamb"):
        from timm.optim import Lamb, Lars

        if cfg.name == "lars":
            return Lars(params, momentum=cfg.momentum, **kw), "timm.optim.Lars"
        return Lamb(params, **kw), "timm.optim.Lamb"
    return build_apex_optimizer(cfg, params, kw)


def build_apex_optimizer(cfg: OptimConfig, params: list, kw: dict) -> tuple[torch.optim.Optimizer, str]:
    try:  # NVIDIA apex, built from source; the PyPI package named "apex" is unrelated and has no optimizers
        from apex.optimizers import FusedLAMB, FusedSGD
    except ImportError as e:
        raise RuntimeError(
            f"optim={cfg.name} needs NVIDIA apex (github.com/NVIDIA/apex, built with --cuda_ext), which is not "
            f"importable here ({e}); use optim=sgd, optim=lars or optim=lamb instead"
        ) from e
    if cfg.name == "apex_sgd":
        return FusedSGD(params, momentum=cfg.momentum, **kw), "apex.optimizers.FusedSGD"
    return FusedLAMB(params, **kw), "apex.optimizers.FusedLAMB"


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each lr a float, also where trainer.cuda_graph keeps it in a device tensor: a
    checkpoint resumes with or without the graph, on any device."""
    state = optimizer.state_dict()  # param_groups are fresh dicts: changing them leaves the optimizer as it is
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])
    return state


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """optim.schedule=iteration: linear warmup from 0 to peak, then cosine from peak to min_lr, per iteration."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_lr(epoch: int, base: float, peak: float, warmup_epochs: float, epochs: int) -> float:
    """optim.schedule=epoch, the official codes' rule for 0-based `epoch`: SEED's adjust_learning_rate
    (tools/utils.py) warms up linearly from base (the lr at batch 256) to peak (base x global batch / 256), then
    both it and SimReg's (tools.py, no warmup) decay as peak * 0.5 * (1 + cos(pi * epoch / epochs))."""
    if epoch < warmup_epochs:
        return base + (peak - base) * epoch / warmup_epochs
    return peak * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def lr_scaling_warning(recipe_batch: int | None, global_batch: int, world: int, base: float, peak: float) -> str | None:
    """What to tell the user when the run's global batch is not the one its recipe reproduces."""
    if recipe_batch is None or recipe_batch == global_batch:
        return None
    return (f"global batch {global_batch} (data.batch_size x {world} process(es)) differs from the {recipe_batch} that "
            f"this recipe reproduces (optim.recipe_batch): the lr is scaled linearly to {peak:.4g} = optim.base_lr "
            f"{base:g} x {global_batch}/256, and results may differ from the paper's")


# ============ the trainer ============

class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        t = cfg.trainer
        set_deterministic(t.deterministic)
        self.rank, self.world, self.device = setup_distributed(t.device)
        if t.cuda_graph:
            check_device(self.device, self.world)
        if self.device.type == "cpu" and t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        self.is_main = self.rank == 0
        self.out_dir = Path(t.out_dir)
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # only rank 0 logs
        else:
            make_out_dir(self.out_dir)
            attach_log_file(self.out_dir / "train.log")
            ckpt.remove_partial_saves(self.out_dir)
        self.config_dict = dataclasses.asdict(cfg)
        self.commit = ckpt.git_commit()

        seed_everything(t.seed, -1, 0)  # the same initial weights on every rank
        self.distiller = build_distiller(cfg, self.device)
        resumed = self.read_checkpoint(t.resume)
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.loader = build_loader(cfg.data, rank=self.rank, world_size=self.world, seed=t.seed, device=self.device,
                                   memory_format=memory_format, half=t.precision != "fp32",
                                   checkpoint=self.loader_state(resumed))
        self.global_batch = cfg.data.batch_size * self.world
        self.peak_lr = cfg.optim.base_lr * self.global_batch / 256
        self.total_steps = t.epochs * len(self.loader)
        self.warmup_steps = round(cfg.optim.warmup_epochs * len(self.loader))
        params = [p for p in self.distiller.model.parameters() if p.requires_grad]
        self.optimizer, self.optimizer_impl = build_optimizer(cfg.optim, params, self.peak_lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0  # batch_in_epoch: batches done of epoch `epoch` + 1
        self.signals, self.stop_signal = StopSignals(), 0  # stop_signal: the one every rank agreed on; 0: none
        self.bad_steps = BadSteps(["loss", *(f"loss/{teacher.name}" for teacher in self.distiller.teachers)],
                                  t.max_bad_steps, self.device)
        self.skipped_logged = 0  # bad steps up to the last logging step
        self.compile_reported = False
        if resumed:
            self.resume(resumed)
            self.check_data_position()
        # after the resume: a checkpoint's param groups bring their own `fused`
        self.guard = build_guard(self.distiller.model, self.optimizer, self.scaler)
        self.wrap_model()
        self.run_update = self.update
        if t.cuda_graph:
            lr_tensors(self.optimizer, self.device)
            self.run_update = StepGraph(self.update, self.device)
        self.metrics_log = MetricsLog(self.out_dir, self.is_main, self.step)
        # rank 0 samples its own GPU: it alone writes metrics, and DDP's all-reduces keep the ranks in step
        self.monitor = GPUMonitor(self.device) if t.monitor and self.is_main else None

    def wrap_model(self) -> None:
        def wrap(model):
            if self.world > 1:
                model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            return model

        self.distiller.wrap(wrap)
        if self.cfg.trainer.compile:
            self.distiller.compile(self.cfg.trainer.compile_mode)

    # ---- checkpoints ----

    def state_dict(self, data: list[dict], rng: list[dict]) -> dict:
        return {
            "data": data,  # every rank's loader state: DALI's reader position and shuffle
            "rng": rng,  # every rank's python, numpy and torch generators
            "batch_in_epoch": self.batch_in_epoch,  # > 0: saved inside epoch `epoch` + 1
            "student": self.distiller.student.backbone.state_dict(),
            "heads": self.distiller.model.heads.state_dict(),
            "loss": self.distiller.losses.state_dict(),
            "optimizer": optimizer_state(self.optimizer),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step,
            "config": self.config_dict, "commit": self.commit,
        }

    def save(self, inside_epoch: bool = False) -> Path:
        """The checkpoint's path, on every rank; rank 0 writes it."""
        self.check_finite()  # never write a checkpoint of a diverged model
        data, rng = self.gather(self.loader.state_dict()), self.gather(ckpt.rng_state())
        path = ckpt.checkpoint_path(self.out_dir, self.epoch, self.step if inside_epoch else None)
        if self.is_main:
            ckpt.atomic_save(self.state_dict(data, rng), path)
            ckpt.prune(self.out_dir, self.cfg.trainer.keep_checkpoints)
            log.info("saved %s", path)
        return path

    def gather(self, obj: dict) -> list[dict]:
        """Every rank's `obj`, in rank order (a collective: all ranks call it)."""
        if self.world == 1:
            return [obj]
        objs: list = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def read_checkpoint(self, resume: str) -> dict | None:
        """The checkpoint trainer.resume picks (its path in self.resume_path), checked against this config."""
        found = ckpt.load_resume(resume, self.out_dir)
        self.resume_path, state = found or (None, None)
        if state:
            ckpt.compare_configs(state["config"], self.config_dict, self.resume_path)
        return state

    def loader_state(self, resumed: dict | None) -> dict | None:
        """This rank's saved loader state; the loader checks that it is its own kind."""
        saved = (resumed or {}).get("data") or []
        if len(saved) == self.world:
            return saved[self.rank]
        if saved:
            log.warning("%s holds the data position of %d process(es), this run has %d: the data order restarts",
                        self.resume_path, len(saved), self.world)
        return None

    def check_data_position(self) -> None:
        """A run resumed inside an epoch must continue where the saved one stopped, or it would train on
        some samples twice and count its steps wrong."""
        done = self.batch_in_epoch
        if done and self.loader.position != (self.epoch, done):
            raise ValueError(
                f"{self.resume_path} was saved inside epoch {self.epoch + 1}, after batch {done}, and this run's "
                f"{self.loader.name} loader cannot continue there (its loader, data, world size or batch size "
                "differ; see the warning above). Resume with the same settings, or from a checkpoint saved at an "
                "epoch's end: trainer.resume=<out_dir>/ckpt_epochNNNN.pt"
            )

    def resume(self, state: dict) -> None:
        ckpt.load_state(self.distiller.student.backbone, state["student"], "student", self.resume_path)
        ckpt.load_state(self.distiller.model.heads, state["heads"], "heads", self.resume_path)
        ckpt.load_state(self.distiller.losses, state["loss"], "loss", self.resume_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
        if len(state["rng"]) == self.world:  # otherwise the data position fails inside an epoch, and at an
            ckpt.set_rng_state(state["rng"][self.rank])  # epoch's end the next epoch reseeds anyway
        log.info("resumed from %s (epoch %d, step %d, written at commit %s)", self.resume_path, self.epoch,
                 self.step, state["commit"])

    # ---- the loop ----

    def fit(self) -> dict[str, float]:
        """The last k-NN results. After SIGTERM or SIGUSR1 (StopSignals, installed here only) every rank stops
        at the same step boundary and saves, and fit raises Preempted once the logs are closed."""
        self.log_startup()
        results: dict[str, float] = {}
        saved = None
        with self.signals, self.monitor or nullcontext(), \
                make_progress(self.is_main and self.cfg.trainer.progress) as progress:
            self.log_monitor_start()
            for epoch in range(self.epoch, self.cfg.trainer.epochs):
                self.train_epoch(epoch, progress)
                if self.stop_signal:  # agreed inside the epoch
                    saved = self.save(inside_epoch=True)
                    break
                self.epoch, self.batch_in_epoch = epoch + 1, 0
                saved = self.save()
                if self.eval_due():
                    results = self.evaluate()
                if self.epoch < self.cfg.trainer.epochs and self.stop_agreed():  # the epoch's save holds it all
                    break
            if self.stop_signal and self.world > 1:
                dist.barrier()  # no rank exits before rank 0 has written the checkpoint: a launcher may end
                # the whole group at the first exit
        self.log_monitor_summary()
        self.metrics_log.close()
        if self.stop_signal:
            raise Preempted(self.log_stop(saved))
        return results

    def train_epoch(self, epoch: int, progress) -> None:
        if self.batch_in_epoch == 0:  # resumed inside the epoch, the RNG state came from the checkpoint
            seed_everything(self.cfg.trainer.seed, epoch, self.rank)
        self.distiller.train()
        task = progress.add_task(f"epoch {epoch + 1}/{self.cfg.trainer.epochs}", total=len(self.loader),
                                 completed=self.batch_in_epoch, loss="-", lr="-", ips="-")
        tic, tic_step = time.perf_counter(), self.step
        self.gpu_window()  # drop the samples of the save and k-NN before: the window spans img/s's steps
        for images, _ in data_phase(self.loader.epoch(epoch)):
            loss, metrics, lr = self.train_step(images)
            self.batch_in_epoch += 1
            if self.cfg.trainer.compile and not self.compile_reported:  # the first step compiled every graph
                log.info(compile_report())
                self.compile_reported = True
            if self.step % self.cfg.trainer.log_every == 0:
                ips = self.global_batch * (self.step - tic_step) / (time.perf_counter() - tic)
                self.log_step(loss, metrics, lr, ips, progress, task)
                tic, tic_step = time.perf_counter(), self.step
            progress.advance(task)
            if self.stop_due():
                return  # fit saves
            if self.save_due():
                self.save(inside_epoch=True)

    def train_step(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """One optimizer step on one batch (B, 3, H, W): (loss, metrics, lr), the tensors still on the device.

        A step whose loss is NaN or inf on any rank is skipped on the device. It still counts as a step: the lr
        schedule, the data position and the step numbers of checkpoints stay those of an unbroken run, on
        every rank."""
        lr = self.set_lr()
        loss, metrics, ok = self.run_update(images)  # self.update, or its CUDA graph (trainer.cuda_graph)
        self.bad_steps.record(ok, self.step + 1, {"loss": loss, **metrics})
        self.step += 1
        return loss, metrics, lr

    def update(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Forward, backward and optimizer step: (loss, metrics, ok), ok the 0-dim bool "the loss was finite on
        every rank"; the guard leaves weights, optimizer state and buffers as they were where it is False."""
        with phase("optimizer"):
            self.guard.save()  # before the forward: BatchNorm's running statistics move in it
        loss, metrics = self.distiller(images)
        ok = self.loss_is_finite(loss)
        with phase("student_backward"):
            self.scaler.scale(loss).backward()
        with phase("optimizer"):
            self.guard.skip_unless(ok)  # hands `not ok` to a fused optimizer's kernel
            # fp16: the scaler skips a step whose gradients overflow (its own sync unless the optimizer is
            # fused); with a finite loss that is the scaler's business, not a bad step
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)  # here, not before backward: no gradients held in forward
            self.guard.undo_unless(ok)
        return loss, metrics, ok

    def loss_is_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device, the same on every rank: DDP averages the gradients, so one rank's NaN
        reaches every rank's weights. NCCL queues the all-reduce on the stream: no host sync."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)  # int: gloo and NCCL both reduce it
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite.bool()

    def save_due(self) -> bool:
        """trainer.checkpoint_every steps, except at an epoch's end (the epoch's own save follows)."""
        every = self.cfg.trainer.checkpoint_every
        return every > 0 and self.step % every == 0 and self.batch_in_epoch != len(self.loader)

    def stop_due(self) -> bool:
        """Whether every rank stops after this step: asked at every step in one process, every
        trainer.stop_check_every steps with several; not at an epoch's end (fit asks after the epoch's save)."""
        every = self.cfg.trainer.stop_check_every if self.world > 1 else 1
        return self.step % every == 0 and self.batch_in_epoch != len(self.loader) and self.stop_agreed()

    def stop_agreed(self) -> bool:
        """Whether some rank got a stop signal (its number in self.stop_signal). With several ranks a collective,
        called by all at the same steps: a rank that stopped alone would leave the others waiting in DDP's next
        all-reduce, and the signal may reach one rank only. At its own steps rather than the logging steps' sync,
        so that the delay to the stop is set to fit Slurm's grace period whatever log_every is."""
        self.stop_signal = self.signals.received
        if self.world > 1:
            received = torch.tensor(self.stop_signal, device=self.device)
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
            self.stop_signal = int(received.item())  # a host sync, every stop_check_every steps
        return self.stop_signal != 0

    def log_stop(self, path: Path) -> str:
        message = (f"{signal.Signals(self.stop_signal).name} received: stopped at step {self.step} (epoch "
                   f"{self.step / len(self.loader):.2f}) and saved {path}; fastreg.train exits with code "
                   f"{EXIT_PREEMPTED} (EX_TEMPFAIL). To resume, run the same command again: trainer.resume=auto "
                   f"continues from the newest checkpoint in {self.out_dir}")
        if self.is_main:
            log.warning(message)
        return message

    def set_lr(self) -> float:
        o = self.cfg.optim
        if o.schedule == "epoch":
            lr = epoch_lr(self.step // len(self.loader), o.base_lr, self.peak_lr, o.warmup_epochs, self.cfg.trainer.epochs)
        else:
            lr = lr_at(self.step, self.peak_lr, self.warmup_steps, self.total_steps, o.min_lr)
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):  # trainer.cuda_graph: the graph reads this tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr

    def log_step(self, loss, metrics, lr: float, ips: float, progress, task) -> None:
        skipped = self.skipped_since_log()
        values = {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}, "lr": lr, "img_per_s": ips,
                  "epoch": self.step / len(self.loader), "skipped_steps": skipped, **self.gpu_window()}
        self.metrics_log.write(self.step, values)
        progress.update(task, loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", ips=f"{ips:,.0f}")

    def gpu_window(self) -> dict[str, float]:
        """gpu/* mean and peak since the last call; {} without a monitor or telemetry."""
        return self.monitor.window() if self.monitor else {}

    def log_monitor_start(self) -> None:
        if not self.monitor:
            return
        status = self.monitor.summary()
        if status["available"]:
            log.info("GPU telemetry of %s every %g s: gpu/* in the metrics", self.device, self.monitor.interval_s)
        else:
            log.info("GPU telemetry unavailable (%s): no gpu/* metrics", status["reason"])

    def log_monitor_summary(self) -> None:
        if self.monitor and self.monitor.summary()["available"]:
            log.info("GPU telemetry over the run: %s", json.dumps(self.monitor.summary()))

    def skipped_since_log(self) -> int:
        """Steps skipped since the previous logging step, with a warning if there are any."""
        total = self.check_finite()
        skipped, self.skipped_logged = total - self.skipped_logged, total
        if skipped and self.is_main:
            log.warning("%d step(s) up to step %d had a NaN or inf loss and were skipped (weights and optimizer "
                        "state left as before them); trainer.max_bad_steps=%d consecutive ones stop training",
                        skipped, self.step, self.cfg.trainer.max_bad_steps)
        return skipped

    def check_finite(self) -> int:
        """Raise once trainer.max_bad_steps consecutive steps had a NaN or inf loss; else the number of steps
        skipped so far. Every rank calls it at the same steps (logging steps, saves): the counters are reduced
        over the ranks, so all of them stop together rather than some waiting in the next collective."""
        seen = self.bad_steps.read(self.world)  # a host sync: only at logging steps and saves
        if seen.tripped:
            raise FloatingPointError(self.divergence_message(seen))
        return seen.total

    def divergence_message(self, seen: BadStepsSeen) -> str:
        limit = self.cfg.trainer.max_bad_steps
        losses = ", ".join(f"{name} {value:.4g}" for name, value in seen.losses.items())
        over = f" (mean over the {self.world} ranks)" if self.world > 1 else ""
        return (
            f"the loss was NaN or inf in trainer.max_bad_steps={limit} consecutive steps from step {seen.first} "
            f"(epoch {(seen.first - 1) // len(self.loader) + 1}); at step {seen.first}: {losses}{over}. Those steps "
            f"were skipped: the weights, and any checkpoint written since, are those from before step {seen.first}, "
            f"and the last checkpoint in {self.out_dir} is intact. Lower optim.base_lr, add warmup "
            "(optim.warmup_epochs) or use trainer.precision=bf16/fp32, and check the teacher whose loss is not "
            "finite; then resume from that checkpoint"
        )

    # ---- evaluation ----

    def eval_due(self) -> bool:
        every = self.cfg.trainer.eval_every
        last = self.epoch == self.cfg.trainer.epochs
        return self.cfg.data.val_root is not None and (last or (every > 0 and self.epoch % every == 0))

    def evaluate(self) -> dict[str, float]:
        """knn_eval's figures (knn<k>_majority, knn<k>_weighted, nn1) of the student's pooled feature (rank 0; the
        others wait at the barrier)."""
        results: dict[str, float] = {}
        if self.is_main:
            from fastreg.eval import knn_eval

            d, e = self.cfg.data, self.cfg.eval
            student = self.distiller.student
            student.eval()
            results = knn_eval(student, d.knn_train_root or d.root, d.val_root, d.crop_size, e.batch_size,
                               e.workers, self.device, e.knn_k, e.knn_t, amp_dtype=self.distiller.amp_dtype,
                               loader=d.loader, max_bad_fraction=d.max_bad_fraction, progress=False)
            student.train()
            log.info("epoch %d k-NN: %s", self.epoch, json.dumps(results))
            self.metrics_log.write(self.step, {f"eval/{k}": v for k, v in results.items()})
        if dist.is_initialized():
            dist.barrier()
        return results

    def log_startup(self) -> None:
        if not self.is_main:
            return
        log.info("fastreg commit %s", self.commit)
        log.info("resolved config:\n%s", OmegaConf.to_yaml(OmegaConf.create(self.config_dict)))
        log.info("device %s, world size %d, loader %s (%d batches/epoch), optimizer %s, peak lr %.4g "
                 "(global batch %d), lr schedule per %s", self.device, self.world, self.loader.name, len(self.loader),
                 self.optimizer_impl, self.peak_lr, self.global_batch, self.cfg.optim.schedule)
        log.info("a step whose loss is NaN or inf is %s", self.guard.name)
        o = self.cfg.optim
        warning = lr_scaling_warning(o.recipe_batch, self.global_batch, self.world, o.base_lr, self.peak_lr)
        if warning:
            log.warning(warning)


def make_out_dir(path: Path) -> None:
    """Create trainer.out_dir and check that a file can be written there, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # unnamed (O_TMPFILE): nothing is left behind
            pass
    except OSError as e:
        raise OSError(e.errno, f"trainer.out_dir={path} is not a writable directory ({e.strerror}); checkpoints, "
                               "train.log and the metrics go there. Pass trainer.out_dir=<a directory you can "
                               "write to>, or fix its permissions") from e
