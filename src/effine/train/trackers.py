"""Experiment trackers (``train.report_to: [tensorboard, wandb, mlflow]``), fed from the same place metrics.jsonl
is written (:class:`effine.train.metrics.MetricsLog`), so a tracker holds exactly the series of metrics.jsonl.

Names: a ``train`` row's values become ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``
...; an ``eval`` row's become ``eval/loss`` and ``eval/ppl``; the step is the optimizer step. Non-finite values
(no clipping: grad norm NaN) are skipped. The run's config is logged as parameters, with the value of every
secret-looking environment variable (HF_TOKEN, *_API_KEY, *SECRET*, *PASSWORD* ...) replaced by ``***``
wherever it occurs; nothing else from the environment is sent. Where they write:

- tensorboard: ``RUN_DIR/tensorboard/`` (event files; ``tensorboard --logdir RUN_DIR/tensorboard``)
- wandb: ``RUN_DIR/wandb/``; project ``$WANDB_PROJECT`` (default ``effine``); ``WANDB_MODE=offline`` keeps it
  local (``wandb sync`` uploads later). Code, git state and system metadata are not collected.
- mlflow: ``$MLFLOW_TRACKING_URI``, else a local file store in ``RUN_DIR/mlruns``; experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (default ``effine``).

The packages are optional: ``pip install 'effine[tracking]'``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from effine.errors import ConfigError

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (long enough not to match ordinary words)."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(value: Any, secrets: list[str]) -> Any:
    """``value`` (nested dicts/lists of scalars) with every secret replaced by ``***``."""
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, "***")
    return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """The tracker names and values of one metrics.jsonl row (empty for rows that are not train/eval)."""
    if kind not in ("train", "eval"):
        return {}
    out = {}
    for k, v in values.items():
        if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[f"{kind}/{k.removeprefix('eval_') if kind == 'eval' else k}"] = float(v)
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=10)  # live enough to follow
        table = "\n".join(f"    {k}: {v}" for k, v in flatten(params).items())  # indented: markdown code block
        self.writer.add_text("config", table, 0)

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, params: dict[str, Any]):
        import wandb

        settings = wandb.Settings(save_code=False, disable_code=True, disable_git=True, x_disable_meta=True,
                                  x_disable_stats=True, x_disable_machine_info=True, x_save_requirements=False,
                                  console="off", silent=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "effine", name=run_dir.name,
                              dir=str(run_dir), config=params, settings=settings, reinit="create_new")

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, params: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; it is still the one local
            # backend that needs no database packages (`mlflow ui --backend-store-uri RUN_DIR/mlruns` reads it).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "effine"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        # The client API, not mlflow.start_run: no automatic tags (user name, source file, git commit).
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        items = [Param(k, str(v)[:500]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers behind one ``log(kind, values)``; a tracker that fails mid-run is dropped with a warning
    (a tracker outage must not stop training: metrics.jsonl still has everything)."""

    def __init__(self, trackers: dict[str, Any]):
        self.trackers = trackers

    def log(self, kind: str, values: dict[str, Any]) -> None:
        named = scalars(kind, values)
        if not named or "step" not in values:
            return
        for name, t in list(self.trackers.items()):
            try:
                t.log(kind, int(values["step"]), named)
            except Exception as e:  # noqa: BLE001
                print(f"[effine] train.report_to: {name} failed ({type(e).__name__}: {e}); no longer logging to it",
                      file=sys.stderr)
                del self.trackers[name]

    def close(self) -> None:
        for t in self.trackers.values():
            t.close()
        self.trackers = {}


def open_trackers(cfg: Any, run_dir: Path) -> Trackers:
    """Start the trackers ``cfg.train.report_to`` names; a missing package or a failed start is a ConfigError."""
    names = list(dict.fromkeys(cfg.train.report_to or []))
    if not names:
        return Trackers({})
    params = redact(cfg.to_dict(), secret_values())
    opened: dict[str, Any] = {}
    for name in names:
        try:
            opened[name] = TRACKERS[name](run_dir, params)
        except ImportError as e:
            Trackers(opened).close()
            raise ConfigError(f"train.report_to: {name} needs the {PACKAGES[name]} package ({e}); install it with "
                              "pip install 'effine[tracking]', or remove it from train.report_to.") from None
        except Exception as e:  # noqa: BLE001 - e.g. wandb without a login, an unreachable MLflow server
            Trackers(opened).close()
            hint = {"wandb": "run `wandb login`, or set WANDB_MODE=offline",
                    "mlflow": "check MLFLOW_TRACKING_URI"}.get(name, "")
            raise ConfigError(f"train.report_to: {name} could not start ({type(e).__name__}: {e})"
                              + (f"; {hint}." if hint else ".")) from None
    return Trackers(opened)
