"""Shared training pieces: seeding, checkpoints and resume, metric logs, shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.runtime import resolve_device, seed_everything
from SpineInpaintLib.core.weights import load_weights, save_weights, sha256_of
from SpineInpaintLib.training.loop import MetricsLog, load_checkpoint, plot_curves, save_checkpoint


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1))


def test_seed_everything_makes_runs_repeat():
    seed_everything(3)
    a = (torch.rand(4), np.random.rand(2))
    seed_everything(3)
    b = (torch.rand(4), np.random.rand(2))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    seed_everything(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 8, 8)).mean().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ckpt.pt", epoch=4, models={"net": model},
                                    optimizers={"opt": opt}, seed=0, extra={"best": 0.5})
    expected_next = torch.rand(3)
    other = _model()
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    state = load_checkpoint(path, models={"net": other}, optimizers={"opt": other_opt})
    assert state == {"epoch": 4, "seed": 0, "extra": {"best": 0.5}}
    for p, q in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(p, q)
    assert other_opt.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(3), expected_next)  # the RNG continues where the run stopped


def test_weights_round_trip_with_metadata_and_sha(tmp_path):
    model = _model()
    path = save_weights(model, tmp_path / "net.safetensors", {"architecture": "toy", "seed": 1})
    meta = json.loads((tmp_path / "net.json").read_text())
    assert meta["architecture"] == "toy" and meta["sha256"] == sha256_of(path)
    other = _model()
    assert load_weights(other, path)["seed"] == 1
    for p, q in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(p, q)


def test_half_weights_load_back_as_float32(tmp_path):
    model = _model()
    path = save_weights(model, tmp_path / "h.safetensors", {}, half=True)
    other = _model()
    load_weights(other, path)
    weight = other.state_dict()["0.weight"]
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, model.state_dict()["0.weight"], atol=1e-3, rtol=1e-3)


def test_corrupted_or_missing_weights_are_clear_errors(tmp_path):
    path = save_weights(_model(), tmp_path / "net.safetensors", {})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SpineInpaintError, match="does not match the sha256"):
        load_weights(_model(), path)
    with pytest.raises(SpineInpaintError, match="not found"):
        load_weights(_model(), tmp_path / "absent.safetensors")


def test_metrics_log_drops_epochs_after_a_resume_and_plots(tmp_path):
    log = MetricsLog(tmp_path / "m.csv")
    for epoch in range(1, 5):
        log.append(epoch=epoch, loss=1.0 / epoch, iou=0.2 * epoch)
    resumed = MetricsLog(tmp_path / "m.csv", resume_epoch=2)
    assert [int(r["epoch"]) for r in resumed.rows] == [1, 2]
    resumed.append(epoch=3, loss=0.3, iou=0.7)
    text = (tmp_path / "m.csv").read_text().splitlines()
    assert text[0] == "epoch,loss,iou" and len(text) == 4
    png = plot_curves(tmp_path / "m.csv", tmp_path / "m.png", [("loss", ["loss"]), ("IoU", ["iou"])])
    assert png.stat().st_size > 5000


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(SpineInpaintError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SpineInpaintError, match="no CUDA GPU"):
            resolve_device("cuda")
