"""Attention behind one interface: an fp32 eager reference, PyTorch SDPA, and the flash-attn package.

Flash Attention (the algorithm)
-------------------------------
Standard attention for one head, with Q, K, V (N, d):

    S = Q K^T * scale          (N, N)   written to HBM
    P = softmax(S)             (N, N)   written to HBM (and kept for backward)
    O = P V                    (N, d)

so memory traffic and activation memory are O(N^2). Flash attention tiles Q into row blocks Q_i and K, V into
column blocks K_j, V_j small enough to live in on-chip SRAM, and computes the softmax *online*: for each Q_i it
keeps a running row max m, a running row sum l and an unnormalised output A, and for every K_j, V_j:

    S_ij  = Q_i K_j^T * scale
    m'    = max(m, rowmax(S_ij))
    P_ij  = exp(S_ij - m')
    l     = l * exp(m - m') + rowsum(P_ij)
    A     = A * exp(m - m') + P_ij V_j        (rescale the partial output to the new max)
    m     = m'

and finally O_i = A / l. S and P are never written out; only O and the softmax normaliser L = m + log(l)
(logsumexp, N values per head) are stored, and backward recomputes S_ij and P_ij block by block from Q, K, V and
L. Activation memory is O(N * d) instead of O(N^2). With a causal mask, blocks strictly above the diagonal are
skipped entirely, halving the work. :func:`flash_attention_reference` implements the forward literally in PyTorch
(for teaching and parity tests, not speed).

Who implements it in PyTorch: ``torch.nn.functional.scaled_dot_product_attention`` dispatches, on CPU, to a tiled
online-softmax kernel (``_scaled_dot_product_flash_attention_for_cpu``, fp32/bf16/fp16, optional mask, saves the
logsumexp and recomputes in backward) and, on CUDA, to FlashAttention-2 (fp16/bf16, no arbitrary mask),
the memory-efficient kernel (masks, fp32) or cuDNN. The ``flash-attn`` package (FA2 / FA3, CUDA only) adds
variable-length batches (``flash_attn_varlen_func``), sliding windows and logit soft-capping.

Backends here
-------------
``eager``      fp32 softmax(QK^T * scale + mask) V with an explicit (T, T) mask: the reference, O(T^2) memory.
``sdpa``       SDPA; a plain causal batch uses ``is_causal=True`` (no mask tensor, so the CPU kernel skips the upper
               triangle); packed rows run SDPA with ``is_causal=True`` once per bucket of similar-length documents.
``flash_attn`` flash-attn 2/3 when importable (CUDA, fp16/bf16); packed rows use ``flash_attn_varlen_func``.
``tiled``      the same algorithm with the tile loop in Python and each tile product one batched matmul
               (:mod:`effine.ops.tiled_attention`): faster than SDPA's CPU kernel at training shapes;
               the CPU default for causal calls without a mask, softcap or dropout (others go to SDPA / eager);
               packed rows run it once per bucket of similar-length documents.

Packed rows: several documents concatenated in one row. transformers v5 passes ``position_ids`` down to the
attention function (decoder layer -> attention module -> ``attention_interface(..., **kwargs)``); documents start
where the position does not continue (``pos[t] != pos[t-1] + 1``), the same rule transformers uses for its own
packed-sequence masks. Attention never crosses a document boundary on any backend.

Files: the document-boundary helpers live in :mod:`effine.ops.attention_packing`, the eager and flash references
in :mod:`effine.ops.attention_reference`, the tiled CPU kernel in :mod:`effine.ops.tiled_attention`; this module
holds the backend choice, the dispatch and the transformers integration (all public names are importable here).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from effine.ops.attention_packing import (_check_cu_seqlens, _doc_starts, _starts_to_cu,  # noqa: F401
                                          cu_seqlens_from_position_ids, doc_buckets)
from effine.ops.attention_reference import (_combine, _repeat_kv, _structural_mask, eager_attention,
                                            flash_attention_reference)
from effine.ops.tiled_attention import supports, tiled_attention

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "attention",
    "attention_backend",
    "cu_seqlens_from_position_ids",
    "eager_attention",
    "effine_attention_forward",
    "effine_attention_mask",
    "enable",
    "flash_attention_reference",
    "flash_attn_available",
    "keeps_documents_apart",
    "register",
    "select_backend",
    "set_backend",
]

BACKENDS = ("eager", "sdpa", "flash_attn", "tiled")
ENV_VAR = "EFFINE_ATTN"
NAME = "effine"  # the name registered with transformers' AttentionInterface

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("effine_attn_backend", default=None)
_DEFAULT: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# flash-attn (optional)


def _flash_attn_module():
    """(func, varlen_func, version) from flash-attn 2 or 3, or None when neither is installed."""
    try:
        import flash_attn_interface as fa3  # FA3 (Hopper) installs this top-level module

        return fa3.flash_attn_func, fa3.flash_attn_varlen_func, 3
    except Exception:
        pass
    try:
        import flash_attn as fa2

        return fa2.flash_attn_func, fa2.flash_attn_varlen_func, 2
    except Exception:
        return None


def flash_attn_available() -> bool:
    """True when a flash-attn package is importable and CUDA is available."""
    return torch.cuda.is_available() and _flash_attn_module() is not None


# ---------------------------------------------------------------------------------------------------------------------
# Backend selection


def default_backend() -> str | None:
    """The process-wide default set by :func:`set_backend` (None: automatic)."""
    return _DEFAULT


def set_backend(name: str | None) -> None:
    """Process-wide default backend (``None`` = automatic). Below :func:`attention_backend` and arguments."""
    global _DEFAULT
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    _DEFAULT = name


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside the block (tests use this to exercise each path)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def select_backend(
    device: torch.device | str,
    packed: bool = False,
    override: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    softcap: float | None = None,
    has_mask: bool = False,
    head_dim: int | None = None,
) -> str:
    """Choose a backend: ``override`` > :func:`attention_backend` > :func:`set_backend` > env ``EFFINE_ATTN`` > auto.

    Auto: flash-attn on CUDA for fp16/bf16 without an explicit mask (it handles packed rows with varlen, sliding
    window and softcap); on CPU ``tiled`` (:func:`attention` sends the calls it cannot serve exactly to SDPA);
    otherwise SDPA, except with logit softcapping, which SDPA cannot do, where eager is used.
    ``packed`` does not change the choice on CPU (SDPA runs per document bucket), it is accepted so callers state it.
    A forced backend is returned as is; :func:`attention` raises if it cannot serve the request.
    """
    name = override or _FORCED.get() or _DEFAULT or os.environ.get(ENV_VAR) or "auto"
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r} (from argument or ${ENV_VAR}); expected {BACKENDS}")
        return name
    device = torch.device(device)
    fa_ok = (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and not has_mask
        and (head_dim is None or head_dim <= 256)
        and _flash_attn_module() is not None
    )
    if fa_ok:
        return "flash_attn"
    if softcap is not None:
        return "eager"
    return "tiled" if device.type == "cpu" and not has_mask else "sdpa"


# ---------------------------------------------------------------------------------------------------------------------
# SDPA and flash-attn backends


def _sdpa_dense(q, k, v, *, scale, causal, sliding_window, keep, bias, dropout) -> torch.Tensor:
    """One SDPA call on (B, Hq, Tq, D) / (B, Hkv, Tk, D); ``keep`` / ``bias`` are extra masks (or None)."""
    Tq, Tk = q.shape[2], k.shape[2]
    needs_window = sliding_window is not None and (Tk > sliding_window or not causal)
    if keep is None and bias is None and not needs_window:
        if not causal:
            return _sdpa_call(q, k, v, None, False, scale, dropout)
        if Tq == Tk:
            return _sdpa_call(q, k, v, None, True, scale, dropout)  # no mask tensor: the kernel skips the triangle
    structural = _structural_mask(1, Tq, Tk, causal, sliding_window, None, q.device)
    keep = structural if keep is None else (keep if structural is None else keep & structural)
    attn_mask, dead_rows = None, None
    if keep is not None:
        # Rows with no visible key give NaN in some kernels: let them see everything, then zero their output.
        dead_rows = ~keep.any(dim=-1, keepdim=True)  # (B|1, 1, Tq, 1)
        keep = keep | dead_rows
        attn_mask = keep
    if bias is not None:
        attn_mask = bias if attn_mask is None else torch.where(attn_mask, bias, torch.finfo(bias.dtype).min)
        attn_mask = attn_mask.to(q.dtype)
    out = _sdpa_call(q, k, v, attn_mask, False, scale, dropout)
    return out if dead_rows is None else out.masked_fill(dead_rows, 0.0)


def _sdpa_call(q, k, v, attn_mask, is_causal, scale, dropout):
    """SDPA with grouped-query attention: enable_gqa where the kernel takes it, else repeat the kv heads."""
    n_rep = q.shape[1] // k.shape[1]
    kw = {}
    if n_rep > 1:
        if q.device.type == "cpu" or attn_mask is None:
            kw["enable_gqa"] = True  # CPU flash kernel handles it with masks; CUDA fast kernels need mask=None
        else:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scale, **kw
    )


def _tiled_dense(q, k, v, *, scale, causal, sliding_window, keep, bias, dropout) -> torch.Tensor:
    """:func:`effine.ops.tiled_attention.tiled_attention` where it applies exactly, else :func:`_sdpa_dense`."""
    if keep is None and bias is None and supports(q, k, causal=causal, softcap=None, mask=None, dropout=dropout):
        return tiled_attention(q, k, v, scale=scale, sliding_window=sliding_window)
    return _sdpa_dense(q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, keep=keep, bias=bias,
                       dropout=dropout)


def _sdpa_attention(q, k, v, *, scale, causal, sliding_window, cu_seqlens, mask, dropout,
                    dense=_sdpa_dense) -> torch.Tensor:
    """SDPA (or, with ``dense=_tiled_dense``, the tiled kernel) on dense or packed rows."""
    keep, bias = _combine(None, mask)
    if cu_seqlens is None:
        return dense(
            q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, keep=keep, bias=bias, dropout=dropout
        )
    if mask is not None:
        # An explicit mask on top of documents: one masked call with the block-diagonal mask (correct, O(T^2)).
        B, _, T, _ = q.shape
        docs = _structural_mask(B, T, T, False, None, cu_seqlens, q.device)
        keep = docs if keep is None else keep & docs
        return _sdpa_dense(
            q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, keep=keep, bias=bias, dropout=dropout
        )
    # Documents grouped by length (attention_packing.DocBuckets): one causal call per bucket of similar-length
    # documents, each padded to the bucket's longest, instead of one call per document. No (T, T) mask, the causal
    # saving is kept inside every document, and a row of 80 short documents costs a few batched calls, not 80
    # (whose slice gradients would each allocate the whole (B, H, T, D) tensor).
    B, Hq, T, D = q.shape
    plan = doc_buckets(cu_seqlens, T)  # a document that crosses a row end is an error

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B*T, H, D); free for transformers' layout
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

    qf, kf, vf = tokens(q), tokens(k), tokens(v)
    outs = []
    for n, W, gather in plan.buckets:
        def pick(xf: torch.Tensor) -> torch.Tensor:  # (n, H, W, D)
            return xf.index_select(0, gather).view(n, W, xf.shape[1], D).transpose(1, 2)

        o = dense(pick(qf), pick(kf), pick(vf), scale=scale, causal=causal, sliding_window=sliding_window, keep=None,
                  bias=None, dropout=dropout)  # (n, Hq, W, D)
        outs.append(o.transpose(1, 2).reshape(n * W, Hq, D))
    out = torch.cat(outs).index_select(0, plan.scatter)  # (B*T, Hq, D), every token back in place
    return out.view(B, T, Hq, D).transpose(1, 2)  # (B, Hq, T, D)


def _flash_attn_attention(q, k, v, *, scale, causal, sliding_window, softcap, cu_seqlens, dropout) -> torch.Tensor:
    fa = _flash_attn_module()
    if fa is None or q.device.type != "cuda":
        raise RuntimeError("the flash_attn backend needs the flash-attn package and a CUDA device")
    func, varlen_func, version = fa
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attn needs fp16/bf16 inputs, got {q.dtype}")
    B, Hq, T, D = q.shape
    # flash-attn window (left, right) counts keys on each side; transformers' w means q - k < w, i.e. left = w - 1.
    window = (-1, -1)
    if sliding_window is not None:
        window = (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1)
    kw = dict(softmax_scale=scale, causal=causal, window_size=window, softcap=softcap or 0.0)
    if version == 2:
        kw["dropout_p"] = dropout
    elif dropout > 0.0:
        raise ValueError("flash-attn 3 has no attention dropout")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D) as flash-attn wants
    if cu_seqlens is None:
        out = func(qt, kt, vt, **kw)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        out = varlen_func(
            qt.reshape(B * T, Hq, D), kt.reshape(B * T, -1, D), vt.reshape(B * T, -1, D),
            cu, cu, max_len, max_len, **kw,
        )  # fmt: skip
    if isinstance(out, tuple):  # some FA3 versions also return the logsumexp
        out = out[0]
    return out.reshape(B, T, Hq, D).transpose(1, 2)  # (B, Hq, T, D)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head attention, q (B, Hq, Tq, D), k / v (B, Hkv, Tk, D) with Hq % Hkv == 0 (GQA). -> (B, Hq, Tq, D).

    ``causal``: query i (at absolute position Tk - Tq + i) sees keys <= its position. ``sliding_window`` w: only
    keys with q - k < w. ``softcap`` c: scores become c * tanh(s / c). ``cu_seqlens``: document offsets over the
    flattened B*T tokens (Tq == Tk); no token attends across a boundary. ``mask``: extra bool keep-mask (True =
    attend) or float additive bias, broadcastable to (B, Hq, Tq, Tk), ANDed with the above. ``backend``: see
    :func:`select_backend`. flash_attn cannot take an explicit mask; such calls go to SDPA (eager with softcap).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} kv heads")
    if cu_seqlens is not None:
        cu_seqlens = _check_cu_seqlens(torch.as_tensor(cu_seqlens))
        if int(cu_seqlens[-1]) != q.shape[0] * q.shape[2]:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, expected B*T = {q.shape[0] * q.shape[2]}")
    name = select_backend(
        q.device, cu_seqlens is not None, backend,
        dtype=q.dtype, softcap=softcap, has_mask=mask is not None, head_dim=q.shape[-1],
    )  # fmt: skip
    if name == "flash_attn" and mask is not None:
        name = "eager" if softcap is not None else "sdpa"
    if name == "flash_attn":
        return _flash_attn_attention(
            q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
            cu_seqlens=cu_seqlens, dropout=dropout,
        )  # fmt: skip
    if name in ("sdpa", "tiled"):
        if softcap is not None:
            raise ValueError(f"the {name} backend cannot apply attention logit softcapping; use eager or flash_attn")
        return _sdpa_attention(
            q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, cu_seqlens=cu_seqlens,
            mask=mask, dropout=dropout, dense=_tiled_dense if name == "tiled" else _sdpa_dense,
        )  # fmt: skip
    return eager_attention(
        q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
        cu_seqlens=cu_seqlens, mask=mask, dropout=dropout,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# transformers integration


_LAYOUT_ATTR = "_effine_layout"  # on the position_ids (or padding) tensor of a forward: the layout derived from it


def _cached_layout(position_ids: torch.Tensor | None, padding: torch.Tensor | None, compute):
    """The layout of this forward, derived once: every layer gets the same position_ids / padding tensors, so the
    derivation (and, on CUDA, its host sync) runs once per forward instead of once per layer. Kept on the tensor
    itself (it dies with it), checked against the tensors' in-place version counters."""
    owner = position_ids if position_ids is not None else padding
    other = padding if owner is position_ids else None
    if owner is None:
        return compute()
    try:
        key = (owner._version, None if other is None else other._version)
    except RuntimeError:  # inference-mode tensors have no version counter: do not cache
        return compute()
    hit = getattr(owner, _LAYOUT_ATTR, None)
    if hit is not None and hit[0] == key and (hit[1]() if hit[1] is not None else None) is other:
        return hit[2]
    value = compute()
    setattr(owner, _LAYOUT_ATTR, (key, weakref.ref(other) if other is not None else None, value))
    return value




