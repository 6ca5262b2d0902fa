"""The training loop: AMP, DDP, per-iteration schedule, checkpoints, k-NN evaluation.

    check_before_work(cfg)                          # fastreg.preflight: paths, memory, output folders
    for epoch:
        for batch in loader.epoch(epoch):           # the student's view (+ the teachers', patches), on device
            loss = distiller(batch)                 # by default every teacher and the student see batch.images
            backward; optimizer step; lr(step)      # warmup, then cosine, per iteration or per epoch
        checkpoint (atomic); k-NN every eval_every epochs
    curves.png: the loss, lr and k-NN curves of metrics.jsonl (fastreg.plot); a failure to draw is a warning
    SIGTERM or SIGUSR1: every rank stops at the same step boundary, saves, and fit raises Preempted (exit 75);
    in the final evaluation, after the last save, at once (preemption.stop_now, exit 75 too)
    resumed at the end: the final k-NN evaluation if metrics.jsonl lacks it, else one line saying it had finished

No host sync inside the step except at logging steps (and, with several processes, every
trainer.stop_check_every steps: the ranks agree on a stop signal). A step whose loss is NaN or inf is skipped
on the device and counted; trainer.max_bad_steps consecutive ones stop training before the next checkpoint.
The parts, each in its own module: checkpointer (what a save holds), nonfinite (the guard, the divergence
check), preemption (the stop agreement), run_log (train.log, metrics, telemetry), optim (optimizer, lr schedule),
distributed (ranks, seeds), step_graph (the CUDA graph).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastreg import checkpoint as ckpt
from fastreg import checkpointer
from fastreg.checkpointer import Checkpointer, Entry, Progress
from fastreg.config import TrainConfig
from fastreg.distiller import build_distiller, compile_report
from fastreg.distributed import ddp, failures_shared, gather, seed_everything, set_deterministic, setup_distributed
from fastreg.monitor import data_phase, phase
from fastreg.nonfinite import Divergence, build_guard
from fastreg.optim import LrSchedule, build_optimizer, lr_scaling_warning, optimizer_state
from fastreg.pipelines import Batch, build_loader
from fastreg.placement import Placement
from fastreg.plot import write_curves_or_warn
from fastreg.preemption import Preempted, StopAgreement
from fastreg.preflight import check_before_work
from fastreg.run_log import RunLogger, logged_evaluation, open_run_dir
from fastreg.step_graph import StepGraph, lr_tensors

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        check_before_work(cfg)  # paths, memory, output folders: before the processes, teacher, data or index
        self.cfg = cfg
        t = cfg.trainer
        set_deterministic(t.deterministic)
        self.rank, self.world, device = setup_distributed(t.device)
        self.place, self.device = Placement.of(t.precision, t.channels_last, device), device
        self.is_main, self.out_dir = self.rank == 0, Path(t.out_dir)
        if device.type == "cpu" and t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        config, self.commit = dataclasses.asdict(cfg), ckpt.git_commit()
        # before the teacher loads: a refused resume comes first, and leaves the folder as it was
        resumed = open_run_dir(self.out_dir, self.is_main, lambda: checkpointer.find(t.resume, self.out_dir, config))
        seed_everything(t.seed, -1, 0)  # the same initial weights on every rank
        self.distiller = build_distiller(cfg, self.place)
        self.resumed_from = resumed.path if resumed else None
        data_state = checkpointer.rank_state(resumed, "data", self.rank, self.world)
        shard = dict(rank=self.rank, world_size=self.world, seed=t.seed)
        self.loader = build_loader(cfg.data, **shard, **self.place.loader_options(), checkpoint=data_state)
        self.distiller.bind_dataset(self.loader.index)
        self.global_batch = cfg.data.batch_size * self.world
        self.schedule = LrSchedule(cfg.optim, t.epochs, len(self.loader), self.global_batch)
        params = self.distiller.trainable_parameters()
        self.optimizer, self.optimizer_impl = build_optimizer(cfg.optim, params, self.schedule.peak, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.place.scaler)
        self.progress = Progress()
        optimizer = Entry("optimizer", lambda: optimizer_state(self.optimizer), self.optimizer.load_state_dict)
        scaler = Entry("scaler", self.scaler.state_dict, self.scaler.load_state_dict)
        parts = [self.distiller, optimizer, scaler, self.progress]
        per_rank = {"data": self.loader.state_dict, "rng": ckpt.rng_state}
        meta = {"config": config, "commit": self.commit}
        self.checkpointer = Checkpointer(self.out_dir, parts, per_rank, meta, self.rank, self.world, t.keep_checkpoints)
        if resumed:
            self.checkpointer.restore(resumed)
            checkpointer.check_data_position(resumed, self.progress, self.loader)
        # after the resume: a checkpoint's param groups bring their own `fused`
        self.guard = build_guard(self.distiller.trained_buffers(), self.optimizer, self.scaler)
        self.divergence = Divergence(
            self.distiller.loss_names, t.max_bad_steps, self.world, device, len(self.loader), self.out_dir
        )
        self.stop = StopAgreement(self.world, device, t.stop_check_every)
        self.distiller.wrap(lambda model: ddp(model, self.world, device))
        if t.compile:
            self.distiller.compile(t.compile_mode)
        self.run_update = self.update
        if t.cuda_graph:
            lr_tensors(self.optimizer, device)
            self.run_update = StepGraph(self.update, device)
        self.log = RunLogger(self.out_dir, self.is_main, self.step, device, t.monitor, t.progress)
        self.compile_reported = False

    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    def save(self, inside_epoch: bool = False) -> Path:
        """The checkpoint's path, on every rank; rank 0 writes it."""
        self.divergence.check()  # never write a checkpoint of a diverged model
        p = self.progress
        return self.checkpointer.save(ckpt.checkpoint_path(self.out_dir, p.epoch, p.step if inside_epoch else None))

    # ---- the loop ----

    def fit(self) -> dict[str, float]:
        """The last k-NN results. After SIGTERM or SIGUSR1 (installed here only) every rank stops at the same step
        boundary and saves, and fit raises Preempted once the logs are closed."""
        self.log_startup()
        results: dict[str, float] = {}
        saved = None
        with self.stop.signals, self.log, failures_shared(self.rank, self.world):
            if self.progress.epoch >= self.cfg.trainer.epochs:
                results = self.finish_finished_run()
            for epoch in range(self.progress.epoch, self.cfg.trainer.epochs):
                self.train_epoch(epoch)
                if self.stop.signal:  # agreed inside the epoch
                    saved = self.save(inside_epoch=True)
                    break
                self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
                saved = self.save()
                if self.eval_due():
                    results = self.evaluate()
                if self.progress.epoch < self.cfg.trainer.epochs and self.stop.agreed():  # the save holds it all
                    break
            if self.stop.signal and self.world > 1:
                dist.barrier()  # no rank exits before rank 0 has written the checkpoint: a launcher may end
                # the whole group at the first exit
        if self.stop.signal:
            message = self.stop.message(self.step, self.step / len(self.loader), saved, self.out_dir)
            if self.is_main:
                log.warning(message)
            raise Preempted(message)
        if self.is_main:  # after the final evaluation, so that its k-NN points are in the picture
            write_curves_or_warn(self.out_dir)
        return results

    def finish_finished_run(self) -> dict[str, float]:
        """A run resumed at its end does what it did not do: its final k-NN evaluation, when data.val_root is set
        and metrics.jsonl holds none at the last step (the evaluation failed, or data.val_root was given only
        now: a free key); else nothing, said in one line. The final k-NN results (rank 0; {} on the others)."""
        metrics = self.out_dir / "metrics.jsonl"
        logged = logged_evaluation(metrics, self.step) if self.is_main else {}
        missing = gather({"missing": not logged}, self.world)[0]["missing"]  # rank 0 read the file: all agree
        done = (
            f"the run in {self.out_dir} had finished: {self.progress.epoch} of {self.cfg.trainer.epochs} epochs, "
            f"step {self.step}, saved in {self.resumed_from}"
        )
        if self.cfg.data.val_root is not None and missing:
            if self.is_main:
                log.warning("%s, without its final k-NN evaluation in %s: evaluating it now", done, metrics)
            return self.evaluate()
        if self.is_main:
            found = f"its k-NN results are in {metrics}" if logged else "no k-NN evaluation: data.val_root is not set"
            log.info(
                "%s; %s. Nothing left to do: to train longer raise trainer.epochs (with trainer.resume_force=true), "
                "to start over pass trainer.resume=none, to run another beside it pass name=<another> (runs/<another>)",
                done,
                found,
            )
        return logged

    def train_epoch(self, epoch: int) -> None:
        p = self.progress
        if p.batch_in_epoch == 0:  # resumed inside the epoch, the RNG state came from the checkpoint
            seed_everything(self.cfg.trainer.seed, epoch, self.rank)
        self.distiller.train()
        task = self.log.epoch_task(epoch, self.cfg.trainer.epochs, len(self.loader), p.batch_in_epoch)
        tic, tic_step = time.perf_counter(), self.step
        self.log.window()  # drop the samples of the save and k-NN before: the window spans img/s's steps
        for batch in data_phase(self.loader.epoch(epoch)):
            loss, metrics, lr = self.train_step(batch)
            p.batch_in_epoch += 1
            self.report_compile()
            at_end = p.batch_in_epoch == len(self.loader)  # fit asks and saves after the epoch
            # and at each epoch's end: an epoch shorter than log_every steps still logs its loss
            if self.step % self.cfg.trainer.log_every == 0 or at_end:
                ips = self.global_batch * (self.step - tic_step) / (time.perf_counter() - tic)
                self.log_step(loss, metrics, lr, ips, task)
                tic, tic_step = time.perf_counter(), self.step
            self.log.advance(task)
            if not at_end and self.stop.due(self.step):
                return  # fit saves
            every = self.cfg.trainer.checkpoint_every
            if not at_end and every > 0 and self.step % every == 0:
                self.save(inside_epoch=True)

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """One optimizer step on one batch: (loss, metrics, lr), the tensors still on the device.

        A step whose loss is NaN or inf on any rank is skipped on the device. It still counts as a step: the lr
        schedule, the data position and the step numbers of checkpoints stay those of an unbroken run, on
        every rank."""
        lr = self.schedule.apply(self.optimizer, self.step)
        loss, metrics, ok = self.run_update(batch)  # self.update, or its CUDA graph (trainer.cuda_graph)
        self.divergence.record(ok, self.step + 1, {"loss": loss, **metrics})
        self.step += 1
        return loss, metrics, lr

    def update(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Forward, backward and optimizer step: (loss, metrics, ok), ok the 0-dim bool "the loss was finite on
        every rank"; the guard leaves weights, optimizer state and buffers as they were where it is False."""
        with phase("guard"):
            self.guard.save()  # before the forward: BatchNorm's running statistics move in it
        loss, metrics = self.distiller(batch)
        ok = self.divergence.loss_is_finite(loss)
        with phase("student_backward"):
            self.scaler.scale(loss).backward()
        with phase("optimizer"):
            self.guard.skip_unless(ok)  # hands `not ok` to a fused optimizer's kernel
            # fp16: the scaler skips a step whose gradients overflow (its own sync unless the optimizer is
            # fused); with a finite loss that is the scaler's business, not a bad step
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)  # here, not before backward: no gradients held in forward
        with phase("guard"):
            self.guard.undo_unless(ok)
        return loss, metrics, ok

    def report_compile(self) -> None:
        """After the first compiled step, which compiled every graph: their number and the graph breaks."""
        if self.cfg.trainer.compile and not self.compile_reported:
            log.info(compile_report())
            self.compile_reported = True

    def log_step(self, loss, metrics, lr: float, ips: float, task) -> None:
        skipped = self.divergence.skipped_since_log(self.step, warn=self.is_main)
        values = {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}, "lr": lr, "img_per_s": ips}
        values.update(epoch=self.step / len(self.loader), skipped_steps=skipped)
        self.log.step(self.step, values, task)

    # ---- evaluation ----

    def eval_due(self) -> bool:
        every, epoch = self.cfg.trainer.eval_every, self.progress.epoch
        last = epoch == self.cfg.trainer.epochs
        return self.cfg.data.val_root is not None and (last or (every > 0 and epoch % every == 0))

    def evaluate(self) -> dict[str, float]:
        """knn_eval's figures (knn<k>_majority, knn<k>_weighted, nn1) of the student's pooled feature (rank 0; the
        others wait at the barrier). A stop signal ends the final evaluation at once (preemption.stop_now)."""
        results: dict[str, float] = {}
        with self.stop_at_once_if_final():
            if self.is_main:
                from fastreg.eval import knn_eval_run

                student = self.distiller.student
                student.eval()
                results = knn_eval_run(student, self.cfg, self.device)
                student.train()
                self.log.evaluation(self.step, self.progress.epoch, results)
            if dist.is_initialized():
                dist.barrier()
        return results

    def stop_at_once_if_final(self):
        """After the last epoch's save, the evaluation is all that is left: a stop signal ends it at once."""
        p, epochs = self.progress, self.cfg.trainer.epochs
        if (p.epoch, p.batch_in_epoch) != (epochs, 0):
            return contextlib.nullcontext()
        saved = ckpt.checkpoint_path(self.out_dir, epochs)
        return self.stop.signals.at_once(
            "the final evaluation",
            f"training is complete and saved in {saved}, the evaluation is not: the same command resumes there and "
            "runs it",
        )

    def log_startup(self) -> None:
        o, d = self.cfg.optim, self.cfg.data
        teachers = ", ".join(f"{t.name} ({t.checkpoint or t.cache}, head {t.head.kind})" for t in self.cfg.teachers)
        lines = [
            f"teacher {teachers} -> student {self.cfg.student.arch}, loss {self.cfg.loss.name}; "
            f"{self.cfg.trainer.epochs} epochs of {d.root or 'synthetic batches'} at crop {d.crop_size}",
            f"device {self.device}, precision {self.cfg.trainer.precision}, world size {self.world}, loader "
            f"{self.loader.name} ({len(self.loader)} batches/epoch), optimizer {self.optimizer_impl}, peak lr "
            f"{self.schedule.peak:.4g} (global batch {self.global_batch}), lr schedule per {o.schedule}",
            f"a step whose loss is NaN or inf is {self.guard.name}",
        ]
        self.log.startup(self.checkpointer.meta["config"], self.commit, lines)
        warning = lr_scaling_warning(o.recipe_batch, self.global_batch, self.world, o.base_lr, self.schedule.peak)
        if warning and self.is_main:
            log.warning(warning)
