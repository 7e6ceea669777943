"""Parity and memory tests for effine.ops.loss (chunked linear cross-entropy vs the full-logits reference)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from effine.ops.loss import (
    chunked_linear_cross_entropy,
    default_chunk_size,
    linear_cross_entropy,
    next_token_loss,
    reference_linear_cross_entropy,
)

N, H, V = 203, 48, 1000  # N deliberately not a multiple of any chunk size used below


def _inputs(dtype, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


def _run(fn, h, w, y, w_grad=True, **kw):
    """Loss and grads of ``fn`` on fresh leaf copies."""
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_(w_grad)
    loss, n = fn(h, w, y, **kw)
    loss.backward()
    return loss.detach(), n, h.grad, w.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [1, 37, 64, 10_000])
def test_fp32_parity(chunk, softcap):
    h, w, y = _inputs(torch.float32)
    lr, nr, ghr, gwr = _run(reference_linear_cross_entropy, h, w, y, softcap=softcap)
    lc, nc, ghc, gwc = _run(chunked_linear_cross_entropy, h, w, y, chunk_size=chunk, softcap=softcap)
    assert nr.item() == nc.item() == (y != -100).sum().item()
    assert _rel(lc, lr) < 1e-5
    assert _rel(ghc, ghr) < 1e-5
    assert _rel(gwc, gwr) < 1e-5
    # ignored rows get exactly zero gradient
    assert torch.all(ghc[y == -100] == 0)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_parity(softcap):
    """bf16: loss within 1e-3 relative, grads within 1e-2 relative of the reference, and no farther from the fp64
    truth than the reference itself is (x1.5 + bf16 epsilon): chunking must not add error beyond bf16 rounding."""
    h, w, y = _inputs(torch.bfloat16)
    lr, _, ghr, gwr = _run(reference_linear_cross_entropy, h, w, y, softcap=softcap)
    lc, _, ghc, gwc = _run(chunked_linear_cross_entropy, h, w, y, chunk_size=37, softcap=softcap)
    lt, _, ght, gwt = _run(reference_linear_cross_entropy, h.double(), w.double(), y, softcap=softcap)
    assert ghc.dtype == gwc.dtype == torch.bfloat16
    assert _rel(lc, lr) < 1e-3
    assert _rel(ghc, ghr) < 1e-2 and _rel(gwc, gwr) < 1e-2
    eps = 2.0**-8
    assert _rel(ghc, ght) <= 1.5 * _rel(ghr, ght) + eps
    assert _rel(gwc, gwt) <= 1.5 * _rel(gwr, gwt) + eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_column_blocks_match_one_block(monkeypatch, dtype, softcap):
    """The softmax statistics run over column blocks of the logits (1024 columns here: 3 blocks of a 2500-column
    vocab, the last one partial, targets in every block). Same loss and gradients as one block, and as the
    reference."""
    import effine.ops.loss as L

    g = torch.Generator().manual_seed(3)
    Vb = 2500
    h = (torch.randn(64, H, generator=g) * 2).to(dtype)
    w = (torch.randn(Vb, H, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, Vb, (64,), generator=g)
    y[:6] = torch.tensor([0, 1023, 1024, 2047, 2048, Vb - 1])  # block edges
    one = _run(chunked_linear_cross_entropy, h, w, y, chunk_size=16, softcap=softcap)
    monkeypatch.setattr(L, "SCRATCH_BYTES", 1)  # -> the 1024-column minimum block
    assert L._Workspace(16, w, need_w=False).vb == 1024
    blocks = _run(chunked_linear_cross_entropy, h, w, y, chunk_size=16, softcap=softcap)
    ref = _run(reference_linear_cross_entropy, h, w, y, softcap=softcap)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b, r in zip(blocks, one, ref):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert _rel(a, b) < (1e-6 if dtype == torch.float32 else 1e-3)
            assert _rel(a, r) < tol


def test_frozen_weight():
    h, w, y = _inputs(torch.float32)
    lr, _, ghr, gwr = _run(reference_linear_cross_entropy, h, w, y, w_grad=False)
    lc, _, ghc, gwc = _run(chunked_linear_cross_entropy, h, w, y, w_grad=False, chunk_size=50)
    assert gwr is None and gwc is None
    assert _rel(lc, lr) < 1e-5 and _rel(ghc, ghr) < 1e-5
    # no dL/dW is computed or kept: nothing of the weight's size is saved for backward
    hh = h.clone().requires_grad_()
    _, numels = _saved_numels(lambda: chunked_linear_cross_entropy(hh, w, y, chunk_size=50))
    assert numels and max(numels) < V * H


def test_zero_labelled_tokens():
    h, w, y = _inputs(torch.float32)
    y[:] = -100
    loss, n, gh, gw = _run(chunked_linear_cross_entropy, h, w, y, chunk_size=16)
    assert loss.item() == 0.0 and n.item() == 0
    assert torch.all(gh == 0) and torch.all(gw == 0)
    loss_r, n_r, _, _ = _run(reference_linear_cross_entropy, h, w, y)
    assert loss_r.item() == 0.0 and n_r.item() == 0


def test_no_grad_path_matches():
    h, w, y = _inputs(torch.float32)
    with torch.no_grad():
        lc, _ = chunked_linear_cross_entropy(h, w, y, chunk_size=29, softcap=20.0)
        lr, _ = reference_linear_cross_entropy(h, w, y, softcap=20.0)
    assert _rel(lc, lr) < 1e-5


def test_next_token_loss_shift_and_impls():
    g = torch.Generator().manual_seed(1)
    B, T = 3, 41
    hidden = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :5] = -100  # a "prompt"
    # manual shift
    lm, nm = reference_linear_cross_entropy(hidden[:, :-1].reshape(-1, H), w, labels[:, 1:].reshape(-1))
    for impl in ("reference", "chunked"):
        loss, n = next_token_loss(hidden, w, labels, impl=impl, chunk_size=17)
        assert n.item() == nm.item() == B * (T - 5)
        assert _rel(loss, lm) < 1e-5
    hc = hidden.clone().requires_grad_()
    hr = hidden.clone().requires_grad_()
    next_token_loss(hc, w, labels, impl="chunked", chunk_size=17)[0].backward()
    next_token_loss(hr, w, labels, impl="reference")[0].backward()
    assert _rel(hc.grad, hr.grad) < 1e-5
    assert torch.all(hc.grad[:, -1] == 0)  # the last position predicts nothing
    with pytest.raises(ValueError):
        linear_cross_entropy(hidden.reshape(-1, H), w, labels.reshape(-1), impl="nope")


def test_default_chunk_size_follows_budget():
    assert default_chunk_size(262144, 128 * 2**20) == 256  # bf16 logits: 2 bytes per entry
    assert default_chunk_size(262144, 128 * 2**20, itemsize=4) == 128
    assert default_chunk_size(262144) == 256
    assert default_chunk_size(49152, 128 * 2**20) % 8 == 0
    assert default_chunk_size(10**9, 1) == 8  # never below 8 rows


# ---------------------------------------------------------------------------------------------------------------------
# Memory: two independent checks that fail for the full-logits reference (asserted, so the checks are live).


def _saved_numels(fn):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = fn()
    return loss, numels


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ATen ops and still alive, across forward *and* backward."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, n):
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n == 0 or key in self._seen:
                    continue  # a view of a storage we already count
                self._seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)
        return out


def test_no_full_logits_saved_for_backward():
    n_rows, vocab = 512, 4096
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_rows, 32, generator=g, requires_grad=True)
    w = torch.randn(vocab, 32, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (n_rows,), generator=g)
    _, ref = _saved_numels(lambda: reference_linear_cross_entropy(h, w, y))
    assert max(ref) >= n_rows * vocab  # the check sees the reference's (N, V) logits
    _, chk = _saved_numels(lambda: chunked_linear_cross_entropy(h, w, y, chunk_size=64))
    assert chk, "the fused Function should save its gradients visibly"
    assert max(chk) <= max(vocab * 32, n_rows * 32)  # only dL/dW (V, H) and dL/dh (n, H)


def test_peak_memory_lower_than_logits():
    n_rows, hid, vocab = 2048, 64, 8192
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_rows, hid, generator=g, requires_grad=True)
    w = torch.randn(vocab, hid, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (n_rows,), generator=g)
    logits_bytes = n_rows * vocab * 4  # 64 MiB

    def peak(fn):
        with _PeakLiveBytes() as m:
            loss, _ = fn()
            loss.backward()
        return m.peak

    ref = peak(lambda: reference_linear_cross_entropy(h, w, y))
    chk = peak(lambda: chunked_linear_cross_entropy(h, w, y, chunk_size=128))
    assert ref >= logits_bytes
    # chunk: 2 x (128, 8192) fp32 + grads (V, H) + (N, H) fp32 ~ 12 MiB
    assert chk < logits_bytes / 4, (ref, chk)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_parity_and_peak_memory():
    """SmolLM2-sized head on CUDA: same loss/grads as the reference (bf16 tolerances) at a fraction of the memory."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    n, hid, vocab = 4096, 576, 49152
    h = torch.randn(n, hid, device=dev, generator=g).bfloat16()
    w = (torch.randn(vocab, hid, device=dev, generator=g) * 0.02).bfloat16()
    y = torch.randint(0, vocab, (n,), device=dev, generator=g)
    y[::2] = -100

    def run(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, _ = fn(hh, ww, y)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), hh.grad, ww.grad, torch.cuda.max_memory_allocated() - base

    lr, ghr, gwr, peak_r = run(reference_linear_cross_entropy)
    lc, ghc, gwc, peak_c = run(chunked_linear_cross_entropy)
    assert _rel(lc, lr) < 1e-3
    assert _rel(ghc, ghr) < 1e-2 and _rel(gwc, gwr) < 1e-2
    assert peak_c < peak_r / 3, (peak_c, peak_r)