def _layout(batch: int, length: int, position_ids, padding) -> tuple[torch.Tensor | None, bool]:
    """(cu_seqlens or None, padding_handled) for a training-style forward (Tq == Tk).

    Padding (B, T) bool (True = real token): when each row's real tokens form one contiguous run, the padding runs
    become documents of their own (real tokens never see them; their own outputs are junk but finite and
    unlabelled), so padding costs no (T, T) mask. Otherwise padding_handled is False and the caller builds a mask.
    """
    by_shape = _cached_layout(position_ids, padding, dict)  # (batch, length) -> layout, for this forward's tensors
    if (batch, length) not in by_shape:
        by_shape[(batch, length)] = _derive_layout(batch, length, position_ids, padding)
    return by_shape[(batch, length)]


def _derive_layout(batch: int, length: int, position_ids, padding) -> tuple[torch.Tensor | None, bool]:
    starts = None
    if position_ids is not None:
        pos = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
        starts = _doc_starts(pos.expand(batch, -1) if pos.shape[0] != batch else pos)
    handled = True
    if padding is not None:
        real = padding.to(torch.bool)
        if starts is not None:
            starts = starts.to(real.device)
        edges = torch.ones_like(real)
        edges[:, 1:] = real[:, 1:] != real[:, :-1]  # a run of real or of padding tokens starts here
        runs_of_real = (edges & real).sum(dim=1)
        if bool((runs_of_real > 1).any()):
            handled = False  # real tokens with gaps between them: the caller masks padded keys explicitly
        else:
            # inside real tokens keep document starts; padding runs are single documents
            starts = edges if starts is None else (starts & real) | edges
    if starts is None or (not bool(starts[:, 1:].any())):
        return None, handled
    return _starts_to_cu(starts), handled


