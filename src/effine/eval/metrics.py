"""Task metrics for `effine eval`: per-row scores against one or more references, and bootstrap intervals.

Every metric scores one prediction against a list of acceptable references (an OpenAI-evals ``ideal`` may list
several) and takes the best match. Scores are in [0, 1] except ``loss`` (nats per reference token, lower is
better), which is scored elsewhere (:mod:`effine.eval.task`) because it needs the model, not a prediction.

* ``exact_match``: the normalised prediction equals a normalised reference.
* ``contains``: a normalised reference occurs in the normalised prediction as whole words.
* ``chrf``: chrF (character n-gram F-score, Popović 2015) from sacrebleu, divided by 100.
* ``rouge_l``: ROUGE-L F-measure (longest common subsequence of words) from Google's ``rouge-score``. Its
  tokenizer keeps only ASCII letters and digits, so it suits English text; use chrf for other scripts.

Normalisation (exact_match, contains): Unicode NFKC, lower case, every Unicode punctuation character removed,
runs of whitespace collapsed to one space, leading/trailing space stripped. Articles are *not* removed (unlike
SQuAD's normalisation): "the pantry" does not exactly match "pantry" (``contains`` accepts it).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np

from effine.errors import ConfigError

METRICS = ("exact_match", "contains", "chrf", "rouge_l", "loss")
HIGHER_IS_BETTER = {"exact_match": True, "contains": True, "chrf": True, "rouge_l": True, "loss": False}
BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, lower case, Unicode punctuation removed, whitespace collapsed and stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return _SPACES.sub(" ", text).strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    pred = normalise(prediction)
    return float(any(pred == normalise(r) for r in references))


def contains(prediction: str, references: Sequence[str]) -> float:
    # Padded with spaces so "pan" does not count as found in "pantry": whole words only.
    pred = f" {normalise(prediction)} "
    return float(any(normalise(r) and f" {normalise(r)} " in pred for r in references))


def _missing(package: str, metric: str) -> ConfigError:
    return ConfigError(f"metric {metric} needs the '{package}' package: pip install 'effine[eval]' (or "
                       f"pip install {package}); `make setup` installs it")


def chrf(prediction: str, references: Sequence[str]) -> float:
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise _missing("sacrebleu", "chrf") from None
    scorer = CHRF()
    return max(scorer.sentence_score(prediction, [r]).score for r in references) / 100.0


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise _missing("rouge-score", "rouge_l") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references)


TEXT_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match, "contains": contains, "chrf": chrf, "rouge_l": rouge_l}


def check_metric(name: str, where: str = "--metric") -> str:
    if name not in METRICS:
        raise ConfigError(f"{where}: unknown metric {name!r}; choose one of {', '.join(METRICS)}.")
    return name


def bootstrap_ci(scores: Sequence[float], weights: Sequence[float] | None = None, *, seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, list[float]]:
    """The (weighted) mean of ``scores`` and its percentile-bootstrap confidence interval.

    Rows are resampled with replacement ``resamples`` times (seeded: the same scores always give the same
    interval). ``weights`` (e.g. reference tokens per row for ``loss``) makes the statistic sum(w*s)/sum(w).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    point = float((w * s).sum() / w.sum())
    idx = np.random.default_rng(seed).integers(0, s.size, size=(resamples, s.size))
    ws = w[idx]
    stats = (ws * s[idx]).sum(axis=1) / np.maximum(ws.sum(axis=1), 1e-12)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return point, [float(lo), float(hi)]
