"""Checkpoints: written atomically, pointed at by ``latest.json`` / ``best.json``, read back on resume.

Layout (under the run's ``checkpoints/``)::

    step-000120/   accelerator.save_state + loop_state.json + job_state_<rank>.safetensors + manifest.json
    latest.json    {"checkpoint": "step-000120", "step": 120, "previous": "step-000080"}   (read by resume)
    best.json      {"checkpoint": ..., "step": ..., "value": ...}
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from rnnlab.errors import ConfigError
from rnnlab.trainers import durable

log = logging.getLogger(__name__)


class Checkpoints:
    """``checkpoints/step-N`` folders, each written to a temporary folder, fsynced with a manifest of its files and
    renamed into place (rnnlab/trainers/durable.py); ``latest.json`` (with the ``previous`` checkpoint) and
    ``best.json`` point at them and move only once the folder is on disk. The latest, the one before it and the
    best are kept, so a damaged latest one always leaves an older one to resume from."""

    def __init__(self, root: Path, config: Mapping | None = None) -> None:
        self.root = root
        self.config = dict(config or {})  # fingerprinted into every manifest; a resume under other settings fails

    def _pointer(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        try:
            pointer = json.loads(path.read_text())
            return pointer if isinstance(pointer, dict) and "checkpoint" in pointer else None
        except (OSError, ValueError):
            return None

    def latest(self) -> Path | None:
        pointer = self._pointer("latest")
        return self.root / pointer["checkpoint"] if pointer else None

    def best(self) -> dict | None:
        return self._pointer("best")

    def save(self, accelerator, step: int, loop_state: dict, job, is_best: bool, best_value) -> Path:
        with durable.storage("a checkpoint", self.root):
            return self._save(accelerator, step, loop_state, job, is_best, best_value)

    def _save(self, accelerator, step: int, loop_state: dict, job, is_best: bool, best_value) -> Path:
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
            durable.write_manifest(tmp, self.config)
            durable.publish(tmp, final)  # fsync files and folder, rename, fsync the parent
            latest = self._pointer("latest")
            previous = latest["checkpoint"] if latest and latest["checkpoint"] != name else None
            durable.write_json(self.root / "latest.json", {"checkpoint": name, "step": step, "previous": previous})
            if is_best:
                durable.write_json(self.root / "best.json", {"checkpoint": name, "step": step, "value": best_value})
            self.prune()  # only now: every pointer names a folder that is on disk
        accelerator.wait_for_everyone()
        return final

    def resume_dir(self, resume: bool | str | Path) -> Path | None:
        """The checkpoint to continue from: ``True`` = the newest whole one here (None when there is none), a path
        = that checkpoint folder (Ray Tune hands one back through ``tune.get_checkpoint``). Each is checked against
        its manifest and the run's settings."""
        if resume is False or resume is None:
            return None
        if resume is not True:
            path = Path(resume)
            if not (path / "loop_state.json").is_file() and not (path / durable.MANIFEST).is_file():
                raise ConfigError(f"{path} is not an rnnlab checkpoint (no loop_state.json); pass a checkpoint folder.")
            problem = self._problem(path)
            if problem:
                raise ConfigError(f"Cannot resume from {path}: {problem}; pass a whole checkpoint folder.")
            self._check_settings(path)
            return path
        problems = []
        for candidate in self._candidates(problems):
            problem = self._problem(candidate)
            if problem is None:
                if problems:
                    log.warning("The latest checkpoint is unusable (%s); falling back to %s.", "; ".join(problems),
                                candidate.name)
                self._check_settings(candidate)
                return candidate
            problems.append(problem)
        if problems:
            log.warning("No checkpoint under %s is whole (%s); starting from scratch.", self.root, "; ".join(problems))
        else:
            log.info("no checkpoint under %s; starting from scratch", self.root)
        return None

    def _candidates(self, problems: list[str]) -> list[Path]:
        """The pointer's checkpoint and the one before it first, then every other folder, newest first."""
        named = []
        pointer = self._pointer("latest")
        if pointer is None and (self.root / "latest.json").exists():
            problems.append("latest.json is empty or not valid JSON")
        if pointer:
            named = [pointer["checkpoint"], pointer.get("previous")]
        folders = sorted((p.name for p in self.root.glob("step-*") if p.is_dir()), reverse=True)
        order = [name for name in named if name] + [name for name in folders if name not in named]
        return [self.root / name for name in dict.fromkeys(order)]

    def _check_settings(self, folder: Path) -> None:
        if (folder / durable.MANIFEST).is_file():
            durable.check_same_config(folder, self.config)

    @staticmethod
    def _problem(folder: Path) -> str | None:
        if (folder / "loop_state.json").is_file() and not (folder / durable.MANIFEST).exists():
            return None  # written before checkpoints carried a manifest: renamed into place whole all the same
        return durable.checkpoint_problem(folder)

    def restore(self, accelerator, directory: Path, job) -> dict:
        """Model, optimizer, schedule and RNG states back from ``directory``, and this process's job state;
        returns the loop state saved with them."""
        accelerator.load_state(str(directory))
        job.load_state_dict(load_job_state(directory, accelerator.process_index))
        return json.loads((directory / "loop_state.json").read_text())

    def load_best_weights(self, model: torch.nn.Module) -> bool:
        """The best checkpoint's weights into ``model``; False when no checkpoint was ever the best (or it is
        damaged: then the weights stay the final ones, with a warning)."""
        from safetensors.torch import load_file

        best = self.best()
        if best is None:
            return False
        folder = self.root / best["checkpoint"]
        problem = self._problem(folder)
        if problem:
            log.warning("The best checkpoint is unusable (%s); exporting the final weights instead.", problem)
            return False
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return True

    def prune(self) -> None:
        latest, best = self._pointer("latest"), self._pointer("best")
        keep = {name for name in (latest and latest["checkpoint"], latest and latest.get("previous"),
                                  best and best["checkpoint"]) if name}
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
