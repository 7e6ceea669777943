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
    for entry in cfg.output.export:
        try:
            if entry == "merged":
                if cfg.adapter.method == "full" and not cfg.quant.qat_bits:
                    results[entry] = str(run_dir / "model")  # a full fine-tuning run's model/ is the merged model
                    continue
                from effine.export.merge import merge_run

                results[entry] = str(merge_run(run_dir).out_dir)
            else:
                from effine.export.gguf import export_gguf

                results[entry] = export_gguf(run_dir, qtype=entry.removeprefix("gguf-"), log=log)["gguf"]
            log(f"export {entry}: {results[entry]}")
        except Exception as e:  # the run is saved; an export failure must not hide that
            results[entry] = f"failed: {type(e).__name__}: {e}"
            log(f"export {entry} FAILED ({type(e).__name__}: {e}); the run is intact, retry with: "
                f"{retry_command(entry, run_dir)}")
    return results
