"""Stock training options: the loss (train.loss mse | l1 | huber) and the chapter's protocol: no validation split
(data.val_days=0: no validation, no selection, the final weights are the bundle's) and the raw target
(data.scale_target=false). Tiny fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_datasets import make_stock_csv
from safetensors.torch import load_file

from rnnlab.errors import ConfigError
from rnnlab.config import load_config
from rnnlab.jobs.stock import stock_loss
from rnnlab.trainers.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prices(tmp_path_factory) -> Path:
    return make_stock_csv(tmp_path_factory.mktemp("stock"))


def smoke(prices: Path, *overrides: str) -> dict:
    return load_config("stock", "smoke", overrides=[f"data.source={prices}", "tracking.wandb=false", *overrides])


def events(output: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


# -- train.loss ------------------------------------------------------------------------------------------------


def test_stock_loss_values():
    pred, target = torch.tensor([0.0, 1.0, 4.0]), torch.tensor([0.5, 1.0, 1.0])
    assert float(stock_loss(pred, target, "mse")) == pytest.approx(0.25 + 0 + 9)
    assert float(stock_loss(pred, target, "l1")) == pytest.approx(0.5 + 0 + 3)
    # huber, delta 1: 0.5 * 0.5^2 inside, 1 * (3 - 0.5) beyond
    assert float(stock_loss(pred, target, "huber", 1.0)) == pytest.approx(0.125 + 0 + 2.5)


def test_l1_loss_fits_the_median_and_mse_the_mean():
    """rnnlab's stock_loss itself, scanned over constant predictions (no optimizer in the way): l1 is least at the
    median, mse at the mean, huber in between; and it is a sum over windows (the loop divides by the count)."""
    target = torch.tensor([0.0, 0.0, 0.0, 1.0, 10.0])
    grid = torch.linspace(-1.0, 11.0, 1201, dtype=torch.float64)  # steps of 0.01
    best = {kind: float(grid[torch.stack([stock_loss(c.expand(5), target.double(), kind) for c in grid]).argmin()])
            for kind in ("l1", "mse", "huber")}
    assert best["l1"] == pytest.approx(0.0, abs=1e-9) and best["mse"] == pytest.approx(2.2, abs=1e-9)
    assert best["l1"] < best["huber"] < best["mse"]
    pred = torch.tensor([0.3, 2.0, -1.0, 4.0, 0.0])
    for kind in ("l1", "mse", "huber"):
        assert float(stock_loss(pred.repeat(2), target.repeat(2), kind)) == pytest.approx(
            2 * float(stock_loss(pred, target, kind)))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.loss=mae", "train.loss is 'mae'; choose one of mse, l1, huber"),
        ("train.huber_delta=0", "train.huber_delta must be a positive number"),
        ("data.val_days=-1", "data.val_days must be a non-negative integer"),
        ("data.val_days=2.5", "data.val_days must be a non-negative integer"),
    ],
)
def test_bad_stock_options_are_refused_by_name(prices, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        smoke(prices, override)


def test_loss_key_is_stock_only():
    with pytest.raises(ConfigError, match="Unknown config key 'train.loss'"):
        load_config("sentiment", "smoke", overrides=["train.loss=l1"])


@pytest.fixture(scope="module")
def mse_weights(prices, tmp_path_factory) -> dict[str, torch.Tensor]:
    output = tmp_path_factory.mktemp("mse")
    train(smoke(prices, "train.loss=mse", "train.epochs=1"), output)
    return load_file(str(output / "bundle" / "model.safetensors"))


@pytest.mark.parametrize("loss", ["l1", "huber"])
def test_training_with_each_loss_trains_on_and_reports_that_loss(prices, tmp_path, loss, mse_weights):
    import torch.nn.functional as F

    from rnnlab.bundle import load_bundle
    from rnnlab.trainers.job import make_job

    config = smoke(prices, f"train.loss={loss}", "train.epochs=1")
    result = train(config, tmp_path)
    # the gradients came from this loss: same seed and batches as the MSE run, other weights
    weights = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    assert any(not torch.equal(weights[name], mse_weights[name]) for name in weights)
    # the val "loss" is this loss per window on the scaled target, recomputed here from the bundle's predictions
    job = make_job(config)
    job.load_data()
    with torch.no_grad():
        predicted = load_bundle(tmp_path / "bundle").model(job.X["val"]).double()
    expected = {"l1": F.l1_loss, "huber": F.huber_loss}[loss](predicted, job.y_scaled["val"].double())
    assert result["val"]["loss"] == pytest.approx(float(expected), rel=1e-4)


# -- data.val_days=0 ---------------------------------------------------------------------------------------------


def test_no_validation_split_trains_full_length_and_exports_the_final_weights(prices, tmp_path):
    config = smoke(prices, "data.val_days=0", "train.epochs=3", "train.eval_every=4")
    result = train(config, tmp_path)
    assert result["val"] == {} and result["best_step"] is None and not result["stopped_early"]
    assert not events(tmp_path, "val") and len(events(tmp_path, "test")) == 1
    checkpoints = tmp_path / "checkpoints"
    assert not (checkpoints / "best.json").exists()
    latest = json.loads((checkpoints / "latest.json").read_text())
    assert latest["step"] == result["steps"]  # the final step, checkpointed for resuming
    final = load_file(str(checkpoints / latest["checkpoint"] / "model.safetensors"))
    exported = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    assert final.keys() == exported.keys()
    for name in final:
        assert torch.equal(final[name], exported[name]), name



def test_no_validation_split_trains_on_the_whole_period(prices, tmp_path):
    held_out = train(smoke(prices, "train.epochs=1", "data.limit_train=0", "train.batch_size=32"), tmp_path / "a")
    all_in = train(smoke(prices, "train.epochs=1", "data.limit_train=0", "train.batch_size=32", "data.val_days=0"),
                   tmp_path / "b")
    assert 252 // 32 <= all_in["steps"] - held_out["steps"] <= 252 // 32 + 1  # 252 more windows, 32 a batch


def test_no_validation_split_refuses_early_stopping(prices):
    with pytest.raises(ConfigError, match="early_stopping_patience needs a validation split"):
        smoke(prices, "data.val_days=0", "train.early_stopping_patience=3")


def test_no_validation_split_refuses_tuning_callbacks(prices, tmp_path):
    with pytest.raises(ConfigError, match="no validation split"):
        train(smoke(prices, "data.val_days=0"), tmp_path, on_eval=lambda metrics, checkpoint: None)


def test_no_validation_split_resumes_to_identical_weights(prices, tmp_path, monkeypatch):
    from rnnlab.trainers.checkpoints import Checkpoints

    config = smoke(prices, "data.val_days=0", "train.epochs=2", "train.eval_every=3", "train.log_every=1")
    straight = train(config, tmp_path / "straight")

    class Interrupt(Exception):
        pass

    save = Checkpoints.save

    def save_then_stop_at_step_6(self, accelerator, step, *args, **kwargs):
        saved = save(self, accelerator, step, *args, **kwargs)
        if step == 6:  # no validation, so no on_eval to stop from: stop once step 6 is on disk
            raise Interrupt
        return saved

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoints, "save", save_then_stop_at_step_6)
        with pytest.raises(Interrupt):
            train(config, tmp_path / "resumed")
    resumed = train(config, tmp_path / "resumed", resume=True)
    assert resumed["steps"] == straight["steps"]
    a = load_file(str(tmp_path / "straight" / "bundle" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "bundle" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dates_given_with_set_stay_strings(prices):
    config = smoke(prices, "data.train_end=2022-06-30", "data.test_start=2022-07-01")
    assert config["data"]["train_end"] == "2022-06-30" and config["data"]["test_start"] == "2022-07-01"
    json.dumps(config)  # the bundle's config.json and W&B need plain JSON


def test_unscaled_target_trains_on_raw_closes_with_an_identity_target_scaler(prices, tmp_path):
    from rnnlab.data import stock

    scaled = stock.load_stock_data(prices, val_days=0)
    raw = stock.load_stock_data(prices, val_days=0, scale_target=False)
    assert scaled.target_scaler.scale[0] != 1.0
    assert (raw.target_scaler.mean[0], raw.target_scaler.scale[0]) == (0.0, 1.0)
    result = train(smoke(prices, "data.scale_target=false", "data.val_days=0", "train.epochs=1"), tmp_path)
    target_scaler = json.loads((tmp_path / "bundle" / "target_scaler.json").read_text())
    assert target_scaler["mean"] == [0.0] and target_scaler["scale"] == [1.0]
    # the loss is on raw closes (about 1,000 in the fixture): far above a standardised target's
    assert result["test"]["loss"] > 1000


def test_scale_target_must_be_a_boolean(prices):
    with pytest.raises(ConfigError, match="data.scale_target must be true or false"):
        smoke(prices, "data.scale_target=maybe")
