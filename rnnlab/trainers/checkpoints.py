"""Checkpoints: written atomically, pointed at by ``latest.json`` / ``best.json``, read back on resume.

Layout (under the run's ``checkpoints/``)::

    step-000120/   accelerator.save_state + loop_state.json + job_state_<rank>.safetensors
    latest.json    {"checkpoint": "step-000120", "step": 120}   (replaced atomically, read by resume)
    best.json      {"checkpoint": ..., "step": ..., "value": ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from rnnlab.errors import ConfigError

log = logging.getLogger(__name__)


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

    def save(self, accelerator, step: int, loop_state: dict, job, is_best: bool, best_value) -> Path:
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

    def resume_dir(self, resume: bool | str | Path) -> Path | None:
        """The checkpoint to continue from: ``True`` = the latest one here (None when there is none), a path =
        that checkpoint folder (Ray Tune hands one back through ``tune.get_checkpoint``)."""
        if resume is False or resume is None:
            return None
        if resume is True:
            latest = self.latest()
            if latest is None:
                log.info("no checkpoint under %s; starting from scratch", self.root)
            return latest
        path = Path(resume)
        if not (path / "loop_state.json").is_file():
            raise ConfigError(f"{path} is not an rnnlab checkpoint (no loop_state.json); pass a checkpoint folder.")
        return path

    def restore(self, accelerator, directory: Path, job) -> dict:
        """Model, optimizer, schedule and RNG states back from ``directory``, and this process's job state;
        returns the loop state saved with them."""
        accelerator.load_state(str(directory))
        job.load_state_dict(load_job_state(directory, accelerator.process_index))
        return json.loads((directory / "loop_state.json").read_text())

    def load_best_weights(self, model: torch.nn.Module) -> bool:
        """The best checkpoint's weights into ``model``; False when no checkpoint was ever the best."""
        from safetensors.torch import load_file

        best = self.best()
        if best is None:
            return False
        model.load_state_dict(load_file(str(self.root / best["checkpoint"] / "model.safetensors")))
        return True

    def prune(self) -> None:
        keep = {p["checkpoint"] for p in (self._pointer("latest"), self._pointer("best")) if p}
        for path in self.root.glob("step-*"):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def register_hooks(accelerator) -> None:
    """How Accelerate saves and loads the model here (see the two hooks below)."""
    accelerator.register_save_state_pre_hook(_unshare_weights)
    accelerator.register_load_state_pre_hook(_load_weights_by_name)


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
