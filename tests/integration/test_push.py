"""`effine push` and `output.push` end to end: the real huggingface_hub client against tests/fake_hub.py.

The Hub is unreachable from CI, so a small in-memory Hub runs on 127.0.0.1 (a free port, HF_ENDPOINT pointing at
it) for each test and is shut down after it. Xet transfers are turned off (HF_HUB_DISABLE_XET): hf_xet talks a
binary protocol to a separate storage server; the LFS path exercises the same repo, preupload and commit API.
What arrives on the fake Hub is checked byte for byte, with the card's YAML, the private flag, the branch, the
commit message, and that the token went in the Authorization header and nowhere else (files, logs, run dir).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from effine.cli import main
from effine.config import load_config
from effine.errors import ConfigError, PushError
from tests.conftest import chat_rows, write_jsonl
from tests.fake_hub import FakeHub

TOKEN = "hf_effineTestTokenXq7Z2vLk9pRsd"


def _overrides(root: Path, model_dir: Path, name: str, *extra: str) -> list[str]:
    data = root / "chats.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(16))
    return [f"model.name={model_dir}", "model.dtype=fp32", f"data.path={data}", "data.max_length=48",
            "data.eval_fraction=0.25", f"output.dir={root}/{name}", "adapter.r=4", "adapter.alpha=8",
            "train.lr=1e-2", "train.batch_size=4", "train.max_steps=2", "train.warmup_steps=0",
            "eval.max_new_tokens=2", "eval.prompts_from_eval=0", "eval.max_batches=1", "train.threads=1", *extra]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir) -> Path:
    from effine.train.run import run_training

    root = tmp_path_factory.mktemp("push-runs")
    run_training(load_config(None, _overrides(root, tiny_llama_dir, "lora")))
    return root / "lora"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    fake = FakeHub(TOKEN, base_cards={"acme/base-7b": {"license": "mit"}})
    monkeypatch.setenv("HF_ENDPOINT", fake.start())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    yield fake
    fake.stop()
    assert fake.unknown == [], "the client called endpoints the fake Hub does not model"


def _card(data: bytes) -> tuple[dict, str]:
    text = data.decode()
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def _assert_token_nowhere(*texts: str, dirs: tuple[Path, ...] = (), files: dict[str, bytes] | None = None):
    for t in texts:
        assert TOKEN not in t
    for d in dirs:
        for p in d.rglob("*"):
            assert not p.is_file() or TOKEN.encode() not in p.read_bytes(), p
    for path, data in (files or {}).items():
        assert TOKEN.encode() not in data, path


def test_push_adapter_private_branch_then_resume(lora_run, hub, capsys):
    repo = "alice/tiny-chat"
    rc = main(["push", str(lora_run), "--repo", repo, "--private", "--revision", "exp-1", "--message", "first try"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert hub.repos[repo].private is True
    files = hub.files(repo, "exp-1")
    adapter = lora_run / "adapter"
    local = sorted(p.name for p in adapter.iterdir())
    assert sorted(files) == sorted([".gitattributes", "README.md", *local])
    assert set(hub.files(repo, "main")) == {".gitattributes"}  # the push went to the branch only
    for name in local:
        if name != "adapter_config.json":  # local base: nothing to rewrite, so even this one is byte-equal
            assert files[name] == (adapter / name).read_bytes(), name
    assert files["adapter_config.json"] == (adapter / "adapter_config.json").read_bytes()
    # one commit, with the message, the weights as LFS and the rest as regular files
    assert [(c.branch, c.summary) for c in hub.commits] == [("exp-1", "first try")]
    assert hub.commits[0].lfs == ["adapter_model.safetensors"]
    assert len(hub.lfs_puts) == 1
    # the model card: metadata and the numbers of summary.json
    meta, body = _card(files["README.md"])
    summary = json.loads((lora_run / "summary.json").read_text())
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local base has no hub id
    assert meta["tags"] == ["effine", "lora", "peft", "text-generation"]
    results = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert results["loss"] == pytest.approx(summary["eval_after"]["eval_loss"], abs=1e-6)
    assert f"| loss | {summary['eval_before']['eval_loss']:.4f} | {summary['eval_after']['eval_loss']:.4f} |" in body
    assert "AutoPeftModelForCausalLM.from_pretrained(\"alice/tiny-chat\")" in body
    assert yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0]) == load_config(
        lora_run / "config.yaml").to_dict()
    # the token: in every authenticated request's header, nowhere else
    writes = [r for r in hub.requests if r[0] == "POST"]
    assert writes and all(auth == f"Bearer {TOKEN}" for _, _, auth in writes)
    _assert_token_nowhere(out.out, out.err, dirs=(lora_run,), files=files)

    # Re-running uploads nothing: every file is compared (size, LFS sha256 / git blob id) and found unchanged.
    n_requests = len(hub.requests)
    assert main(["push", str(lora_run), "--repo", repo, "--revision", "exp-1"]) == 0
    out = capsys.readouterr().out
    assert "nothing to commit" in out and len(hub.commits) == 1 and len(hub.lfs_puts) == 1
    assert not any(p in path for _, path, _ in hub.requests[n_requests:] for p in ("preupload", "commit", "lfs"))

    # A partial earlier push (one file missing remotely, one changed): only those two are sent.
    hub.delete(repo, "tokenizer.json", "exp-1")
    hub.repos[repo].branches["exp-1"]["effine_run.json"] = b"{}"
    assert main(["push", str(lora_run), "--repo", repo, "--revision", "exp-1"]) == 0
    assert sorted(hub.commits[-1].regular + hub.commits[-1].lfs) == ["effine_run.json", "tokenizer.json"]
    assert hub.files(repo, "exp-1") == files
    _assert_token_nowhere(capsys.readouterr().out)


def test_dry_run_needs_no_token_and_sends_nothing(lora_run, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(lora_run), "--repo", "alice/tiny-chat", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.requests == []
    for p in (lora_run / "adapter").iterdir():
        assert p.name in out
    assert "README.md" in out and "library_name: peft" in out and "## How to use" in out
    assert "36." in out or "kB" in out  # sizes are printed
    assert not (lora_run / "README.md").exists()


def test_failing_server_says_what_failed_and_how_to_retry(lora_run, hub, capsys):
    hub.fail.add("commit")
    rc = main(["push", str(lora_run), "--repo", "alice/broken", "--what", "adapter"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "failed while uploading and committing" in err and "500" in err
    assert f"effine push {lora_run} --repo alice/broken --what adapter" in err
    assert hub.commits == [] and set(hub.files("alice/broken")) == {".gitattributes"}
    _assert_token_nowhere(err)
    # the server fixed, the retry completes; the weights already in LFS storage are not sent again
    hub.fail.clear()
    assert main(["push", str(lora_run), "--repo", "alice/broken", "--what", "adapter"]) == 0
    assert len(hub.lfs_puts) == 1 and len(hub.commits) == 1


def test_refused_token_says_it_needs_write_access(lora_run, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_readOnlyTokenAbc123")
    assert main(["push", str(lora_run), "--repo", "alice/x"]) == 2
    err = capsys.readouterr().err
    assert "failed while creating the repo" in err and "needs write access to 'alice'" in err
    assert "hf_readOnlyTokenAbc123" not in err and hub.repos == {}


def test_no_token_is_a_clear_error(lora_run, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(lora_run / "no-such-token"))
    with pytest.raises(PushError, match="no Hugging Face token.*HF_TOKEN.*hf auth login"):
        from effine.export.push import push_run

        push_run(lora_run, "alice/x")
    assert hub.requests == []


def test_hub_base_rewrites_adapter_config_and_inherits_license(lora_run, hub, tmp_path, capsys):
    """A run whose model.name is a hub id: base_model, license (asked from the base's card) and the adapter's
    base_model_name_or_path all name the hub repo, so PEFT can load the pushed adapter from the Hub."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name"] = "acme/base-7b"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["push", str(run), "--repo", "alice/from-hub-base"]) == 0
    files = hub.files("alice/from-hub-base")
    meta, _ = _card(files["README.md"])
    assert meta["base_model"] == "acme/base-7b" and meta["license"] == "mit"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "acme/base-7b"
    assert ("GET", "/api/models/acme/base-7b") in {(m, p) for m, p, _ in hub.requests}


