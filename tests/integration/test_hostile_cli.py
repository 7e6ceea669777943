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
    canary = f"hf_canary_{secrets.token_hex(12)}"
    env = {"HF_ENDPOINT": fake_hub, "HF_HUB_CACHE": str(tmp_path / "hf"), "EFFINE_CACHE": str(tmp_path / "cache"),
           "HF_TOKEN": canary}
    proc = effine("plan", "configs/smollm2-135m-lora.yaml", "--set", "model.name=someorg/no-such-model", env=env)
    assert proc.returncode == 2, proc.stderr
    assert any(canary in h.get("authorization", h.get("Authorization", "")) for h in _NotFound.seen)  # it was sent
    assert canary not in proc.stdout + proc.stderr  # ... and never printed
    assert "model.name: cannot download 'someorg/no-such-model' from the Hugging Face Hub" in proc.stderr
    assert "hf download someorg/no-such-model --local-dir DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    from effine.config import load_config
    from effine.errors import ModelError
    from effine.plan.memory import plan_memory

    with pytest.raises(ModelError, match="'no-such-model' is neither a packaged model"):  # no download tried
        plan_memory(load_config(None, ["model.name=no-such-model"]))


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
            hits.append(str(p.relative_to(root)))
    return hits


def test_hf_token_canary_appears_in_no_file_or_output(tmp_path, tiny_llama_dir):
    """A full tiny run through the real CLI (train, generate, merge) with HF_TOKEN set: every byte written under the
    run dir and the effine cache, and everything printed, is searched for the token."""
    canary = f"hf_canary_{secrets.token_hex(12)}"
    data = write_jsonl(tmp_path / "chats.jsonl", chat_rows(24))
    run = tmp_path / "run"
    env = {"HF_TOKEN": canary, "HUGGING_FACE_HUB_TOKEN": canary, "EFFINE_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    sets = [f"model.name={tiny_llama_dir}", f"data.path={data}", f"output.dir={run}", "data.max_length=64",
            "train.max_steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
            "train.save_every=2", "eval.max_new_tokens=4", "eval.prompts_from_eval=1", "eval.max_batches=1"]
    outputs = []
    proc = effine("train", "configs/smollm2-135m-lora.yaml", *[a for s in sets for a in ("--set", s)], env=env)
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for args in (("generate", str(run), "--prompt", "hello", "--max-new-tokens", "4"),
                 ("merge", str(run), "--prompt", "hello")):
        proc = effine(*args, env=env)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "merged" / "config.json").is_file()
    assert any((run / "checkpoints").iterdir())
    # The search finds what is there (the model path is written into the run's config) ...
    assert "config.yaml" in _files_containing(run, str(tiny_llama_dir).encode())
    # ... and the token is nowhere.
    needle = canary.encode()
    assert _files_containing(run, needle) == [] and _files_containing(tmp_path / "cache", needle) == []
    assert not [o for o in outputs if canary in o]
