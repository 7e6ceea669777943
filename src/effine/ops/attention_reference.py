"""The reference attention: an fp32 eager softmax(QK^T * scale + mask) V with explicit masks, and a literal
PyTorch transcription of the flash-attention forward (tiles, online softmax) for teaching and parity tests.

Both are slow on purpose: every fast backend in :mod:`effine.ops.attention` is tested against them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effine.ops.attention_packing import _doc_ids

def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D); query head h uses kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


def _structural_mask(
    batch: int,
    q_len: int,
    k_len: int,
    causal: bool,
    sliding_window: int | None,
    cu_seqlens: torch.Tensor | None,
    device,
) -> torch.Tensor | None:
    """Bool keep-mask (1 or B, 1, Tq, Tk) for causal / sliding window / documents, or None if nothing is masked.

    Queries are aligned to the *end* of the keys (query i sits at absolute position Tk - Tq + i), as with a KV cache.
    Sliding window w (transformers' convention): key k is visible from query q iff q - k < w.
    """
    qpos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)  # (Tq, 1)
    kpos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    keep = None
    if causal:
        keep = kpos <= qpos
    if sliding_window is not None:
        win = (qpos - kpos < sliding_window) if causal else ((qpos - kpos).abs() < sliding_window)
        keep = win if keep is None else keep & win
    keep = None if keep is None else keep[None, None]  # (1, 1, Tq, Tk)
    if cu_seqlens is not None:
        if q_len != k_len:
            raise ValueError("packed documents need as many queries as keys (no KV cache)")
        doc = _doc_ids(cu_seqlens, batch, q_len, device)  # (B, T)
        same = (doc[:, :, None] == doc[:, None, :])[:, None]  # (B, 1, T, T)
        keep = same if keep is None else keep & same
    return keep


def _combine(keep: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Merge a structural bool mask with a user mask -> (bool keep or None, float additive bias or None)."""
    if mask is None:
        return keep, None
    if mask.dtype == torch.bool:
        return (mask if keep is None else keep & mask), None
    return keep, mask  # float: additive bias (0 / large negative), applied on top of `keep`


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Reference: O = softmax(cap(Q K^T * scale) + mask) V, all in fp32. (B, Hq, Tq, D) in q.dtype.

    Rows whose every key is masked output 0 (they are padding; a finite value keeps backward free of NaN).
    """
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    n_rep = Hq // k.shape[1]
    kf, vf = _repeat_kv(k.float(), n_rep), _repeat_kv(v.float(), n_rep)  # (B, Hq, Tk, D)
    s = (q.float() @ kf.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    keep, bias = _combine(_structural_mask(B, Tq, Tk, causal, sliding_window, cu_seqlens, q.device), mask)
    if bias is not None:
        s = s + bias.float()
    if keep is not None:
        s = s.masked_fill(~keep, torch.finfo(torch.float32).min)  # finite: fully masked rows stay NaN-free
    p = torch.softmax(s, dim=-1)
    if dropout > 0.0:
        p = F.dropout(p, p=dropout)
    out = p @ vf  # (B, Hq, Tq, D)
    if keep is not None:
        out = out * keep.any(dim=-1, keepdim=True)  # fully masked rows -> 0
    return out.to(q.dtype)


def flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    block_size: int = 64,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled online-softmax attention forward, the flash-attention recurrence written out in PyTorch (fp32).

    q (B, H, Tq, D), k / v (B, Hkv, Tk, D). Returns (O (B, H, Tq, D) in q.dtype, logsumexp L (B, H, Tq) fp32).
    Never forms a (Tq, Tk) tensor: the largest intermediate is one (block, block) tile per head. Forward only.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    n_rep = H // k.shape[1]
    qf = q.float()
    kf, vf = _repeat_kv(k.float(), n_rep), _repeat_kv(v.float(), n_rep)
    offset = Tk - Tq  # queries aligned to the end of the keys
    out = torch.empty(B, H, Tq, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    for i0 in range(0, Tq, block_size):
        qi = qf[:, :, i0 : i0 + block_size]  # (B, H, bq, D)  "loaded into SRAM"
        bq = qi.shape[2]
        m = torch.full((B, H, bq, 1), -math.inf, device=q.device)  # running row max
        l = torch.zeros(B, H, bq, 1, device=q.device)  # running row sum of exp
        acc = torch.zeros(B, H, bq, D, device=q.device)  # unnormalised output
        q_abs = torch.arange(i0, i0 + bq, device=q.device)[:, None] + offset  # (bq, 1)
        k_end = min(Tk, i0 + bq + offset) if causal else Tk  # causal: skip blocks above the diagonal
        for j0 in range(0, k_end, block_size):
            kj, vj = kf[:, :, j0 : j0 + block_size], vf[:, :, j0 : j0 + block_size]  # (B, H, bk, D)
            s = (qi @ kj.transpose(-1, -2)) * scale  # (B, H, bq, bk): one tile of S, never stored
            if causal:
                k_abs = torch.arange(j0, j0 + kj.shape[2], device=q.device)[None, :]
                s = s.masked_fill(k_abs > q_abs, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # a row with no visible key yet has m_new = -inf; use 0 there so exp() gives 0, not NaN
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe)  # (B, H, bq, bk)
            corr = torch.exp(m - m_safe)  # rescales what was accumulated under the old max
            l = l * corr + p.sum(dim=-1, keepdim=True)
            acc = acc * corr + p @ vj
            m = m_new
        out[:, :, i0 : i0 + bq] = acc / l.clamp_min(1e-30)
        lse[:, :, i0 : i0 + bq] = (m + torch.log(l)).squeeze(-1)
    return out.to(q.dtype), lse
