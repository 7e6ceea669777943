"""A minimal runner for a GGUF file in real llama.cpp (its C API, through the prebuilt CPU library of the
``llama-cpp-py-sync`` package: an optional, test-only dependency; see pyproject's ``test`` extra).

Only what the verification needs: load a file, tokenize, and run a token sequence to get the next-token logits
at every position, or decode greedily. No sampling, no chat formatting: effine feeds the token ids that
transformers' tokenizer produced, so both sides see exactly the same input.

Why llama-cpp-py-sync and not llama-cpp-cffi: the only llama-cpp-cffi wheel for this platform (0.4.42) is built
against GCC 14's libstdc++ (``__cxa_call_terminate``, CXXABI_1.3.15) and fails to import on Debian 12.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PACKAGE = "llama-cpp-py-sync"


_LIB = None


def load_library():
    """(cffi ffi, the llama.cpp library): the package's own, or a glibc-compatible copy of it (llama_cpp_compat)."""
    global _LIB
    import llama_cpp_py_sync
    from llama_cpp_py_sync._cffi_bindings import get_ffi

    ffi = get_ffi()
    if _LIB is None:
        pkg_dir = Path(llama_cpp_py_sync.__file__).parent
        try:
            _LIB = ffi.dlopen(str(pkg_dir / "libllama.so"))
        except OSError as e:
            if "GLIBC_2.38" not in str(e):
                raise
            from effine.export.llama_cpp_compat import patched_library
            from effine.model.loader import cache_root

            _LIB = ffi.dlopen(str(patched_library(pkg_dir, llama_cpp_py_sync.__version__, cache_root() / "lib")))
    return ffi, _LIB


def availability() -> tuple[bool, str]:
    """(importable?, version or the reason it is not)."""
    try:
        import llama_cpp_py_sync

        load_library()
        return True, f"{PACKAGE} {llama_cpp_py_sync.__version__} (llama.cpp {llama_cpp_py_sync.__llama_cpp_tag__})"
    except Exception as e:  # ImportError, or the shared library failing to load
        return False, (f"llama.cpp is not available ({type(e).__name__}: {str(e)[:200]}); install it with "
                       f"`pip install {PACKAGE}` (or `pip install -e .[test]`)")


class LlamaCpp:
    """One GGUF model loaded in llama.cpp (CPU). Use as a context manager, or call close()."""

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None):
        self.ffi, self.lib = load_library()
        self.lib.llama_backend_init()
        self._quiet()
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), params)
        if self.model == self.ffi.NULL:
            why = "".join(getattr(self, "log_tail", [])).strip().splitlines()
            raise RuntimeError(f"llama.cpp could not load {path}: {' | '.join(why[-3:]) or 'see EFFINE_LLAMA_LOG=1'}")
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        # ggml's threads spin while waiting for each other: more threads than idle cores is far slower than one.
        self.n_threads = n_threads or max(1, min(4, len(os.sched_getaffinity(0)) // 2))
        self.ctx = self.ffi.NULL

    def _quiet(self) -> None:
        if os.environ.get("EFFINE_LLAMA_LOG"):
            return

        self.log_tail: list[str] = []

        @self.ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def _silent(level, text, user):  # noqa: ARG001 - the C signature; keep the last lines for errors
            self.log_tail = (self.log_tail + [self.ffi.string(text).decode("utf-8", "replace")])[-8:]

        self._log_cb = _silent  # keep the callback alive as long as the library may call it
        self.lib.llama_log_set(_silent, self.ffi.NULL)

    def _new_context(self) -> None:
        if self.ctx != self.ffi.NULL:
            self.lib.llama_free(self.ctx)
        p = self.lib.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = self.n_ctx
        p.n_threads = p.n_threads_batch = self.n_threads
        p.flash_attn_type = 0  # plain attention: the closest to transformers' eager/sdpa math
        self.ctx = self.lib.llama_init_from_model(self.model, p)
        if self.ctx == self.ffi.NULL:
            raise RuntimeError("llama.cpp could not create a context")

    def meta(self, key: str) -> str | None:
        buf = self.ffi.new("char[4096]")
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, 4096)
        return None if n < 0 else self.ffi.string(buf).decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = self.ffi.new(f"llama_token[{cap}]")
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return [buf[i] for i in range(n)]

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i] = t
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == len(ids) - 1) else 0
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            rows = range(len(ids)) if all_logits else [len(ids) - 1]
            out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
            for j, i in enumerate(rows):
                ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                out[j] = np.frombuffer(self.ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
            return out
        finally:
            self.lib.llama_batch_free(batch)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits after every prefix of ``ids``: (len(ids), n_vocab) float32."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        self._new_context()
        return self._decode(list(ids), 0, all_logits=True)

    def greedy(self, ids: list[int], max_new_tokens: int, stop: set[int] = frozenset()) -> list[int]:
        """Greedy continuation of ``ids`` (argmax each step), stopping after a token in ``stop``."""
        self._new_context()
        last = self._decode(list(ids), 0, all_logits=False)[0]
        out: list[int] = []
        pos = len(ids)
        while len(out) < max_new_tokens and pos < self.n_ctx:
            tok = int(np.argmax(last))
            out.append(tok)
            if tok in stop:
                break
            last = self._decode([tok], pos, all_logits=False)[0]
            pos += 1
        return out

    def close(self) -> None:
        if getattr(self, "ctx", self.ffi.NULL) != self.ffi.NULL:
            self.lib.llama_free(self.ctx)
            self.ctx = self.ffi.NULL
        if getattr(self, "model", self.ffi.NULL) != self.ffi.NULL:
            self.lib.llama_model_free(self.model)
            self.model = self.ffi.NULL

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
