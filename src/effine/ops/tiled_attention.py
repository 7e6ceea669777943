"""Tiled causal attention for CPU training: the flash-attention algorithm at matmul-sized tiles.

Why. On CPU, PyTorch's SDPA flash kernel (``_scaled_dot_product_flash_attention_for_cpu``) runs small
per-head tiles through scalar-heavy loops, far below the bf16 matmul peak (numbers: bench/results/kernels.md), and
attention is a large share of a LoRA training step. Here the same algorithm (see
:mod:`effine.ops.attention` for its statement) runs with the tile loop in Python and every tile product as one
batched bf16 matmul (AMX), so only the softmax statistics are elementwise work.

Algorithm, per query block ``i`` of ``bq`` rows (all heads of a kv group batched together: grouped-query
attention multiplies the rows of a matmul, K and V are never repeated):

forward   Q is scaled once (``Q' = Q * scale``). Keys ``[k0, e)`` where ``e`` is the block's end (causal: later
          keys are skipped, not masked) and ``k0`` is 0 or the sliding-window start;
          ``S = Q'_i K^T``, mask ``j > i`` inside the diagonal tile (and ``i - j >= window``),
          ``P = softmax(S)`` (one fused pass per row, fp32 statistics), ``O_i = P V``. Saved for backward:
          Q', K and V — never S or P, so activation memory stays O(T * d). O is returned in the (B, T, H, D)
          layout the output projection consumes.
backward  per block recompute ``P = softmax(Q'_i K^T)`` and ``dV += P^T dO_i``, ``dP = dO_i V^T``,
          ``dS = P * (dP - D_i)``, ``dQ'_i = dS K``, ``dK += dS^T Q'_i`` (dK and dV accumulate in fp32; autograd
          multiplies dQ' by the scale). FlashAttention computes ``D_i = rowsum(dO_i * O_i)`` because its key
          blocks are visited one at a time; here a query block's tile holds all the keys its rows see, so
          ``D_i = rowsum(dP_i * P_i)`` (the same number: ``O_i = P_i V``) and ``dS`` is exactly the softmax backward
          of the tile, ATen's fused ``_softmax_backward_data`` (one pass, fp32 inside, one rounding: faster than the
          five-pass fp32 form, and closer to fp64).

K^T (and in backward V^T) is laid out once per call, (B, Hk, D, T) contiguous, so a tile's keys ``[k0, e)`` are a
column slice the matmul reads in place; a slice of the transposed view K[k0:e]^T would be copied by every tile's
matmul (three copies per block).

Unlike the fully fused GPU kernel, a query block's scores over all its keys exist at once (``bq x T`` per head,
fp32): the working set is O(bq * T) per call, not O(T^2), and it is freed before the next block. Matmul
outputs are in the input dtype (CPU matmuls cannot write fp32 from bf16 inputs), so bf16 results carry one
extra rounding of S, P and dP (and of Q' = Q * scale) compared with SDPA's fp32 accumulators; the parity tests
bound the difference (bench/results/kernels.md has the measured ratio to SDPA's error against fp64).

Scope: self-attention (Tq == Tk), causal, optional sliding window, no dropout, no explicit mask, no softcap —
:func:`supports` says whether a call qualifies; :mod:`effine.ops.attention` routes everything else to SDPA or
eager. Packed rows are handled by the caller, one call per bucket of similar-length documents.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["DEFAULT_BLOCK", "supports", "tiled_attention"]

DEFAULT_BLOCK = 64  # query rows per tile (per head); 64 was fastest for head dims 64-256 on AMX (bench in the PR)


def supports(q: torch.Tensor, k: torch.Tensor, *, causal: bool, softcap, mask, dropout: float) -> bool:
    """Whether :func:`tiled_attention` can serve this call exactly."""
    return (causal and softcap is None and mask is None and dropout == 0.0 and q.shape[2] == k.shape[2]
            and q.shape[1] % k.shape[1] == 0 and q.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _key_range(s: int, e: int, window: int | None) -> int:
    """First key any query in [s, e) can see (causal, optional sliding window: i - j < window)."""
    return 0 if window is None else max(0, s - window + 1)


def _tile_bias(s: int, e: int, k0: int, window: int | None, r: int, dtype, device) -> torch.Tensor:
    """(n, r, M) additive mask for the tile of queries [s, e) (n = e - s, r heads each): 0 where query i may see
    key j, -inf where it must not. Without a window only the diagonal tile (keys [s, e), the last M = n columns) has
    hidden entries; with one, all keys [k0, e) (M = e - k0). Adding it is exact (x + 0 = x, x + -inf = -inf) and,
    contiguous and full-sized, 4x cheaper than a broadcast ``masked_fill_`` on the strided tile view."""
    if window is None:
        return _bias(e - s, e - s, 0, None, r, dtype, device)
    return _bias(e - s, e - k0, s - k0, window, r, dtype, device)


@functools.lru_cache(maxsize=64)
def _bias(n: int, m: int, shift: int, window: int | None, r: int, dtype, device) -> torch.Tensor:
    i = torch.arange(shift, shift + n, device=device).view(-1, 1, 1)  # query offsets from the first key column
    j = torch.arange(m, device=device).view(1, 1, -1)
    hide = j > i
    if window is not None:
        hide |= (i - j) >= window
    return torch.zeros(n, r, m, dtype=dtype, device=device).masked_fill_(hide, float("-inf"))


def _probs(qb: torch.Tensor, kt: torch.Tensor, bias: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """Softmax probabilities of one tile, (B, Hk, n*r, L), in the input dtype; ``qb`` is already scaled.

    ``bias`` (:func:`_tile_bias`) covers the last ``bias.shape[-1]`` keys. ``torch.softmax`` is one fused pass per
    row that reads the compute-dtype scores and accumulates in fp32 (row max, sum of exponentials), so no fp32 copy
    of the tile is written and no logsumexp needs to be stored: backward recomputes P the same way.
    """
    s = torch.matmul(qb, kt)  # (B, Hk, n*r, L)
    B, Hk, _, L = s.shape
    s.view(B, Hk, n, r, L)[..., L - bias.shape[-1] :].add_(bias)
    return torch.softmax(s, dim=-1)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qg, k, v, window: int | None, block: int):
        # qg (B, Hk, T, r, D): the scaled queries, the r query heads of each kv head next to each other; k, v
        # (B, Hk, T, D). The output is written as (B, T, Hk, r, D) == (B, T, Hq, D), the layout the output
        # projection reads, so the tensor saved here and the projection's saved input are one storage.
        B, Hk, T, r, D = qg.shape
        og = torch.empty(B, T, Hk, r, D, dtype=qg.dtype, device=qg.device)
        kt = k.transpose(-1, -2).contiguous()
        for s in range(0, T, block):
            e = min(T, s + block)
            n, k0 = e - s, _key_range(s, e, window)
            bias = _tile_bias(s, e, k0, window, r, qg.dtype, qg.device)
            p = _probs(qg[:, :, s:e].reshape(B, Hk, n * r, D), kt[..., k0:e], bias, n, r)
            og[:, s:e] = torch.matmul(p, v[:, :, k0:e]).view(B, Hk, n, r, D).transpose(1, 2)
        ctx.save_for_backward(qg, k, v)
        ctx.window, ctx.block = window, block
        return og

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dog):
        qg, k, v = ctx.saved_tensors
        window, block = ctx.window, ctx.block
        B, Hk, T, r, D = qg.shape
        dq = torch.empty_like(qg)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        kt, vt = k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous()
        for s in range(0, T, block):
            e = min(T, s + block)
            n, k0 = e - s, _key_range(s, e, window)
            bias = _tile_bias(s, e, k0, window, r, qg.dtype, qg.device)
            qb = qg[:, :, s:e].reshape(B, Hk, n * r, D)
            kb = k[:, :, k0:e]
            p = _probs(qb, kt[..., k0:e], bias, n, r)
            dob = dog[:, s:e].transpose(1, 2).reshape(B, Hk, n * r, D)
            dv[:, :, k0:e] += torch.matmul(p.transpose(-1, -2), dob)
            dp = torch.matmul(dob, vt[..., k0:e])  # (B, Hk, n*r, L)
            # dS = P * (dP - D_i) with D_i = rowsum(dP * P): the tile holds every key row i sees, so this is the
            # softmax backward of the tile, one fused ATen pass (fp32 inside, one rounding) instead of five.
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq[:, :, s:e] = torch.matmul(ds, kb).view(B, Hk, n, r, D)
            dk[:, :, k0:e] += torch.matmul(ds.transpose(-1, -2), qb)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Causal self-attention, q (B, Hq, T, D), k / v (B, Hkv, T, D), Hq % Hkv == 0 -> (B, Hq, T, D).

    ``sliding_window`` w: query i sees keys j with i - w < j <= i. ``block``: query rows per tile.
    """
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    r = Hq // Hk
    scale = D**-0.5 if scale is None else scale
    # The scale is applied to Q once (autograd scales dQ back), not to every score tile.
    qg = (q * scale).view(B, Hk, r, T, D).transpose(2, 3).contiguous()  # (B, Hk, T, r, D)
    og = _TiledAttention.apply(qg, k.contiguous(), v.contiguous(), sliding_window, int(block))
    return og.view(B, T, Hq, D).transpose(1, 2)  # (B, Hq, T, D) view; .transpose(1, 2) of it is contiguous
