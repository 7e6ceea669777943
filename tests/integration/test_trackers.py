"""train.report_to: TensorBoard, W&B (offline) and MLflow (local file store) each hold the loss series of
metrics.jsonl, read back with each tool's own reader; no secret from the environment reaches any of them."""

from __future__ import annotations

import json
import math
import struct

import pytest

from tests.integration.conftest import CANARIES


def _series(run, kind, key):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if r["kind"] == kind and math.isfinite(r[key])]


def _assert_same(got, want, rel):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=rel)


def test_tensorboard_holds_the_loss_series(reported_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = reported_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for tag, kind, key in (("train/loss", "train", "loss"), ("eval/loss", "eval", "eval_loss"),
                           ("train/lr", "train", "lr")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        _assert_same(got, _series(run, kind, key), rel=1e-6)  # event files store float32
    assert len(_series(run, "train", "loss")) == 12
    assert len(_series(run, "eval", "eval_loss")) == 4  # steps 0, 4, 8 and the final 12


def _wandb_records(path):
    """The protobuf records of a .wandb file (LevelDB log framing: 32 KiB blocks, 7-byte record headers),
    parsed with wandb's own Record message."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    records = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def test_wandb_offline_holds_the_loss_series(reported_run):
    run, _ = reported_run
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history = []
    for rec in _wandb_records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    for tag, kind, key in (("train/loss", "train", "loss"), ("eval/loss", "eval", "eval_loss")):
        got = [(h["_step"], h[tag]) for h in history if tag in h]
        _assert_same(got, _series(run, kind, key), rel=1e-12)


def test_mlflow_local_holds_the_loss_series_and_config(reported_run):
    from mlflow.tracking import MlflowClient

    run, _ = reported_run
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("effine")
    (mrun,) = client.search_runs([exp.experiment_id])
    for tag, kind, key in (("train/loss", "train", "loss"), ("eval/loss", "eval", "eval_loss")):
        hist = sorted(client.get_metric_history(mrun.info.run_id, tag), key=lambda m: m.step)
        _assert_same([(m.step, m.value) for m in hist], _series(run, kind, key), rel=1e-12)
    params = mrun.data.params
    assert params["train.max_steps"] == "12" and params["adapter.r"] == "4"
    # the secret inside a config value was logged, redacted
    assert "***" in params["eval.prompts"] and CANARIES["HF_TOKEN"] not in params["eval.prompts"]


def test_no_secret_reaches_any_tracker_file(reported_run):
    run, _ = reported_run
    files = [p for d in ("tensorboard", "wandb", "mlruns") for p in (run / d).rglob("*") if p.is_file()]
    assert len(files) > 10  # every tracker wrote something
    for p in files:
        blob = p.read_bytes()
        for name, secret in CANARIES.items():
            assert secret.encode() not in blob, f"{name} leaked into {p}"


def test_report_to_validation_and_missing_package(monkeypatch, tmp_path):
    from effine.config import load_config
    from effine.errors import ConfigError
    from effine.train import trackers

    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: 'tensorbord' is not allowed.*tensorboard"):
        load_config(None, ["train.report_to=[tensorbord]"])
    cfg = load_config(None, ["train.report_to=[tensorboard]"])

    class Missing:
        def __init__(self, *a):
            raise ImportError("No module named 'tensorboard'")

    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", Missing)
    with pytest.raises(ConfigError, match=r"pip install 'effine\[tracking\]'"):
        trackers.open_trackers(cfg, tmp_path)
