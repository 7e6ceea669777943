"""``effine export gguf``: a run dir or model dir -> one GGUF file for llama.cpp / Ollama / LM Studio.

    effine export gguf runs/smollm2-135m-instruct-lora --type q8_0
      1. a run dir is merged first (effine.export.merge.merge_run: adapter into the base it trained on, a QLoRA
         base dequantized, fp32; nothing requantized) into a temporary model dir
      2. weights renamed and transformed to llama.cpp's conventions (effine.export.gguf_arch), stored as
         f32 / f16 / bf16, or q8_0 / q4_0 blocks (effine.export.gguf_quant); 1-D tensors (norms, biases) stay
         f32, a matrix whose rows are not a multiple of 32 long is stored f16 under q8_0 / q4_0, and under q4_0
         the embedding and output matrices are q8_0
      3. tokenizer and chat template embedded (effine.export.gguf_vocab), written with the ``gguf`` package
      4. an Ollama Modelfile beside the file (effine.export.ollama)
      5. if llama.cpp is importable: the file is loaded in llama.cpp and compared with the source model in
         transformers (effine.export.gguf_verify); the report is written beside the file as <name>.verify.json

Default output: RUN_DIR/gguf/<run name>-<type>.gguf (MODEL_DIR/gguf/<dir name>-<type>.gguf for a model dir).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from effine.errors import ConfigError
from effine.export.gguf_arch import arch_info, gguf_tensors
from effine.export.gguf_quant import BLOCK, quantize_blocks
from effine.export.gguf_vocab import add_tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_Q = gguf.GGMLQuantizationType


def default_out(source: Path, qtype: str) -> Path:
    return source / "gguf" / f"{source.resolve().name}-{qtype}.gguf"


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "adapter").is_dir() or (path / "model").is_dir())


@contextmanager
def source_model_dir(source: Path) -> Iterator[Path]:
    """The transformers model dir to export: a model dir as is; a run dir merged into a temporary fp32 dir."""
    if (source / "config.json").is_file():
        yield source
        return
    if not _is_run_dir(source):
        raise ConfigError(f"export gguf: {source} is neither a run dir (config.yaml + adapter/ or model/) nor a "
                          "transformers model dir (config.json).")
    from effine.config import load_config

    cfg = load_config(source / "config.yaml")
    if cfg.adapter.method == "full" and not cfg.quant.qat_bits:
        yield source / "model"  # already the trained model; nothing to merge
        return
    from effine.export.merge import merge_run

    with tempfile.TemporaryDirectory(prefix="effine-gguf-merge-") as tmp:
        merge_run(source, Path(tmp) / "merged", dtype="fp32", verify_reload=False, compare_original_base=False,
                  fp32_floor=False)
        yield Path(tmp) / "merged"


def _tensor_data(name: str, t: torch.Tensor, qtype: str) -> tuple[np.ndarray, Any, str]:
    """(numpy data, raw GGML type or None, type written) for one tensor."""
    t = t.detach()
    if t.dim() == 1 or qtype == "f32":
        return t.to(torch.float32).numpy(), None, "f32"
    if qtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
        qtype = "q8_0"  # as llama.cpp's own Q4_0 mix keeps the output matrix finer: every logit goes through it
    if qtype in ("q8_0", "q4_0") and t.shape[-1] % BLOCK == 0:
        return quantize_blocks(t, qtype), _Q.Q8_0 if qtype == "q8_0" else _Q.Q4_0, qtype
    if qtype == "bf16":
        raw = t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()  # (rows, 2 * cols) bytes
        return raw, _Q.BF16, "bf16"
    return t.to(torch.float16).numpy(), None, "f16"  # f16, or a q8_0/q4_0 matrix whose rows do not split in 32s


def write_gguf(model_dir: Path, out: Path, qtype: str, name: str | None = None) -> dict[str, Any]:
    """Write ``model_dir`` (a transformers causal LM) as GGUF; return what was written (for the report)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from effine.model.loader import load_tokenizer

    if qtype not in GGUF_TYPES:
        raise ConfigError(f"export gguf: --type {qtype!r} is not one of {', '.join(GGUF_TYPES)}.")
    config = AutoConfig.from_pretrained(model_dir)
    info = arch_info(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or (
        model.get_output_embeddings() is not None
        and model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), info.arch)
    w.add_name(name or model_dir.resolve().name)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in info.kv.items():
        full = f"{info.arch}.{key}"
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        else:
            w.add_float32(full, float(value))
    vocab = add_tokenizer(w, model_dir, tokenizer, int(model.config.vocab_size))
    counts: dict[str, int] = {}
    for gname, t in gguf_tensors(model.state_dict(), info, tied):
        data, raw, written = _tensor_data(gname, t, qtype)
        w.add_tensor(gname, data, raw_dtype=raw)
        counts[written] = counts.get(written, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)  # a crash mid-write never leaves a truncated file under the final name
    return {"arch": info.arch, "type": qtype, "tensor_types": counts, "tied_embeddings": tied, "tokenizer": vocab,
            "bytes": out.stat().st_size}


def export_gguf(source: str | Path, out: str | Path | None = None, qtype: str = "q8_0", *, verify: bool = True,
                modelfile: bool = True, prompts: list[str] | None = None, name: str | None = None,
                log=print) -> dict[str, Any]:
    """Export a run dir or model dir to GGUF, write a Modelfile and (if llama.cpp is importable) verify it.

    Returns the report (also written as ``<out>.verify.json`` when verified). ``verify=False`` skips llama.cpp.
    """
    source = Path(source)
    if not source.exists():
        raise ConfigError(f"export gguf: {source} does not exist.")
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"export gguf: --type {qtype!r} is not one of {', '.join(GGUF_TYPES)}.")
    out = Path(out) if out is not None else default_out(source, qtype)
    if out.suffix != ".gguf":
        raise ConfigError(f"export gguf: --out {out} should end in .gguf.")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"source": str(source), "gguf": str(out)}
    with source_model_dir(source) as model_dir:
        report["written"] = write_gguf(model_dir, out, qtype, name=name or source.resolve().name)
        log(f"[effine] wrote {out} ({report['written']['bytes'] / 2**20:.1f} MiB, {qtype}, "
            f"arch {report['written']['arch']})")
        if modelfile:
            from effine.export.ollama import write_modelfile

            report["modelfile"] = str(write_modelfile(out, model_dir))
            log(f"[effine] wrote {report['modelfile']} (ollama create NAME -f {report['modelfile']})")
        if verify:
            from effine.export.llama_cpp import availability

            ok, why = availability()
            if ok:
                from effine.export.gguf_verify import describe, verify_gguf

                report["verification"] = verify_gguf(out, model_dir, qtype, prompts=prompts)
                report["verification"]["llama_cpp"] = why
                log(f"[effine] {describe(report['verification'])}")
            else:
                report["verification"] = {"skipped": why}
                log(f"[effine] NOT verified in llama.cpp: {why}")
        else:
            report["verification"] = {"skipped": "--no-verify"}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if "skipped" not in report["verification"]:
        path = out.with_suffix(".verify.json")
        path.write_text(json.dumps(report, indent=2) + "\n")
        report["report"] = str(path)
    return report

