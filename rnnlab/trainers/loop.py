"""The one training loop, for every job, on CPU, one GPU or many (``accelerate launch``).

``train(config, output_dir)`` builds the Job, the Accelerator, the model, optimizer and LR schedule, trains with
mixed precision / gradient accumulation / clipping, validates every epoch (or every ``eval_every`` steps), keeps
the last and the best checkpoint, stops early, scores the test split ONCE with the best weights and exports a
bundle. Output layout (under ``output_dir``)::

    checkpoints/step-000120/   accelerator.save_state + loop_state.json + job_state_<rank>.safetensors
    checkpoints/latest.json    {"checkpoint": "step-000120"}   (written atomically, read by resume)
    checkpoints/best.json      {"checkpoint": ..., "step": ..., "value": ...}
    metrics.jsonl              one JSON object per line: config, train, val, test, summary events
    wandb/                     the W&B run (offline unless WANDB_API_KEY is set; WANDB_DIR overrides)
    bundle/                    rnnlab.bundle.save_bundle output (+ job figures beside it)

Reproducibility: ``set_seed`` before the model is built; batches come from ``(seed, epoch, index)`` and never from
the global RNG; checkpoints hold the RNG states, so a resumed run ends with the same weights as a straight one (on a
GPU with ``train.deterministic=true``, since some CUDA kernels differ run to run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rnnlab.errors import ConfigError
from rnnlab.trainers.jobs import EvalResult, Job, make_job, stock_table

log = logging.getLogger(__name__)

OnEval = Callable[[dict, Path], None]


# ---------------------------------------------------------------------------------------------------------------
# precision


def resolve_precision(requested: str) -> str:
    """The precision to train in: a clear error for fp16 without a GPU; a warning and "no" where an LSTM can't."""
    if requested == "no":
        return "no"
    if requested == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU and none is visible; use bf16 (CPU autocast) or no."
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("This GPU has no bf16 support; training in fp32 (train.mixed_precision=no) instead.")
        return "no"
    # Probe an LSTM forward/backward under autocast now, so an unsupported combination (e.g. an old cuDNN
    # without bf16 RNNs) falls back before training instead of crashing mid-run.
    dtype = torch.float16 if requested == "fp16" else torch.bfloat16
    try:
        lstm = torch.nn.LSTM(8, 8, num_layers=2, batch_first=True).to(device)
        x = torch.randn(2, 3, 8, device=device)
        with torch.autocast(device_type=device, dtype=dtype):
            out, _ = lstm(x)
        out.float().sum().backward()
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("LSTM in %s on %s is not supported here (%s); training in fp32 instead.",
                    requested, device, first_line)
        return "no"
    if out.dtype != dtype:
        # Seen on an H200 (torch 2.11, cuDNN 9.19): under bf16 autocast cuDNN's LSTM computes in float16, without
        # the loss scaling float16 gradients need (Accelerate scales only for fp16), and no faster than TF32.
        log.warning("Under %s autocast the LSTM computes in %s on %s here, without loss scaling; training in fp32 "
                    "instead (ask for fp16 to get half-precision LSTMs with loss scaling).",
                    requested, str(out.dtype).replace("torch.", ""), device)
        return "no"
    return requested