def effine_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function: q (B, Hq, Tq, D), k / v (B, Hkv, Tk, D) -> (B, Tq, Hq, D).

    ``attention_mask`` is what :func:`effine_attention_mask` built: None, a (B, Tk) padding mask, or a 4D mask
    (a custom pattern, or one the caller passed in). Documents come from ``kwargs["position_ids"]``.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("effine attention does not implement attention sinks (s_aux)")
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    cu, mask = None, None
    if attention_mask is not None and attention_mask.dim() == 4:
        # A ready-made mask already holds causality, windows and documents derived from position_ids.
        mask, causal, sliding_window = attention_mask, False, None
    elif Tq == Tk and Tq > 1:
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        cu, handled = _layout(B, Tq, kwargs.get("position_ids"), padding)
        if not handled:
            mask = padding[:, None, None, :].to(torch.bool)  # (B, 1, 1, T): real keys only
    elif attention_mask is not None:
        mask = attention_mask[:, None, None, -Tk:].to(torch.bool)  # decoding with padding: (B, 1, 1, Tk)
    out = attention(
        query, key, value, scale=scaling, causal=causal, sliding_window=sliding_window, softcap=softcap,
        cu_seqlens=cu, mask=mask, dropout=dropout,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def effine_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    **kwargs,
):
    """transformers ``AttentionMaskInterface`` function for ``"effine"``: no (T, T) mask for standard patterns.

    Causal, sliding-window and packed-document structure is applied by the attention function itself, so this
    returns only the (B, kv_length) padding mask, or None when nothing is padded. Custom mask patterns
    (``or_mask_function`` / ``and_mask_function``, signalled by ``use_vmap``) are materialised with transformers'
    own sdpa mask builder and arrive as a 4D mask.
    """
    if use_vmap:
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, use_vmap=use_vmap, **kwargs,
        )  # fmt: skip
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register(name: str = NAME) -> str:
    """Register the attention and mask functions with transformers under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, effine_attention_forward)
    AttentionMaskInterface.register(name, effine_attention_mask)
    return name


def keeps_documents_apart(model) -> bool:
    """Whether ``model``'s attention keeps the documents of a packed row apart: True when it runs through effine's
    attention function (every backend derives the documents from position_ids); False for a model that keeps its
    own attention (e.g. Falcon, which does not dispatch through transformers' AttentionInterface)."""
    model = getattr(model, "module", model)  # DDP
    cfg = getattr(model, "config", None)
    return bool(getattr(model, "_supports_attention_backend", False)) and \
        getattr(cfg, "_attn_implementation", None) == NAME


def enable(model, backend: str | None = None) -> str:
    """Switch a loaded transformers model to effine attention and return the backend it will use.

    Equivalent to ``register(); model.set_attn_implementation("effine")``. ``backend`` ("auto"/None, "eager",
    "sdpa", "flash_attn") becomes the process-wide default (:func:`set_backend`); the returned name is what
    :func:`select_backend` picks for the model's device, dtype and attention softcap (packed rows included).
    """
    register()
    set_backend(None if backend in (None, "auto") else backend)
    if not getattr(model, "_supports_attention_backend", False):
        # e.g. Falcon: its attention does not go through AttentionInterface, so set_attn_implementation would
        # only log and the model would keep its own attention. Say so instead of claiming an effine backend.
        current = getattr(model.config, "_attn_implementation", None) or "eager"
        logging.getLogger(__name__).warning(
            "attention: %s does not dispatch through transformers' AttentionInterface; it keeps its own %r "
            "attention (effine's backend is not used)", type(model).__name__, current)
        return f"{current} (model's own)"
    model.set_attn_implementation(NAME)
    p = next(model.parameters(), None)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return select_backend(
        p.device if p is not None else "cpu",
        dtype=p.dtype if p is not None else None,
        softcap=getattr(cfg, "attn_logit_softcapping", None),
        head_dim=getattr(cfg, "head_dim", None),
    )
