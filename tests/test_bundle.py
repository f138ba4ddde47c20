"""Bundles: round trips give identical predictions; missing, edited, tampered or foreign bundles are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rnnlab.bundle import FORMAT_VERSION, load_bundle, save_bundle
from rnnlab.errors import BundleError
from rnnlab.models import build_model

SETTINGS = {
    "sentiment": {"vocab_size": 30, "embed_dim": 4, "hidden_size": 5, "bidirectional": True, "fc_size": 3},
    "stock": {"num_features": 6, "hidden_size": 4, "num_layers": 2, "fc_size": 3},
    "charlm": {"vocab_size": 12, "embed_dim": 4, "hidden_size": 6},
}
ASSETS = {
    "sentiment": {"vocab": {"itos": ["<pad>", "<unk>"] + [f"w{i}" for i in range(28)], "unk_index": 1}},
    "stock": {"scaler": {"columns": ["a"], "mean": [0.0], "scale": [1.0]},
              "target_scaler": {"columns": ["close"], "mean": [0.0], "scale": [1.0]}},
    "charlm": {"vocab": {"itos": list("abcdefghijk "), "unk_index": None}},
}


def predictions(job: str, model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if job == "sentiment":
            ids = torch.randint(1, 30, (3, 7), generator=g)
            ids[1, 4:] = 0
            return model(ids, torch.tensor([7, 4, 7]))
        if job == "stock":
            return model(torch.randn(3, 5, 6, generator=g))
        return model(torch.randint(0, 12, (2, 9), generator=g))[0]


def make_bundle(tmp_path, job: str = "charlm"):
    torch.manual_seed(0)
    model = build_model(job, SETTINGS[job]).eval()
    path = save_bundle(tmp_path / "bundle", job=job, model=model, assets=ASSETS[job],
                       metrics={"test": {"loss": 0.5}}, config={"job": job, "train": {"lr": 0.003}})
    return path, model


@pytest.mark.parametrize("job", sorted(SETTINGS))
def test_round_trip_gives_identical_predictions(tmp_path, job):
    path, model = make_bundle(tmp_path, job)
    bundle = load_bundle(path)
    assert bundle.job == job and not bundle.model.training
    assert bundle.model_config == model.config.to_dict()
    assert bundle.assets == ASSETS[job]
    assert bundle.metrics == {"test": {"loss": 0.5}}
    assert bundle.config == {"job": job, "train": {"lr": 0.003}}
    assert torch.equal(predictions(job, model), predictions(job, bundle.model))


def test_bundle_holds_safetensors_and_json_only(tmp_path):
    path, _ = make_bundle(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "metrics.json", "model.safetensors", "vocab.json"]
    manifest = json.loads((path / "config.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["job"] == "charlm"
    assert set(manifest["files"]) == {"metrics.json", "model.safetensors", "vocab.json"}


def test_an_example_request_is_kept_checked_and_optional(tmp_path):
    path, _ = make_bundle(tmp_path)
    assert load_bundle(path).example is None and not (path / "example.json").exists()  # none asked for: none kept
    model = build_model("charlm", SETTINGS["charlm"])
    example = {"prompt": "the war", "max_new_tokens": 20}
    save_bundle(path, job="charlm", model=model, assets=ASSETS["charlm"], metrics={}, config={}, example=example)
    assert load_bundle(path).example == example
    assert "example.json" in json.loads((path / "config.json").read_text())["files"]
    (path / "example.json").write_text('{"prompt": "something else"}')
    with pytest.raises(BundleError, match="example.json does not match its checksum"):
        load_bundle(path)


def test_saving_again_replaces_the_bundle_and_leaves_no_temporary_folders(tmp_path):
    path, _ = make_bundle(tmp_path)
    torch.manual_seed(1)
    other = build_model("charlm", SETTINGS["charlm"])
    save_bundle(path, job="charlm", model=other, assets=ASSETS["charlm"], metrics={}, config={})
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert torch.equal(load_bundle(path).model.output.weight, other.output.weight)


def test_refuses_to_overwrite_a_folder_that_is_not_a_bundle(tmp_path):
    precious = tmp_path / "bundle"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(BundleError, match="not a bundle"):
        make_bundle(tmp_path)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize("name", ["model.safetensors", "vocab.json", "metrics.json", "config.json"])
def test_missing_file_is_refused(tmp_path, name):
    path, _ = make_bundle(tmp_path)
    (path / name).unlink()
    with pytest.raises(BundleError, match="missing|no config.json"):
        load_bundle(path)


def test_tampered_weights_are_refused(tmp_path):
    path, _ = make_bundle(tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors does not match its checksum"):
        load_bundle(path)


def test_tampered_asset_is_refused(tmp_path):
    path, _ = make_bundle(tmp_path)
    (path / "vocab.json").write_text(json.dumps({"itos": list("zyxwvutsrqpo"), "unk_index": None}))
    with pytest.raises(BundleError, match="vocab.json does not match"):
        load_bundle(path)


def test_edited_config_is_refused(tmp_path):
    path, _ = make_bundle(tmp_path)
    manifest = json.loads((path / "config.json").read_text())
    manifest["config"]["train"]["lr"] = 1.0
    (path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="edited"):
        load_bundle(path)


def test_other_format_version_is_refused(tmp_path):
    path, _ = make_bundle(tmp_path)
    manifest = json.loads((path / "config.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"format version {FORMAT_VERSION + 1}"):
        load_bundle(path)


def test_weights_not_matching_the_config_are_refused(tmp_path):
    # A consistent bundle (checksums recomputed) whose weights come from another architecture.
    path, _ = make_bundle(tmp_path)
    bigger = build_model("charlm", {**SETTINGS["charlm"], "hidden_size": 9})
    other = save_bundle(tmp_path / "other", job="charlm", model=bigger, assets=ASSETS["charlm"], metrics={},
                        config={})
    shutil.copy(other / "model.safetensors", path / "model.safetensors")
    manifest = json.loads((path / "config.json").read_text())
    manifest["files"]["model.safetensors"] = json.loads((other / "config.json").read_text())["files"]["model.safetensors"]
    from rnnlab.bundle import _manifest_digest

    manifest["config_sha256"] = _manifest_digest(manifest)
    (path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="do not match its model config"):
        load_bundle(path)


def test_error_messages_are_one_sentence(tmp_path):
    path, _ = make_bundle(tmp_path)
    (path / "metrics.json").write_text("{}")
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0


def _rewrite_manifest(path, edit) -> None:
    """Edit config.json the way an attacker would: change it, then recompute its own checksum."""
    from rnnlab.bundle import _manifest_digest

    manifest = json.loads((path / "config.json").read_text())
    edit(manifest)
    manifest["config_sha256"] = _manifest_digest(manifest)
    (path / "config.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/dev/zero", "../outside.json", "sub/metrics.json", "..", "", "a\\b.json"])
def test_crafted_file_names_are_refused_before_anything_is_read(tmp_path, name):
    path, _ = make_bundle(tmp_path)
    (tmp_path / "outside.json").write_text("{}")
    _rewrite_manifest(path, lambda m: m["files"].__setitem__(name, "0" * 64))
    with pytest.raises(BundleError, match="not a plain file name inside the bundle") as info:
        load_bundle(path)
    assert "\n" not in str(info.value)


def test_crafted_asset_name_is_refused(tmp_path):
    path, _ = make_bundle(tmp_path)
    _rewrite_manifest(path, lambda m: m.__setitem__("assets", ["../../etc/passwd"]))
    with pytest.raises(BundleError, match="'assets' must list plain names"):
        load_bundle(path)


def test_symlink_out_of_the_bundle_is_refused(tmp_path):
    path, _ = make_bundle(tmp_path)
    outside = tmp_path / "elsewhere.json"
    shutil.copy(path / "metrics.json", outside)  # same bytes: only the link itself is at fault
    (path / "metrics.json").unlink()
    (path / "metrics.json").symlink_to(outside)
    with pytest.raises(BundleError, match="is a link to .* outside the bundle"):
        load_bundle(path)