def use_deterministic_kernels(enabled: bool) -> None:
    """``train.deterministic``: kernels that give the same bits on every run, at some cost in speed.

    On a CPU rnnlab's runs repeat exactly anyway. On a GPU, the embedding's backward pass (atomic adds) and some
    cuDNN and cuBLAS kernels vary from run to run: on an H200 a resumed charlm run ended about 1e-4 away from the
    uninterrupted one, so the bit-identical resume needs this. Set both ways, since it is process-wide (Tune
    trials and tests run several trainings in one process).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled


# ---------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def make_optimizer(model: torch.nn.Module, train_cfg: dict) -> torch.optim.Optimizer:
    lr, wd = float(train_cfg["lr"]), float(train_cfg["weight_decay"])
    name = train_cfg["optimizer"]
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)


def make_scheduler(optimizer, train_cfg: dict, total_steps: int):
    name = train_cfg["scheduler"]
    warmup = int(train_cfg["warmup_steps"])
    floor = float(train_cfg["min_lr_ratio"])
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=float(train_cfg["lr"]),
                                                   total_steps=max(total_steps, 2))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if name == "none":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
        return floor + (1 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


class Checkpoints:
    """``checkpoints/step-N`` folders written atomically (temp folder + rename); ``latest.json`` and ``best.json``
    point at them (replaced atomically); every other folder is pruned, so at most two are kept."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _pointer(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def latest(self) -> Path | None:
        pointer = self._pointer("latest")
        return self.root / pointer["checkpoint"] if pointer else None

    def best(self) -> dict | None:
        return self._pointer("best")

    def write_pointer(self, name: str, payload: dict) -> None:
        tmp = self.root / f".{name}.json.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.root / f"{name}.json")

    def save(self, accelerator, step: int, loop_state: dict, job: Job, is_best: bool, best_value) -> Path:
        from safetensors.torch import save_file

        name = f"step-{step:07d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        # Per-process job state (a charlm carry is this process's rows); safetensors, never pickle.
        save_file(job.state_dict(), str(tmp / f"job_state_{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "loop_state.json").write_text(json.dumps(loop_state, indent=1))
            if final.exists():  # a rerun of the same step after an interruption
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.write_pointer("latest", {"checkpoint": name, "step": step})
            if is_best:
                self.write_pointer("best", {"checkpoint": name, "step": step, "value": best_value})
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def prune(self) -> None:
        keep = {p["checkpoint"] for p in (self._pointer("latest"), self._pointer("best")) if p}
        for path in self.root.glob("step-*"):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def _unshare_weights(models, weights: list[dict], output_dir) -> None:
    """``save_state`` pre-hook: save copies of the weights that share no memory.

    On a GPU, cuDNN keeps an LSTM's weights as views of one flat buffer. Accelerate's safetensors writer keeps one
    name per storage and drops the others ("Removed shared tensor"), so a checkpoint lost its LSTM weights and the
    best one could not be loaded back (seen on an H200; tests/test_trainer.py reproduces it on the CPU).
    """
    for index, state_dict in enumerate(weights):
        weights[index] = {name: tensor.clone() for name, tensor in state_dict.items()}


def _load_weights_by_name(models: list, input_dir: str) -> None:
    """``load_state`` pre-hook: copy each checkpointed weight into the model by name, then leave the optimizers,
    schedules and RNG states to Accelerate. safetensors' ``load_model`` refuses a model whose weights share one
    buffer (cuDNN's LSTM on a GPU: "None is covering the entire storage"), so ``--resume`` failed there."""
    from safetensors.torch import load_file

    for index, model in enumerate(models):
        weights = load_file(str(Path(input_dir) / f"model{f'_{index}' if index else ''}.safetensors"))
        model.load_state_dict(weights)  # strict: a missing or unexpected weight is an error
    models.clear()  # loaded: Accelerate skips the models it would otherwise load


def load_job_state(directory: Path, rank: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / f"job_state_{rank}.safetensors"
    return load_file(str(path)) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------------
# tracking


class MetricsLog:
    """``metrics.jsonl`` on the main process: one JSON object per event, appended (a resumed run continues it)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _wandb_settings(config: dict, output_dir: Path) -> dict:
    """init_kwargs for accelerate's W&B tracker; offline unless an API key is set."""
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    tracking = config["tracking"]
    run_id_file = output_dir / "wandb_run_id.txt"
    if run_id_file.is_file():  # a resumed run continues the same W&B run
        run_id = run_id_file.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)  # W&B's own ids are 8 random characters too
        run_id_file.write_text(run_id)
    return {
        "name": tracking["run_name"],
        "group": tracking["group"],
        "dir": os.environ.get("WANDB_DIR") or str(output_dir),
        "id": run_id,
        "resume": "allow",
        "job_type": config["job"],
    }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------------------------
# the loop


def train(
    config: dict,
    output_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    on_eval: OnEval | None = None,
) -> dict:
    """Train ``config`` (see ``rnnlab.trainers.config.load_config``) and export ``output_dir/bundle``.

    resume: ``True`` continues from ``output_dir/checkpoints/latest.json`` (a fresh start when there is none);
        a path continues from that checkpoint folder (Ray Tune hands one back through ``tune.get_checkpoint``).
    on_eval: ``on_eval(metrics, checkpoint_dir)`` is called on the main process after every validation, once the
        checkpoint of that step is on disk. ``metrics`` = ``{"step", "epoch", "val": {name: value},
        "monitor", "monitor_value", "best_value", "best_step", "is_best"}``. Raising from it stops training
        (the checkpoint stays, so ``resume`` continues from there).
    Returns ``{"val": best validation metrics, "test": test metrics, "best_step": int, "steps": int,
    "stopped_early": bool, "bundle": str}`` on every process.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    output_dir = Path(output_dir)
    train_cfg, tracking = config["train"], config["tracking"]
    precision = resolve_precision(train_cfg["mixed_precision"])
    # Accelerate keeps its settings in process-wide singletons; a second train() in one process (tests, Ray
    # Tune's function trainables) may ask for another precision or accumulation. The process group stays.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accum = int(train_cfg["grad_accum"])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Several processes and no GPU (``accelerate launch --multi_gpu`` or ``--cpu`` on a CPU machine): run
        # them as a MULTI_CPU group over gloo, instead of N independent single-process runs.
        cpu=not torch.cuda.is_available() and (launched > 1 or _env_flag("ACCELERATE_USE_CPU")),
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False),
        # We step the schedule once per optimizer step ourselves: accelerate's default steps it once per
        # process, which would make an N-process run decay N times faster than the 1-process run.
        step_scheduler_with_optimizer=False,
        log_with="wandb" if tracking["wandb"] else None,
    )
    accelerator.register_save_state_pre_hook(_unshare_weights)
    accelerator.register_load_state_pre_hook(_load_weights_by_name)
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched but Accelerate set up {accelerator.num_processes}; "
            "check the accelerate config (e.g. configs/accelerate/cpu.yaml on a machine without GPUs)."
        )
    is_main = accelerator.is_main_process
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(int(train_cfg["seed"]))
    use_deterministic_kernels(bool(train_cfg["deterministic"]))

    job = make_job(config, rank=accelerator.process_index, world_size=accelerator.num_processes)
    job.device = accelerator.device
    with accelerator.main_process_first():  # the main process fills the token cache; the others read it
        job.load_data()
    model = job.build_model()
    steps_per_epoch = job.steps_per_epoch()
    micro_per_epoch = (steps_per_epoch // accum) * accum  # every epoch ends on an optimizer step
    if micro_per_epoch == 0:
        raise ConfigError(
            f"One epoch has {steps_per_epoch} batches, fewer than train.grad_accum={accum}; lower grad_accum."
        )
    if micro_per_epoch < steps_per_epoch and is_main:
        log.info("grad_accum=%d: the last %d batch(es) of each epoch are left out so every epoch ends on an "
                 "optimizer step", accum, steps_per_epoch - micro_per_epoch)
    opt_per_epoch = micro_per_epoch // accum
    max_steps = int(train_cfg["max_steps"])
    epochs = int(train_cfg["epochs"])
    total_steps = epochs * opt_per_epoch if epochs else max_steps
    if max_steps:
        total_steps = min(total_steps, max_steps)
    num_epochs = math.ceil(total_steps / opt_per_epoch)

    optimizer = make_optimizer(model, train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    checkpoints = Checkpoints(output_dir / "checkpoints")
    if is_main:
        checkpoints.root.mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", is_main)
    monitor, mode = job.monitor()
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    validating = job.has_validation()
    if not validating:  # e.g. stock's data.val_days=0: the chapter's protocol
        if int(train_cfg["early_stopping_patience"]):
            raise ConfigError("train.early_stopping_patience needs a validation split and this config has none; "
                              "set train.early_stopping_patience=0.")
        if on_eval is not None:
            raise ConfigError("Tuning ranks trials on validation metrics and this config has no validation split; "
                              "give data.val_days a positive number.")
        if is_main:
            log.info("No validation split: the run trains its full length, selects no checkpoint (train.monitor "
                     "is unused) and exports the final weights; checkpoints are still written for resuming.")
    state: dict[str, Any] = {"epoch": 0, "micro": 0, "step": 0, "best_value": None, "best_step": None,
                             "best_val": None, "evals_since_best": 0, "stopped_early": False}

    resume_dir = _resume_dir(resume, checkpoints)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        state.update(json.loads((resume_dir / "loop_state.json").read_text()))
        job.load_state_dict(load_job_state(resume_dir, accelerator.process_index))
        if is_main:
            log.info("resumed from %s (step %d, epoch %d, batch %d)", resume_dir, state["step"], state["epoch"],
                     state["micro"])

    tracker = None
    if tracking["wandb"]:
        accelerator.init_trackers(tracking["project"], config=config,
                                  init_kwargs={"wandb": _wandb_settings(config, output_dir) if is_main else {}})
        if is_main:
            tracker = accelerator.get_tracker("wandb", unwrap=True)
    metrics_log.write("config", config=config, precision=precision, device=str(accelerator.device),
                      world_size=accelerator.num_processes, total_steps=total_steps, steps_per_epoch=opt_per_epoch,
                      resumed_from=str(resume_dir or ""))

    def validate_and_checkpoint() -> bool:
        """Validate, checkpoint, call on_eval; True when early stopping says stop."""
        if not validating:  # nothing to validate on: a checkpoint for resuming, never a "best"
            checkpoints.save(accelerator, state["step"], state, job, False, None)
            return False
        model.eval()
        result = job.evaluate(accelerator.unwrap_model(model), "val", accelerator)
        model.train()
        value = result.metrics[monitor]
        is_best = state["best_value"] is None or better(value, state["best_value"])
        if is_best:
            state.update(best_value=value, best_step=state["step"], best_val=result.metrics, evals_since_best=0)
        else:
            state["evals_since_best"] += 1
        patience = int(train_cfg["early_stopping_patience"])
        stop = bool(patience) and state["evals_since_best"] >= patience
        state["stopped_early"] = stop
        epoch_float = state["epoch"] + state["micro"] / micro_per_epoch
        accelerator.log({f"val/{k}": v for k, v in result.metrics.items()}, step=state["step"])
        metrics_log.write("val", step=state["step"], epoch=round(epoch_float, 4), **result.metrics)
        if is_main:
            log.info("step %d val %s", state["step"],
                     " ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if not k.startswith("baseline")))
        ckpt = checkpoints.save(accelerator, state["step"], state, job, is_best, state["best_value"])
        if on_eval is not None and is_main:
            on_eval({"step": state["step"], "epoch": epoch_float, "val": dict(result.metrics), "monitor": monitor,
                     "monitor_value": value, "best_value": state["best_value"], "best_step": state["best_step"],
                     "is_best": is_best}, ckpt)
        return stop

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=state["step"], desc=f"train {config['job']}",
                    disable=not (is_main and train_cfg["progress"]), dynamic_ncols=True)
    eval_every, log_every = int(train_cfg["eval_every"]), max(1, int(train_cfg["log_every"]))
    grad_clip = float(train_cfg["grad_clip"])
    world = accelerator.num_processes
    window = _Window(accelerator.device)
    model.train()
    try:
        stop = state["stopped_early"] or state["step"] >= total_steps
        while not stop and state["epoch"] < num_epochs:
            epoch, start = state["epoch"], state["micro"]
            job.start_epoch(epoch, start)
            for batch in job.batches(epoch, start):
                if state["micro"] >= micro_per_epoch:
                    break
                with accelerator.accumulate(model):
                    loss_sum = job.loss_sum(model, batch)
                    # sum * world / global units: DDP's mean over processes = the global batch mean.
                    accelerator.backward(loss_sum * (world / batch.global_units))
                    if accelerator.sync_gradients and grad_clip > 0:
                        window.grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state["micro"] += 1
                window.add(loss_sum.detach(), batch)
                if not accelerator.sync_gradients:
                    continue
                if not optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped the step
                    scheduler.step()
                state["step"] += 1
                progress.update(1)
                if state["step"] % log_every == 0 or state["step"] == total_steps:
                    record = window.flush(accelerator, scheduler.get_last_lr()[0])
                    record["epoch"] = round(epoch + state["micro"] / micro_per_epoch, 4)
                    accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state["step"])
                    metrics_log.write("train", step=state["step"], **record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                end_of_epoch = state["micro"] >= micro_per_epoch
                last = state["step"] >= total_steps
                if end_of_epoch:
                    state["epoch"], state["micro"] = epoch + 1, 0
                if (eval_every and state["step"] % eval_every == 0) or (not eval_every and end_of_epoch) or last:
                    stop = validate_and_checkpoint()
                if stop or last or end_of_epoch:
                    stop = stop or last
                    break
            else:  # the job ran out of batches before micro_per_epoch (it skipped an unsplittable one)
                state["epoch"], state["micro"] = epoch + 1, 0
                if not eval_every:
                    stop = validate_and_checkpoint()
        progress.close()
        return _finish(accelerator, model, job, config, checkpoints, state, metrics_log, tracker, output_dir)
    finally:
        progress.close()
        accelerator.end_training()


class _Window:
    """Train-loss and throughput accumulators between two log lines (reduced across processes at log time)."""

    def __init__(self, device) -> None:
        self.device = device
        self.grad_norm = None
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.units = 0
        self.samples = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, batch) -> None:
        self.loss += loss_sum.double()
        self.units += batch.global_units
        self.samples += batch.samples
        self.tokens += batch.tokens

    def flush(self, accelerator, lr: float) -> dict:
        totals = accelerator.reduce(torch.stack([self.loss, self.samples, self.tokens]), reduction="sum")
        seconds = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "loss": float(totals[0]) / max(1, self.units),
            "lr": float(lr),
            "samples_per_s": float(totals[1]) / seconds,
            "tokens_per_s": float(totals[2]) / seconds,
            "peak_memory_mb": round(_peak_memory_mb(), 1),
        }
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        self._reset()
        return record


def _resume_dir(resume: bool | str | Path, checkpoints: Checkpoints) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        latest = checkpoints.latest()
        if latest is None:
            log.info("no checkpoint under %s; starting from scratch", checkpoints.root)
        return latest
    path = Path(resume)
    if not (path / "loop_state.json").is_file():
        raise ConfigError(f"{path} is not an rnnlab checkpoint (no loop_state.json); pass a checkpoint folder.")
    return path


def _finish(accelerator, model, job: Job, config, checkpoints: Checkpoints, state, metrics_log, tracker,
            output_dir: Path) -> dict:
    """Best weights back in, the test split scored once, the bundle exported."""
    from safetensors.torch import load_file

    accelerator.wait_for_everyone()
    best = checkpoints.best()
    unwrapped = accelerator.unwrap_model(model)
    if best is not None:
        weights = load_file(str(checkpoints.root / best["checkpoint"] / "model.safetensors"))
        unwrapped.load_state_dict(weights)
    unwrapped.eval()
    test: EvalResult = job.evaluate(unwrapped, "test", accelerator)
    val = state["best_val"] or {}
    accelerator.log({f"test/{k}": v for k, v in test.metrics.items()}, step=state["step"])
    metrics_log.write("test", step=state["step"], best_step=state["best_step"], **test.metrics)
    result = {"val": val, "test": dict(test.metrics), "best_step": state["best_step"], "steps": state["step"],
              "stopped_early": bool(state["stopped_early"]), "bundle": str(output_dir / "bundle")}
    if accelerator.is_main_process:
        if config["job"] == "stock":
            print(stock_table(val, test.metrics), flush=True)
        extra = job.report(unwrapped, test, output_dir, tracker)
        result["test"].update({k: v for k, v in extra.items() if isinstance(v, (int, float))})
        from rnnlab.bundle import save_bundle

        save_bundle(output_dir / "bundle", job=config["job"], model=unwrapped, assets=job.assets(),
                    metrics={**result, **({"extra": extra} if extra else {})}, config=config)
        metrics_log.write("summary", **result)
        log.info("best step %s; test %s; bundle %s", state["best_step"],
                 " ".join(f"{k}={v:.4g}" for k, v in test.metrics.items() if not k.startswith("baseline")),
                 output_dir / "bundle")
    accelerator.wait_for_everyone()
    return result
