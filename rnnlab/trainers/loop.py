"""The one training loop, for every job, on CPU, one GPU or many (``accelerate launch``).

``train(config, output_dir)`` builds the Job, the Accelerator, the model, optimizer and LR schedule, trains with
mixed precision / gradient accumulation / clipping, validates every epoch (or every ``eval_every`` steps), keeps
the last and the best checkpoint, stops early, scores the test split ONCE with the best weights and exports a
bundle. Output layout (under ``output_dir``)::

    checkpoints/               step-N folders, latest.json, best.json (checkpoints.py)
    metrics.jsonl              one JSON object per line: config, train, val, test, summary events (tracking.py)
    wandb/                     the W&B run (offline unless WANDB_API_KEY is set; WANDB_DIR overrides)
    bundle/                    rnnlab.bundle.save_bundle output (+ job figures beside it)

Reproducibility: ``set_seed`` before the model is built; batches come from ``(seed, epoch, index)`` and never from
the global RNG; checkpoints hold the RNG states, so a resumed run ends with the same weights as a straight one (on a
GPU with ``train.deterministic=true``, since some CUDA kernels differ run to run).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rnnlab.config import JobConfig, TrainSettings, validate
from rnnlab.errors import ConfigError, RnnlabError, TrainingError
from rnnlab.trainers import durable
from rnnlab.trainers.checkpoints import Checkpoints, register_hooks
from rnnlab.trainers.elastic import join_restarted_group
from rnnlab.trainers.job import Job, make_job
from rnnlab.trainers.optim import make_optimizer, make_scheduler
from rnnlab.trainers.precision import resolve_precision, use_deterministic_kernels
from rnnlab.trainers.tracking import Tracking, TrainWindow

log = logging.getLogger(__name__)

OnEval = Callable[[dict, Path], None]


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint (loop_state.json) and restored on resume."""

    epoch: int = 0
    micro: int = 0  # micro-batches done in this epoch
    step: int = 0  # optimizer steps done in the run
    best_value: float | None = None
    best_step: int | None = None
    best_val: dict | None = None
    evals_since_best: int = 0
    stopped_early: bool = False

    def next_epoch(self) -> None:
        self.epoch, self.micro = self.epoch + 1, 0


