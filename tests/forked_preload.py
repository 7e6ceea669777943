"""Imported once by the forkserver of :mod:`tests.forked`: effine and the lazily imported parts of transformers a
tiny training run touches, so that no forked child pays for them. Imports only: no tensor op, no thread pool."""

import effine.adapters  # noqa: F401
import effine.cli  # noqa: F401
import effine.eval.generate  # noqa: F401
import effine.ops.attention  # noqa: F401
import effine.ops.swap  # noqa: F401
import effine.train.loop  # noqa: F401
import effine.train.run  # noqa: F401
import matplotlib.pyplot  # noqa: F401
import transformers

for name in ("AutoTokenizer", "AutoModelForCausalLM", "LlamaForCausalLM", "LlamaConfig", "PreTrainedTokenizerFast",
             "GPT2TokenizerFast", "GenerationMixin"):
    getattr(transformers, name)
