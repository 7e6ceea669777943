"""The task eval inside `effine train` (before and after training, on ``eval.data``) and behind `effine eval`.

Each phase of a run writes ``RUN_DIR/task_eval_{before,after}.jsonl`` (one record per row: where, prompt,
reference, prediction, score) and returns its :class:`~effine.eval.task.TaskResult`; ``summary.json`` gets

    "task_eval": {"metric": "exact_match", "data": "<eval.data>", "n": 200,
                  "before": {"score": 0.12, "ci": [0.08, 0.17]}, "after": {"score": 0.41, "ci": [0.34, 0.48]},
                  "rows_before": "task_eval_before.jsonl", "rows_after": "task_eval_after.jsonl"}

(absent when ``eval.data`` is unset). A resumed run reads its "before" back from the rows file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from effine.eval.metrics import HIGHER_IS_BETTER
from effine.eval.task import TaskResult, evaluate_task, read_task_rows, result_from_rows


def rows_file(phase: str) -> str:
    return f"task_eval_{phase}.jsonl"


def task_eval_phase(cfg, model, tokenizer, run_dir: Path, phase: str, log: Callable[[str], Any],
                    reuse: bool = False) -> TaskResult | None:
    """Run (or, with ``reuse``, read back) the task eval of one phase; None when ``eval.data`` is unset."""
    if not cfg.eval.data:
        return None
    path = Path(run_dir) / rows_file(phase)
    if reuse:
        if not path.is_file():
            log(f"task eval {phase}: {path.name} is missing (run started without eval.data?): no {phase} score")
            return None
        result = result_from_rows(path, cfg.eval.metric)
        log(f"task eval {phase} (from {path.name}): {result.line()}")
        return result
    t0 = time.perf_counter()
    rows = read_task_rows(cfg.eval.data, cfg.eval.task_limit, cfg.model.cache_dir)
    log(f"task eval {phase}: {len(rows)} rows of {cfg.eval.data}, metric {cfg.eval.metric} ...")
    # The tokenizer already carries the chat template the training data was rendered with (run.py sets it).
    result = evaluate_task(model, tokenizer, rows, cfg.eval.metric, max_new_tokens=cfg.eval.max_new_tokens,
                           batch_size=cfg.eval.batch_size or cfg.train.batch_size,
                           system_prompt=cfg.data.system_prompt)
    result.write_rows(path)
    log(f"task eval {phase}: {result.line()} [{time.perf_counter() - t0:.0f}s; rows in {path.name}]")
    return result


def task_eval_summary(cfg, before: TaskResult | None, after: TaskResult | None) -> dict[str, Any] | None:
    """The ``task_eval`` entry of summary.json (None when there was no task eval)."""
    if after is None and before is None:
        return None
    entry: dict[str, Any] = {"metric": cfg.eval.metric, "data": cfg.eval.data, "n": (after or before).n}
    for phase, res in (("before", before), ("after", after)):
        entry[phase] = None if res is None else {"score": res.score, "ci": res.ci}
    for phase, res in (("before", before), ("after", after)):
        entry[f"rows_{phase}"] = None if res is None else rows_file(phase)
    return entry


def report_lines(task: dict[str, Any] | None) -> list[str]:
    """The report.md table row of a summary's ``task_eval`` entry (none without one)."""
    if not task:
        return []

    def cell(p: dict | None) -> str:
        return "-" if p is None else f"{p['score']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]"

    better = "higher" if HIGHER_IS_BETTER.get(task["metric"], True) else "lower"
    return [f"| task {task['metric']} on {task['data']} (n={task['n']}, 95% CI; {better} is better) | "
            f"{cell(task['before'])} | {cell(task['after'])} |"]


def run_config_for(spec: str | Path, adapter_dir: Path | None):
    """The config of the run that ``spec`` (a run dir, its adapter/ or model/ dir) comes from, else None."""
    from effine.config import load_config

    spec = Path(spec)
    candidates = [spec, adapter_dir.parent if adapter_dir is not None and adapter_dir.name == "adapter" else None,
                  spec.parent if spec.name == "model" else None]
    for d in candidates:
        if d is not None and (d / "config.yaml").is_file():
            return load_config(d / "config.yaml")
    return None


def evaluate_target(spec: str, data: str, metric: str = "exact_match", *, limit: int | None = None,
                    batch_size: int = 16, max_new_tokens: int = 48, out: str | None = None, dtype: str = "fp32",
                    as_trained: bool = True, seed: int = 0, log: Callable[[str], Any] | None = None
                    ) -> tuple[TaskResult, Path]:
    """`effine eval`: load a model / run dir / adapter dir, score it on ``data``, write the rows file (default:
    ``RUN_DIR/eval-METRIC.jsonl`` for a run dir, else ``./eval-METRIC.jsonl``)."""
    from effine.eval.generate import load_for_generation
    from effine.eval.metrics import check_metric

    check_metric(metric)
    loaded = load_for_generation(spec, dtype, as_trained=as_trained, log=log)
    cfg = run_config_for(spec, loaded.adapter_dir)  # the run's system prompt and model cache
    rows = read_task_rows(data, limit, cfg.model.cache_dir if cfg else None)
    result = evaluate_task(loaded.model, loaded.tokenizer, rows, metric, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, system_prompt=cfg.data.system_prompt if cfg else None,
                           seed=seed)
    if out is None:
        out = str((Path(spec) if Path(spec, "config.yaml").is_file() else Path.cwd()) / f"eval-{metric}.jsonl")
    return result, result.write_rows(out)