def test_packaged_models_name_their_upstream_hub_repo():
    from effine.export.model_card import base_model_of

    for name, (hub_id, lic) in {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
                                "gemma3-270m": ("google/gemma-3-270m", "gemma")}.items():
        assert base_model_of(load_config(None, [f"model.name={name}"])) == (hub_id, lic)
    assert base_model_of(load_config(None, ["model.name=Qwen/Qwen2.5-0.5B"])) == ("Qwen/Qwen2.5-0.5B", None)
    assert base_model_of(load_config(None, ["model.name=./models/mine"])) == (None, None)


def test_push_merged_merges_first(lora_run, hub, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    assert not (run / "merged").exists()
    assert main(["push", str(run), "--repo", "alice/tiny-merged", "--what", "merged"]) == 0
    files = hub.files("alice/tiny-merged")
    assert (run / "merged" / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert {"config.json", "merge_report.json", "tokenizer.json"} <= set(files)
    meta, body = _card(files["README.md"])
    assert meta["library_name"] == "transformers" and "peft" not in meta["tags"]
    assert "AutoModelForCausalLM.from_pretrained(\"alice/tiny-merged\")" in body and "Merge check" in body


def test_push_gguf_needs_the_export_then_uploads_it(lora_run, hub, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    with pytest.raises(PushError, match=r"effine export gguf .* --type q8_0"):
        from effine.export.push import push_run

        push_run(run, "alice/tiny-gguf", "gguf")
    (run / "gguf").mkdir()
    gguf = b"GGUF" + bytes(range(256)) * 8  # the push does not parse it; the export's own tests do
    (run / "gguf" / "tiny-q8_0.gguf").write_bytes(gguf)
    (run / "gguf" / "Modelfile").write_text("FROM ./tiny-q8_0.gguf\n")
    assert main(["push", str(run), "--repo", "alice/tiny-gguf", "--what", "gguf"]) == 0
    files = hub.files("alice/tiny-gguf")
    assert files["tiny-q8_0.gguf"] == gguf and hub.commits[-1].lfs == ["tiny-q8_0.gguf"]
    meta, body = _card(files["README.md"])
    assert "gguf" in meta["tags"] and "library_name" not in meta
    assert "llama-cli -hf alice/tiny-gguf:q8_0" in body and "ollama create" in body


def test_output_push_at_the_end_of_training(tiny_llama_dir, hub, tmp_path, capsys):
    from effine.train.run import run_training

    summary = run_training(load_config(None, _overrides(tmp_path, tiny_llama_dir, "ok", "output.push.repo=bob/auto",
                                                        "output.push.private=true")))
    assert summary["steps"] == 2
    assert hub.repos["bob/auto"].private and "adapter_model.safetensors" in hub.files("bob/auto")
    assert _card(hub.files("bob/auto")["README.md"])[0]["library_name"] == "peft"
    assert hub.commits[-1].summary == "effine push: adapter of ok"

    # A failing Hub: the run still finishes, keeps its files, and the log says how to retry.
    hub.fail.add("commit")
    summary = run_training(load_config(None, _overrides(tmp_path, tiny_llama_dir, "bad",
                                                        "output.push.repo=bob/failing")))
    run = tmp_path / "bad"
    assert summary["steps"] == 2 and (run / "summary.json").is_file() and (run / "adapter").is_dir()
    log = (run / "train.log").read_text()
    assert "push: failed; the run is kept" in log
    assert f"effine push {run} --repo bob/failing --what adapter" in log
    _assert_token_nowhere(log, capsys.readouterr().out, dirs=(run, tmp_path / "ok"))


def test_output_push_config_is_validated():
    cfg = load_config(None, ["output.push.repo=alice/chat", "output.push.what=merged", "output.push.revision=v2"])
    assert (cfg.output.push.repo, cfg.output.push.what, cfg.output.push.revision) == ("alice/chat", "merged", "v2")
    assert load_config(None, []).output.push.repo is None  # default: no push
    with pytest.raises(ConfigError, match=r"output\.push\.repo: 'chat' is not a Hub repo id.*user/name"):
        load_config(None, ["output.push.repo=chat"])
    with pytest.raises(ConfigError, match=r"output\.push\.what: 'weights' is not allowed"):
        load_config(None, ["output.push.repo=alice/chat", "output.push.what=weights"])
    with pytest.raises(ConfigError, match=r"unknown config key 'output\.push\.privat'.*private"):
        load_config(None, ["output.push.privat=true"])


def test_method_tags_name_what_was_trained():
    from effine.export.model_card import method_tags

    assert method_tags(load_config(None, [])) == ["lora"]
    assert method_tags(load_config(None, ["quant.method=nf4"])) == ["qlora"]
    assert method_tags(load_config(None, ["quant.qat_bits=4", "adapter.dropout=0"])) == ["lora", "qat"]
    assert method_tags(load_config(None, ["adapter.method=full"])) == ["full-fine-tune"]


def test_card_of_a_packaged_base_names_upstream_and_says_it_was_a_gguf(lora_run, tmp_path):
    from effine.export.push import collect_files

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name"], cfg["quant"]["method"] = "smollm2-135m-instruct", "nf4"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    files = {f.path_in_repo: f for f in collect_files(run, "adapter", "alice/q", log=lambda _: None)}
    meta, body = _card(files["README.md"].data)
    assert (meta["base_model"], meta["license"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert meta["tags"][:2] == ["effine", "qlora"] and "from a Q4_1 GGUF" in body and "stored in nf4" in body
    assert json.loads(files["adapter_config.json"].data)["base_model_name_or_path"] == meta["base_model"]


def test_full_fine_tune_pushes_its_model_dir_by_default(tiny_llama_dir, hub, tmp_path):
    from effine.train.run import run_training

    run_training(load_config(None, _overrides(tmp_path, tiny_llama_dir, "full", "adapter.method=full",
                                              "train.lr=1e-3")))
    run = tmp_path / "full"
    with pytest.raises(ConfigError, match="full fine-tuning run and has no adapter; use --what merged"):
        from effine.export.push import push_run

        push_run(run, "alice/full", "adapter")
    assert main(["push", str(run), "--repo", "alice/full"]) == 0
    files = hub.files("alice/full")
    assert files["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
    assert not (run / "merged").exists()  # nothing to merge: model/ is the trained model
    meta, _ = _card(files["README.md"])
    assert meta["library_name"] == "transformers" and "full-fine-tune" in meta["tags"]
