"""``output.export`` in the training config: exports run at the end of ``effine train``.

    output:
      export: [gguf-q8_0, merged]

Each entry runs after the run dir is complete (adapter or model saved, report written), so a failing export
never loses the run: the error is logged with the command that retries it, and the next entry still runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def retry_command(entry: str, run_dir: Path) -> str:
    if entry == "merged":
        return f"effine merge {run_dir}"
    return f"effine export gguf {run_dir} --type {entry.removeprefix('gguf-')}"


def run_exports(cfg, run_dir: Path, log: Callable[[str], Any]) -> dict[str, str]:
    """Run ``cfg.output.export`` for ``run_dir``; return entry -> output path, or "failed: ..."."""
    results: dict[str, str] = {}
    ggufs = [e for e in cfg.output.export if e.startswith("gguf-")]
    if ggufs:
        try:  # one merge for every GGUF type
            from effine.export.gguf import default_out, export_gguf, source_model_dir

            with source_model_dir(run_dir) as model_dir:
                for entry in ggufs:
                    try:
                        qtype = entry.removeprefix("gguf-")
                        rep = export_gguf(model_dir, default_out(run_dir, qtype), qtype, name=run_dir.resolve().name,
                                          log=log)
                        results[entry] = rep["gguf"]
                        log(f"export {entry}: {results[entry]}")
                    except Exception as e:
                        _failed(results, entry, e, run_dir, log)
        except Exception as e:  # the merge itself failed
            for entry in ggufs:
                _failed(results, entry, e, run_dir, log)
    for entry in cfg.output.export:
        if entry in ggufs:
            continue
        try:
            if entry == "merged":
                if cfg.adapter.method == "full" and not cfg.quant.qat_bits:
                    results[entry] = str(run_dir / "model")  # a full fine-tuning run's model/ is the merged model
                    continue
                from effine.export.merge import merge_run

                results[entry] = str(merge_run(run_dir).out_dir)
            log(f"export {entry}: {results[entry]}")
        except Exception as e:
            _failed(results, entry, e, run_dir, log)
    return results


def _failed(results: dict[str, str], entry: str, e: Exception, run_dir: Path, log) -> None:
    # The run is saved; an export failure must not hide that, and must say how to retry.
    results[entry] = f"failed: {type(e).__name__}: {e}"
    log(f"export {entry} FAILED ({type(e).__name__}: {e}); the run is intact, retry with: "
        f"{retry_command(entry, run_dir)}")