@dataclass(frozen=True)
class Schedule:
    """How long the run is, in micro-batches and optimizer steps, and when it validates."""

    micro_per_epoch: int  # a multiple of grad_accum: every epoch ends on an optimizer step
    total_steps: int
    num_epochs: int
    eval_every: int

    @classmethod
    def plan(cls, batches_per_epoch: int, train: TrainSettings) -> Schedule:
        accum = train.grad_accum
        micro = (batches_per_epoch // accum) * accum
        if micro == 0:
            raise ConfigError(f"One epoch has {batches_per_epoch} batches, fewer than train.grad_accum={accum}; "
                              "lower grad_accum.")
        if micro < batches_per_epoch:
            log.info("grad_accum=%d: the last %d batch(es) of each epoch are left out so every epoch ends on an "
                     "optimizer step", accum, batches_per_epoch - micro)
        per_epoch = micro // accum
        total = train.epochs * per_epoch if train.epochs else train.max_steps
        if train.max_steps:
            total = min(total, train.max_steps)
        return cls(micro, total, math.ceil(total / per_epoch), train.eval_every)

    def runs(self, state: TrainState) -> bool:
        return not state.stopped_early and state.step < self.total_steps and state.epoch < self.num_epochs

    def validates(self, state: TrainState, end_of_epoch: bool) -> bool:
        every = self.eval_every and state.step % self.eval_every == 0
        return bool(every or (not self.eval_every and end_of_epoch) or state.step >= self.total_steps)

    def epoch_progress(self, state: TrainState) -> float:
        return state.epoch + state.micro / self.micro_per_epoch


def train(config: JobConfig | Mapping, output_dir: str | Path, *, resume: bool | str | Path = False,
          on_eval: OnEval | None = None) -> dict:
    """Train ``config`` (see ``rnnlab.config.load_config``) and export ``output_dir/bundle``.

    resume: ``True`` continues from ``output_dir/checkpoints/latest.json`` (a fresh start when there is none);
        a path continues from that checkpoint folder (Ray Tune hands one back through ``tune.get_checkpoint``).
    on_eval: ``on_eval(metrics, checkpoint_dir)`` is called on the main process after every validation, once the
        checkpoint of that step is on disk. ``metrics`` = ``{"step", "epoch", "val": {name: value},
        "monitor", "monitor_value", "best_value", "best_step", "is_best"}``. Raising from it stops training
        (the checkpoint stays, so ``resume`` continues from there).
    Returns ``{"val": best validation metrics, "test": test metrics, "best_step": int, "steps": int,
    "stopped_early": bool, "bundle": str}`` on every process.
    """
    from rnnlab.progress import progress_bar

    config = config if isinstance(config, JobConfig) else validate(config)
    output_dir = Path(output_dir)
    if resume is False or resume is None:  # a fresh run never mixes its files with another run's
        durable.refuse_used_output(output_dir)
    accelerator, precision = start_process(config, output_dir)
    checkpoints = Checkpoints(output_dir / "checkpoints", config.to_dict())
    if accelerator.is_main_process:
        removed = durable.remove_temporaries(checkpoints.root)
        if removed:
            log.info("removed %s, left half-written by an interrupted run", ", ".join(removed))
    job = make_job(config, rank=accelerator.process_index, world_size=accelerator.num_processes)
    job.device = accelerator.device
    with accelerator.main_process_first():  # the main process fills the token cache; the others read it
        job.load_data()
        job.add_training_data()
    model = job.build_model()
    schedule = Schedule.plan(job.steps_per_epoch(), config.train)
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, schedule.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    check_validation(job, on_eval, accelerator.is_main_process)

    resume_dir = checkpoints.resume_dir(resume)
    state = restore_state(accelerator, checkpoints, resume_dir, job)
    tracking = Tracking(accelerator, config, output_dir)
    tracking.write("config", config=config.to_dict(), precision=precision, device=str(accelerator.device),
                   world_size=accelerator.num_processes, total_steps=schedule.total_steps,
                   steps_per_epoch=schedule.micro_per_epoch // config.train.grad_accum,
                   resumed_from=str(resume_dir or ""), resumed_step=state.step)

    def validate_and_checkpoint() -> None:
        # every loss since the last log line, before anything trained on it is checkpointed
        check_finite("training loss", float(accelerator.reduce(window.loss.clone(), reduction="sum")), state,
                     checkpoints)
        validate_step(accelerator, model, job, state, schedule, checkpoints, tracking, on_eval)

    progress = progress_bar(total=schedule.total_steps, initial=state.step, desc=f"train {config.job}",
                            disable=not (accelerator.is_main_process and config.train.progress), dynamic_ncols=True)
    world, clip, log_every = accelerator.num_processes, config.train.grad_clip, max(1, config.train.log_every)
    window = TrainWindow(accelerator.device)
    model.train()
    try:
        while schedule.runs(state):
            epoch = state.epoch
            job.start_epoch(epoch, state.micro)
            for batch in job.batches(epoch, state.micro):
                with accelerator.accumulate(model):
                    loss_sum = job.loss_sum(model, batch)
                    # sum * world / global units: DDP's mean over processes = the global batch mean.
                    accelerator.backward(loss_sum * (world / batch.global_units))
                    if accelerator.sync_gradients and clip > 0:
                        window.grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.micro += 1
                window.add(loss_sum.detach(), batch)
                if not accelerator.sync_gradients:
                    continue
                if not optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped the step
                    scheduler.step()
                state.step += 1
                progress.update(1)
                if state.step % log_every == 0 or state.step == schedule.total_steps:
                    record = window.flush(accelerator, scheduler.get_last_lr()[0])
                    check_finite("training loss", record["loss"], state, checkpoints)
                    record["epoch"] = round(schedule.epoch_progress(state), 4)
                    tracking.log("train", record, step=state.step)
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                end_of_epoch = state.micro >= schedule.micro_per_epoch
                if end_of_epoch:
                    state.next_epoch()
                if schedule.validates(state, end_of_epoch):
                    validate_and_checkpoint()
                if end_of_epoch or not schedule.runs(state):
                    break
            else:  # the job ran out of batches before micro_per_epoch (it skipped an unsplittable one)
                state.next_epoch()
                if not schedule.eval_every:
                    validate_and_checkpoint()
        progress.close()
        return finish(accelerator, model, job, checkpoints, state, tracking, output_dir)
    finally:
        progress.close()
        accelerator.end_training()


def start_process(config: JobConfig, output_dir: Path):
    """This process's Accelerator and the precision it trains in; the output folder made, the seed set."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    precision = resolve_precision(config.train.mixed_precision)
    # Accelerate keeps its settings in process-wide singletons; a second train() in one process (tests, Ray
    # Tune's function trainables) may ask for another precision or accumulation. The process group stays.
    # Private on purpose: Accelerate (1.16) has no public reset; its own AccelerateTestCase.tearDown calls these two.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:  # after a torchrun restart, meet on a fresh store (rnnlab/trainers/elastic.py says why)
        join_restarted_group("nccl" if torch.cuda.is_available() else "gloo")
    cpu_group = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    accelerator = Accelerator(
        # Several processes and no GPU (``accelerate launch --multi_gpu`` or ``--cpu`` on a CPU machine): run
        # them as a MULTI_CPU group over gloo, instead of N independent single-process runs.
        cpu=not torch.cuda.is_available() and (launched > 1 or cpu_group),
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.train.grad_accum,
                                                                sync_with_dataloader=False),
        # We step the schedule once per optimizer step ourselves: accelerate's default steps it once per
        # process, which would make an N-process run decay N times faster than the 1-process run.
        step_scheduler_with_optimizer=False,
        log_with="wandb" if config.tracking.wandb else None,
    )
    register_hooks(accelerator)
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched but Accelerate set up {accelerator.num_processes}; "
            "check the accelerate config (e.g. configs/accelerate/cpu.yaml on a machine without GPUs)."
        )
    if accelerator.is_main_process:
        with durable.storage("the run folder", output_dir):
            (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(config.train.seed)
    use_deterministic_kernels(config.train.deterministic)
    return accelerator, precision


def restore_state(accelerator, checkpoints: Checkpoints, resume_dir: Path | None, job: Job) -> TrainState:
    """A fresh state, or the one saved with the checkpoint the run resumes from (weights, optimizer and RNG
    states restored with it)."""
    if resume_dir is None:
        return TrainState()
    state = TrainState(**checkpoints.restore(accelerator, resume_dir, job))
    if accelerator.is_main_process:
        log.info("resumed from %s (step %d, epoch %d, batch %d)", resume_dir, state.step, state.epoch, state.micro)
    return state


def check_validation(job: Job, on_eval: OnEval | None, is_main: bool) -> None:
    """A run without a validation split (stock's data.val_days=0, the chapter's protocol) trains its full length
    and selects nothing; Tune, which ranks trials on validation, cannot use it."""
    if job.has_validation():
        return
    if on_eval is not None:
        raise ConfigError("Tuning ranks trials on validation metrics and this config has no validation split; "
                          "give data.val_days a positive number.")
    if is_main:
        log.info("No validation split: the run trains its full length, selects no checkpoint (train.monitor "
                 "is unused) and exports the final weights; checkpoints are still written for resuming.")


def validate_step(accelerator, model, job: Job, state: TrainState, schedule: Schedule, checkpoints: Checkpoints,
                  tracking: Tracking, on_eval: OnEval | None) -> None:
    """Validate, keep the best, decide early stopping, checkpoint, then call ``on_eval``."""
    if not job.has_validation():  # nothing to validate on: a checkpoint for resuming, never a "best"
        checkpoints.save(accelerator, state.step, asdict(state), job, False, None)
        return
    model.eval()
    metrics = job.evaluate(accelerator.unwrap_model(model), "val", accelerator).metrics
    model.train()
    check_finite("validation loss", metrics.get("loss", 0.0), state, checkpoints)
    monitor, mode = job.monitor()
    value = metrics[monitor]
    # a NaN (e.g. ROC-AUC of a one-class split) is never the best, so it can never pin the best checkpoint
    is_best = math.isfinite(value) and (
        state.best_value is None or (value < state.best_value if mode == "min" else value > state.best_value))
    if is_best:
        state.best_value, state.best_step, state.best_val, state.evals_since_best = value, state.step, metrics, 0
    else:
        state.evals_since_best += 1
    patience = job.config.train.early_stopping_patience
    state.stopped_early = bool(patience) and state.evals_since_best >= patience
    epoch = schedule.epoch_progress(state)
    tracking.log("val", metrics, step=state.step, epoch=round(epoch, 4))
    if accelerator.is_main_process:
        log.info("step %d val %s", state.step, _brief(metrics))
    checkpoint = checkpoints.save(accelerator, state.step, asdict(state), job, is_best, state.best_value)
    if on_eval is not None and accelerator.is_main_process:
        on_eval({"step": state.step, "epoch": epoch, "val": dict(metrics), "monitor": monitor,
                 "monitor_value": value, "best_value": state.best_value, "best_step": state.best_step,
                 "is_best": is_best}, checkpoint)


def check_finite(what: str, value: float, state: TrainState, checkpoints: Checkpoints) -> None:
    """Stop a diverged run before it writes a checkpoint, naming the last good one."""
    if math.isfinite(value):
        return
    latest = checkpoints.latest()
    kept = f"{latest.name} is the last good checkpoint" if latest is not None else "no checkpoint was written"
    raise TrainingError(f"The {what} is not finite ({value}) at step {state.step}, so training stopped and {kept}; "
                        "lower train.lr or set train.grad_clip and start a new --output.")


def finish(accelerator, model, job: Job, checkpoints: Checkpoints, state: TrainState, tracking: Tracking,
           output_dir: Path) -> dict:
    """Best weights back in, what the job picks on validation, the test split scored once, the job's report, the
    bundle exported."""
    from rnnlab.bundle import save_bundle
    from rnnlab.export import write_graph

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    checkpoints.load_best_weights(unwrapped)
    unwrapped.eval()
    val = state.best_val or {}
    fitted = job.fit_on_validation(unwrapped, accelerator)
    if fitted:  # the model answers differently now: its validation figures again, beside what they were
        refit = {**job.evaluate(unwrapped, "val", accelerator).metrics, **fitted}
        tracking.log("val_fitted", refit, step=state.step)
        val = {**refit, "before_fit": val}
    test = job.evaluate(unwrapped, "test", accelerator)
    tracking.log("test", test.metrics, step=state.step, best_step=state.best_step)
    result = {"val": val, "test": dict(test.metrics), "best_step": state.best_step, "steps": state.step,
              "stopped_early": state.stopped_early, "bundle": str(output_dir / "bundle")}
    if accelerator.is_main_process:
        def export(extra: dict) -> None:
            with durable.storage("the bundle", output_dir):
                # the bundle's own folder stays out of it: a bundle is copied between machines, and a service
                # shows its metrics (the path told strangers this machine's layout)
                kept = {key: value for key, value in result.items() if key != "bundle"}
                save = functools.partial(save_bundle, output_dir / "bundle", job=job.config.job, model=unwrapped,
                                         assets=job.assets(), metrics={**kept, **({"extra": extra} if extra else {})},
                                         config=job.config.to_dict(), example=example)
                if job.spec.graph is None:
                    save()
                    return
                try:  # with its ONNX graph (rnnlab/export.py), which CPUs serve faster
                    save(graph=write_graph)
                except RnnlabError as error:  # a graph that does not answer as the weights do: torch serves it
                    log.warning("The bundle holds no ONNX graph: %s", error)
                    save()

        example = job.example()
        export({})  # the model first: plots, tables and W&B come after and can never cost it
        try:
            extra = job.report(unwrapped, val, test, output_dir, tracking.tracker)
        except Exception as error:  # a plotting backend, W&B's service: a report is never worth the run
            log.warning("The end-of-run report failed (%s: %s); the bundle is saved.", type(error).__name__, error)
            extra = {}
        if extra:
            result["test"].update({k: v for k, v in extra.items() if isinstance(v, (int, float))})
            export(extra)
        tracking.write("summary", **result)
        log.info("best step %s; test %s; bundle %s", state.best_step, _brief(test.metrics), output_dir / "bundle")
    accelerator.wait_for_everyone()
    return result


def _brief(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("baseline"))
