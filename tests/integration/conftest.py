"""One real tiny training run shared by the report, watch and tracker tests (training it once keeps them fast)."""

from __future__ import annotations

import pytest

from tests.conftest import chat_rows, write_jsonl

CANARIES = {"HF_TOKEN": "hf_canaryToken4c1d", "EFFINE_TEST_API_SECRET": "canarySecret9e2b"}


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory, tiny_llama_dir):
    """A 12-step tiny LoRA run with every tracker on (W&B offline, MLflow local), secrets in the environment and
    in a config value, and a prompt holding HTML (so escaping is exercised)."""
    from effine.config import load_config
    from effine.train.run import run_training

    root = tmp_path_factory.mktemp("reported")
    data = write_jsonl(root / "chats.jsonl", chat_rows(40))
    prompt = f"say <b>hi</b> & <script>alert(1)</script> {CANARIES['HF_TOKEN']}"
    cfg = load_config(None, [
        f"model.name={tiny_llama_dir}", "model.dtype=fp32", f"data.path={data}", "data.max_length=64",
        "data.eval_fraction=0.2", f"output.dir={root}/run", "adapter.r=4", "adapter.alpha=8", "train.lr=5e-3",
        "train.batch_size=4", "train.log_every=1", "train.warmup_steps=0", "train.max_steps=12",
        "train.eval_every=4", "eval.max_new_tokens=4", "train.report_to=[tensorboard, wandb, mlflow]"])
    cfg.eval.prompts = [prompt, f"secret {CANARIES['EFFINE_TEST_API_SECRET']}"]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CANARIES.items():
            mp.setenv(k, v)
        home = root / "home"  # W&B's settings and caches stay out of the real home directory
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = run_training(cfg)
    return root / "run", summary
