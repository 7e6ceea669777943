"""Next-token cross-entropy straight from hidden states, without materialising the full logits.

Notation. ``h`` (N, H) are final hidden states, ``W`` (V, H) the output projection (lm_head), ``y`` (N,) target ids.
For one labelled row the logits are ``z = W h`` (V,), optionally soft-capped (Gemma-2) as
``z' = c * tanh(z / c)``, and the loss is

    L = logsumexp(z') - z'[y]

summed over the rows whose label is not ``ignore_index``.

Memory. The obvious implementation computes all logits at once: an (N, V) tensor, upcast to fp32 and *kept for
backward*. With N = 4096 tokens and V = 262144 (Gemma) that is 4 GiB in fp32 before the softmax copy. Instead we

1. keep only the labelled rows (prompt tokens, padding and the last position of each row never reach lm_head), and
2. walk over those rows in chunks and compute, for each chunk, the loss *and its gradients right away*, so that
   only a chunk's (c, V) logits ever exist and nothing of size (N, V) is saved for backward.

Gradient (per row, written for the fused forward):

    dL/dz'  = softmax(z') - onehot(y)                    (V,)
    dz'/dz  = 1 - tanh(z / c)^2 = 1 - (z' / c)^2          (only with softcap; elementwise)
    dL/dz   = dL/dz' * dz'/dz
    dL/dh   = (dL/dz) W                                  (H,)    -> for a chunk: G @ W        (c, V) @ (V, H)
    dL/dW   = (dL/dz)^T h                                (V, H)  -> summed over chunks: G^T @ h_c

The forward stores dL/dh (N_labelled, H) and dL/dW (V, H); backward only multiplies them by the incoming scalar
``grad_output``. dL/dW is accumulated over chunks in fp32 (one (V, H) fp32 buffer, plus a (V, H) compute-dtype
scratch for bf16 weights) so that bf16 weights see one rounding, not one per chunk; with a frozen head (LoRA) none
of this exists. The price is that the gradient work happens in forward even if backward is never called, so the
fused path is only taken when autograd will need the gradients (otherwise a loss-only chunked loop runs).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "chunked_linear_cross_entropy",
    "default_chunk_size",
    "linear_cross_entropy",
    "next_token_loss",
    "reference_linear_cross_entropy",
]

IGNORE_INDEX = -100

# Budget for one chunk's logits in the compute dtype (rows * V * itemsize bytes). The fp32 softmax statistics run
# over column blocks of at most SCRATCH_BYTES, so the working set is this plus ~16 MiB (plus a (V, H) scratch when
# the head itself trains). Larger chunks mean fewer passes over the (V, H) weight, which costs real time on CPU
# (each chunk reads it twice); 128 MiB is 256 rows of a 262k vocabulary in bf16.
DEFAULT_CHUNK_BYTES = 128 * 2**20  # train.loss_chunk_mb
SCRATCH_BYTES = 16 * 2**20  # fp32 column-block scratch for the softmax statistics


def default_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES, itemsize: int = 2) -> int:
    """Rows per chunk such that a chunk's logits (rows, V) in the compute dtype take about ``budget_bytes``;
    a multiple of 8, at least 8."""
    rows = budget_bytes // (itemsize * max(1, vocab_size))
    return max(8, rows // 8 * 8)


def _softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2 final-logit soft-capping ``c * tanh(z / c)`` (identity when ``cap`` is None)."""
    return z if cap is None else torch.tanh(z / cap) * cap


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: full logits ``hidden @ weight.T`` upcast to fp32, CE summed over labelled rows.

    ``hidden`` (N, H) is already aligned with ``labels`` (N,). Returns ``(loss_sum, n_tokens)``: an fp32 scalar and
    an int64 scalar tensor. Memory O(N * V); this is the parity reference for :func:`chunked_linear_cross_entropy`.
    """
    logits = (hidden @ weight.T).float()  # (N, V) fp32: the tensor this module exists to avoid
    logits = _softcap(logits, softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


class _Workspace:
    """Chunk buffers allocated once per call and reused by every chunk.

    zc (c, V) compute dtype: the matmul output (logits), overwritten in place by dL/dz; scratch (c, vb) fp32: one
    column block of the logits upcast for the softmax statistics; tmp_w (V, H) compute dtype: per-chunk dL/dW
    before it is added to the fp32 accumulator (only when the head trains in low precision).
    """

    def __init__(self, rows: int, w: torch.Tensor, need_w: bool):
        V = w.shape[0]
        self.zc = torch.empty(rows, V, dtype=w.dtype, device=w.device)
        self.vb = min(V, max(1024, SCRATCH_BYTES // (4 * rows)))  # columns per block
        self.scratch = torch.empty(rows, self.vb, dtype=torch.float32, device=w.device)
        self.tmp_w = torch.empty_like(w) if (need_w and w.dtype != torch.float32) else None


def _chunk_loss_and_grad(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, softcap: float | None, want_grad: bool, ws: _Workspace
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss sum of one chunk and, if ``want_grad``, dL/dz (c, V) in the compute dtype (a view into ``ws``).

    h (c, H), w (V, H), y (c,). The matmul runs in the compute dtype (bf16 uses AMX / tensor cores) and its (c, V)
    output is the only chunk-sized buffer. The softmax statistics are fp32, computed over column blocks of it
    (two passes, as in the flash-attention forward of ``effine.ops.attention``):

    1. running max ``m`` and rescaled sum ``s`` over blocks: ``s <- s * exp(m_old - m_new) + sum exp(z'_blk - m_new)``,
       then ``lse = m + log s``;
    2. (gradient only) per block ``dL/dz' = exp(z'_blk - lse) - onehot(y)``, times ``1 - t^2`` with softcap, written
       back over the logits in the compute dtype. The target entries are computed apart, in fp32, so that
       ``p_y - 1`` keeps its bits when ``p_y`` is close to 1.

    Each block is upcast from the same compute-dtype logits in both passes, so the result equals the one-pass
    fp32 computation up to the summation order.
    """
    c, V = h.shape[0], w.shape[0]
    zc = ws.zc[:c]
    torch.mm(h, w.T, out=zc)  # (c, H) @ (H, V)
    rows = torch.arange(c, device=y.device)
    z_y = zc[rows, y].float()  # (c,) target logits, read before zc is overwritten
    if softcap is not None:
        t_y = torch.tanh(z_y / softcap)
        z_y = t_y * softcap
    m = torch.full((c, 1), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros((c, 1), dtype=torch.float32, device=h.device)
    for v0 in range(0, V, ws.vb):
        blk = ws.scratch[:c, : min(ws.vb, V - v0)]
        blk.copy_(zc[:, v0 : v0 + blk.shape[1]])  # upcast one column block
        if softcap is not None:
            blk.div_(softcap).tanh_().mul_(softcap)  # z' = c * tanh(z / c)
        m_new = torch.maximum(m, blk.amax(dim=-1, keepdim=True))
        s.mul_(torch.exp(m - m_new)).add_(blk.sub_(m_new).exp_().sum(dim=-1, keepdim=True))
        m = m_new
    lse = s.log_().add_(m)  # (c, 1) logsumexp
    loss = (lse.squeeze(1) - z_y).sum()
    if not want_grad:
        return loss, None
    for v0 in range(0, V, ws.vb):
        blk = ws.scratch[:c, : min(ws.vb, V - v0)]
        zb = zc[:, v0 : v0 + blk.shape[1]]
        blk.copy_(zb)
        if softcap is None:
            blk.sub_(lse).exp_()  # softmax
        else:
            blk.div_(softcap).tanh_()  # t
            dcap = torch.mul(blk, blk).neg_().add_(1.0)  # dz'/dz = 1 - t^2
            blk.mul_(softcap).sub_(lse).exp_().mul_(dcap)  # softmax(z') * dz'/dz
        zb.copy_(blk)
    g_y = torch.exp(z_y - lse.squeeze(1)) - 1.0  # (c,) p_y - 1 in fp32
    if softcap is not None:
        g_y = g_y * (1.0 - t_y * t_y)
    zc[rows, y] = g_y.to(zc.dtype)
    return loss, zc


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Chunked loss whose forward also produces dL/dh and dL/dW (see module docstring for the math)."""

    @staticmethod
    def forward(ctx, h, w, y, chunk_size: int, softcap: float | None, need_h: bool, need_w: bool):
        # h (n, H) labelled rows only, w (V, H), y (n,)
        n = h.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None  # (n, H)
        # dL/dW is a sum over all chunks: accumulate in fp32 so bf16 weights do not lose bits chunk after chunk.
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None  # (V, H)
        ws = _Workspace(min(chunk_size, n), w, need_w) if n else None
        for s in range(0, n, chunk_size):
            hc, yc = h[s : s + chunk_size], y[s : s + chunk_size]  # (c, H), (c,)
            lc, g = _chunk_loss_and_grad(hc, w, yc, softcap, True, ws)  # g (c, V) compute dtype
            loss += lc
            if need_h:
                torch.mm(g, w, out=grad_h[s : s + chunk_size])  # (c, V) @ (V, H)
            if need_w:
                if ws.tmp_w is None:
                    grad_w.addmm_(g.T, hc)  # fp32: (V, c) @ (c, H) straight into the accumulator
                else:
                    torch.mm(g.T, hc, out=ws.tmp_w)  # bf16 matmul (fp32 inside), one rounding per chunk
                    grad_w.add_(ws.tmp_w)
        del ws
        if need_w:
            grad_w = grad_w.to(w.dtype)
        # save_for_backward (not ctx attributes) so saved-tensor hooks and memory tools can see what is kept.
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # grad_out is a scalar: d(loss * s)/dh = s * dL/dh.
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`reference_linear_cross_entropy` with O(chunk * V) instead of O(N * V) memory.

    ``hidden`` (N, H) and ``labels`` (N,) (any leading shape is flattened). ``chunk_size`` rows per chunk; default
    from :data:`DEFAULT_CHUNK_BYTES` (``train.loss_chunk_mb``). A frozen ``weight`` (``requires_grad=False``,
    e.g. a LoRA run) skips the dL/dW accumulation. Returns ``(loss_sum, n_tokens)`` like the reference.
    """
    H = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, H), labels.reshape(-1)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)  # outside the Function, so autograd casts the gradient back
    chunk = chunk_size or default_chunk_size(weight.shape[0], itemsize=weight.element_size())
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk}")

    # Select labelled rows first: unlabelled rows never touch the (V, H) projection. index_select's backward
    # scatters dL/dh back into a zero (N, H) gradient.
    idx = (labels != ignore_index).nonzero().squeeze(1)  # (n,)  (one host sync, like any chunking would need)
    h_sel = hidden.index_select(0, idx)  # (n, H)
    y_sel = labels.index_select(0, idx)  # (n,)
    n_tokens = torch.tensor(idx.numel(), device=labels.device)

    need_h = torch.is_grad_enabled() and h_sel.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if not (need_h or need_w):
        # Evaluation: loss only, still chunked, no gradient work.
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n = idx.numel()
        ws = _Workspace(min(chunk, n), weight, need_w=False) if n else None
        for s in range(0, n, chunk):
            loss += _chunk_loss_and_grad(h_sel[s : s + chunk], weight, y_sel[s : s + chunk], softcap, False, ws)[0]
        return loss, n_tokens
    loss = _FusedLinearCrossEntropy.apply(h_sel, weight, y_sel, chunk, softcap, need_h, need_w)
    return loss, n_tokens


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    impl: str = "chunked",
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the ``"chunked"`` (default) or ``"reference"`` implementation on aligned (N, H) / (N,) inputs."""
    if impl == "chunked":
        return chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, softcap)
    if impl == "reference":
        H = hidden.shape[-1]
        return reference_linear_cross_entropy(hidden.reshape(-1, H), weight, labels.reshape(-1), ignore_index, softcap)
    raise ValueError(f"unknown loss impl {impl!r}; expected 'chunked' or 'reference'")


def next_token_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    impl: str = "chunked",
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM loss: ``hidden[:, t]`` predicts ``labels[:, t + 1]``. hidden (B, T, H), labels (B, T).

    Returns ``(loss_sum, n_tokens)``; the mean loss is ``loss_sum / n_tokens.clamp(min=1)`` (sum both over
    micro-batches / ranks first when accumulating, so that every token weighs the same).
    """
    B, T, H = hidden.shape
    if impl == "reference":
        # Literal shift: drop the last position of hidden and the first of labels.
        h = hidden[:, :-1].reshape(-1, H)  # (B*(T-1), H)
        y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
        return reference_linear_cross_entropy(h, lm_head_weight, y, ignore_index, softcap)
    # Same alignment without copying hidden: shift the labels left and mark the last position as unlabelled.
    y = torch.full_like(labels, ignore_index)  # (B, T)
    y[:, :-1] = labels[:, 1:]
    return linear_cross_entropy(
        hidden.reshape(-1, H), lm_head_weight, y.reshape(-1),
        impl=impl, ignore_index=ignore_index, softcap=softcap, chunk_size=chunk_size,
    )  # fmt: skip
