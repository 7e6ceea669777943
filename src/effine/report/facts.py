"""What a training run records for its report page, beyond metrics.jsonl and summary.json.

``run_training`` calls :func:`write_data_example` once the data is tokenised (before packing: a packed row mixes
documents) and :func:`run_facts` at the end; their output is what :mod:`effine.report.html` draws: the token-length
histogram, one example with the trained tokens marked, the measured vs planned memory and the run environment.
Everything here is defensive: a report detail that cannot be computed is left out, never a failed run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

DATA_EXAMPLE = "data_example.json"
HIST_BINS = 24
EXAMPLE_MAX_TOKENS = 400  # the shown example is cut after this many tokens (the page stays readable)


def length_histogram(lengths: list[int], bins: int = HIST_BINS) -> dict[str, list[int]]:
    """Counts of ``lengths`` in ``bins`` equal-width integer bins from 0 to the maximum: ``edges`` has bins + 1."""
    if not lengths:
        return {"edges": [], "counts": []}
    top = max(lengths)
    width = max(1, -(-top // bins))  # ceil: the last edge covers the longest sample
    edges = [i * width for i in range(bins + 1)]
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, n // width)] += 1
    return {"edges": edges, "counts": counts}


def _pick_example(examples: list) -> Any:
    """The first example that has both prompt and trained tokens (shows the mask best), else the first."""
    for ex in examples[:50]:
        if 0 < ex.num_trained < len(ex):
            return ex
    return examples[0] if examples else None


def write_data_example(run_dir: Path, train_set: list, tokenizer: Any) -> None:
    """``run_dir/data_example.json``: the token-length histogram of the training samples and one sample as text
    segments marked trained / special (see :func:`effine.data.inspect.label_segments`)."""
    from effine.data.example import Example
    from effine.data.inspect import label_segments

    out: dict[str, Any] = {"length_histogram": length_histogram([len(e) for e in train_set]),
                           "n_samples": len(train_set)}
    ex = _pick_example(train_set)
    if ex is not None:
        cut = Example(ex.input_ids[:EXAMPLE_MAX_TOKENS], ex.labels[:EXAMPLE_MAX_TOKENS], ex.where)
        out["example"] = {"where": ex.where, "n_tokens": len(ex), "n_trained": ex.num_trained,
                          "shown_tokens": len(cut),
                          "segments": [{"text": t, "trained": tr, "special": sp}
                                       for t, tr, sp in label_segments(cut, tokenizer)]}
    (run_dir / DATA_EXAMPLE).write_text(json.dumps(out))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def planned_memory(cfg: Any) -> dict[str, Any] | None:
    """The memory planner's prediction for this config (None if the planner is missing or fails: it is a report
    detail, never a reason to fail a finished run)."""
    try:
        try:
            from effine.plan import plan_memory  # type: ignore[attr-defined]  # where the planner may move
        except ImportError:
            from effine.train.memory import plan_memory
        device = "cuda" if str(cfg.model.device).startswith("cuda") else "cpu"
        plan = plan_memory(cfg, device=device)
        return {"total_bytes": int(plan.total), "device": plan.device, "largest": str(plan.largest),
                "components": {c: int(getattr(plan, c)) for c in plan.COMPONENTS}}
    except Exception as e:  # noqa: BLE001 - any planner failure only drops this section
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions and machine facts of this process: what a reader needs to compare two runs' speed."""
    import torch

    import effine

    env: dict[str, Any] = {"effine": effine.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        from effine.train.allocator import describe

        env["allocator"] = describe().removeprefix("allocator: ")
    except Exception as e:  # noqa: BLE001 - a report detail
        env["allocator"] = f"unknown ({type(e).__name__})"
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def run_facts(cfg: Any) -> dict[str, Any]:
    """The report's extra numbers, merged into summary.json: memory (measured and planned) and the environment."""
    import torch

    memory: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes(), "planned": planned_memory(cfg)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return {"memory": memory, "environment": environment()}
