"""Parity tests for effine.ops.attention: every available backend against the fp32 eager reference, packed rows
against documents run alone, and tiny transformers models with attn_implementation="effine" against "eager".

Tolerances (fp32 unless stated): outputs and gradients within 1e-5 absolute (values are O(1)); model logits within
1e-5, parameter gradients within rtol 1e-4 / atol 1e-6; bf16 kernels against the fp32-math reference within
atol 3e-2 + rtol 1.6e-2 (a few bf16 ulps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effine.ops.attention as A
from effine.ops.attention import (
    attention,
    attention_backend,
    cu_seqlens_from_position_ids,
    enable,
    flash_attention_reference,
    register,
    select_backend,
)

FAST_BACKENDS = ["sdpa", "tiled", pytest.param("flash_attn", marks=pytest.mark.skipif(
    not A.flash_attn_available(), reason="flash-attn not installed / no CUDA"))]  # fmt: skip
DEVICE = "cuda" if A.flash_attn_available() else "cpu"


def _qkv(B=2, Hq=4, Hkv=2, T=32, D=16, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


def _upstream(shape, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(123)).to(device)


def _fwd_bwd(q, k, v, up=None, **kw):
    """Output and (dq, dk, dv) for a fixed random upstream gradient ``up`` (default: seeded, output-shaped)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, **kw)
    up = _upstream(out.shape, out.device) if up is None else up
    (out * up.to(out)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _close(a, b, atol=1e-5, rtol=0.0):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def _assert_all_close(xs, ys, atol=1e-5):
    """fp32: absolute 1e-5. bf16 (atol >= 1e-2): also relative 1.6e-2, since dk/dv sum over many queries and a
    one-ulp bf16 difference on a value of 8 is already 0.03."""
    rtol = 1.6e-2 if atol >= 1e-2 else 0.0
    for x, y in zip(xs, ys):
        _close(x, y, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel level


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_causal_gqa_parity(backend, hkv):
    dtype = torch.bfloat16 if backend == "flash_attn" else torch.float32
    q, k, v = _qkv(Hkv=hkv, dtype=dtype, device=DEVICE if backend == "flash_attn" else "cpu")
    atol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    _assert_all_close(_fwd_bwd(q, k, v, backend=backend), _fwd_bwd(q, k, v, backend="eager"), atol=atol)


def test_tiled_mask_cache_survives_inference_mode():
    """The tile masks are cached; one first built under inference_mode must still work in a training pass."""
    from effine.ops.tiled_attention import _bias, tiled_attention

    _bias.cache_clear()
    q, k, v = _qkv(T=40, seed=9)
    with torch.inference_mode():
        ref = tiled_attention(q, k, v, block=16)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = tiled_attention(q, k, v, block=16)
    out.sum().backward()
    assert torch.equal(out.detach(), ref) and q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("block", [1, 7, 16, 64])
@pytest.mark.parametrize("window", [None, 4, 11])
def test_tiled_blocks_and_windows(block, window):
    """Any tile size (1 row, sizes that do not divide T, one tile for all) gives the eager result, with and
    without a sliding window narrower or wider than a tile; GQA with 3 query heads per kv head."""
    from effine.ops.tiled_attention import tiled_attention

    q, k, v = _qkv(Hq=6, Hkv=2, T=29)
    up = _upstream(q.shape)

    def run(fn):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        return [out, *torch.autograd.grad(out, (qq, kk, vv), up)]

    got = run(lambda a, b, c: tiled_attention(a, b, c, sliding_window=window, block=block))
    want = run(lambda a, b, c: attention(a, b, c, sliding_window=window, backend="eager"))
    _assert_all_close(got, want)


def test_tiled_bf16_error_comparable_to_sdpa():
    """In bf16 the tiled kernel rounds S and dP once more than SDPA's fp32 accumulators: its error against an
    fp64 reference must stay within 2x SDPA's (measured ~1.3x) for the output and every gradient."""
    q, k, v = _qkv(B=2, Hq=6, Hkv=2, T=96, D=32, seed=3)
    up = _upstream(q.shape)

    def run(backend, dtype):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, backend=backend)
        return [x.double() for x in (out, *torch.autograd.grad(out, (qq, kk, vv), up.to(dtype)))]

    ref = run("eager", torch.float64)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    tiled, sdpa = run("tiled", torch.bfloat16), run("sdpa", torch.bfloat16)
    for t, s_, r in zip(tiled, sdpa, ref):
        assert rel(t, r) < 2 * rel(s_, r) + 1e-4, (rel(t, r), rel(s_, r))


def test_sdpa_bf16_against_fp32_reference():
    q, k, v = _qkv(dtype=torch.bfloat16, T=64)
    out = attention(q, k, v, backend="sdpa")
    ref = attention(q, k, v, backend="eager")  # fp32 math on the same bf16 inputs
    assert out.dtype == torch.bfloat16
    _close(out, ref, atol=3e-2)


def test_non_causal_and_sliding_window():
    q, k, v = _qkv(T=29)
    for kw in (dict(causal=False), dict(sliding_window=6), dict(causal=False, sliding_window=6)):
        for backend in ("sdpa", "tiled"):
            _assert_all_close(_fwd_bwd(q, k, v, backend=backend, **kw), _fwd_bwd(q, k, v, backend="eager", **kw))


@pytest.mark.parametrize("backend", ["eager", *FAST_BACKENDS])
@pytest.mark.parametrize("window", [None, 5])
def test_packed_equals_documents_alone(backend, window):
    """Row 0 holds docs of 5, 17 and 10 tokens, row 1 docs of 20 and 12: every doc must come out as if alone."""
    dtype = torch.bfloat16 if backend == "flash_attn" else torch.float32
    dev = DEVICE if backend == "flash_attn" else "cpu"
    q, k, v = _qkv(T=32, dtype=dtype, device=dev)
    cu = torch.tensor([0, 5, 22, 32, 52, 64])
    up = _upstream(q.shape, dev)
    packed = _fwd_bwd(q, k, v, up, backend=backend, cu_seqlens=cu, sliding_window=window)
    atol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        b, ls = divmod(s, 32)
        le = e - b * 32
        piece = (t[b : b + 1, :, ls:le] for t in (q, k, v))
        alone = _fwd_bwd(*piece, up[b : b + 1, :, ls:le], backend="eager", sliding_window=window)
        # outputs and dq match per doc; dk/dv too because no other doc's queries reach these keys
        for got, want in zip(packed, alone):
            _close(got[b : b + 1, :, ls:le], want, atol=atol)


def test_packed_sdpa_runs_causal_kernel_without_mask(monkeypatch):
    """The packed CPU path must call SDPA with is_causal=True and no mask tensor (keeps the causal saving)."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append((kw.get("attn_mask"), kw.get("is_causal")))
        return real(*args, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(T=32)
    # documents of 5, 17, 10, 20, 12 tokens: three length buckets (6, 24, 12 wide), one call each
    attention(q, k, v, backend="sdpa", cu_seqlens=torch.tensor([0, 5, 22, 32, 52, 64]))
    assert len(calls) == 3 and all(m is None and c is True for m, c in calls)
    calls.clear()
    attention(q, k, v, backend="sdpa")  # plain causal batch: one call, no mask
    assert calls == [(None, True)]


def test_explicit_mask_and_fully_masked_rows():
    q, k, v = _qkv(T=16)
    keep = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    keep[1, ..., :4] = False  # left padding in row 1: its first 4 queries see no key at all
    res = {b: _fwd_bwd(q, k, v, backend=b, mask=keep) for b in ("eager", "sdpa")}
    _assert_all_close(res["sdpa"], res["eager"])
    out = res["sdpa"][0]
    assert torch.all(out[1, :, :4] == 0)
    assert all(torch.isfinite(t).all() for t in res["sdpa"])


def test_float_bias_mask():
    q, k, v = _qkv(T=12)
    bias = torch.zeros(1, 1, 12, 12)
    bias[..., 3] = -1e9
    _assert_all_close(_fwd_bwd(q, k, v, backend="sdpa", mask=bias), _fwd_bwd(q, k, v, backend="eager", mask=bias))


def test_decode_queries_aligned_to_end_of_keys():
    q, k, v = _qkv(T=20)
    full = attention(q, k, v, backend="eager")
    for backend in ("eager", "sdpa"):
        tail = attention(q[:, :, -3:], k, v, backend=backend)  # 3 new queries against 20 cached keys
        _close(tail, full[:, :, -3:])


def test_softcap():
    q, k, v = _qkv(T=16)
    q = q * 4  # large scores so the cap matters
    capped = attention(q, k, v, backend="eager", softcap=5.0)
    assert not torch.allclose(capped, attention(q, k, v, backend="eager"))
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, backend="sdpa", softcap=5.0)
    # manual formula
    kk, vv = A._repeat_kv(k, 2), A._repeat_kv(v, 2)
    s = torch.tanh(q @ kk.transpose(-1, -2) / 4 / 5.0) * 5.0
    s = s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    _close(capped, torch.softmax(s, -1) @ vv)


@pytest.mark.skipif(not A.flash_attn_available(), reason="flash-attn not installed / no CUDA")
def test_flash_attn_softcap_and_window():
    q, k, v = _qkv(T=64, dtype=torch.bfloat16, device="cuda")
    for kw in (dict(softcap=20.0), dict(sliding_window=9), dict(softcap=20.0, sliding_window=9)):
        _assert_all_close(_fwd_bwd(q, k, v, backend="flash_attn", **kw), _fwd_bwd(q, k, v, backend="eager", **kw), 3e-2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [7, 16, 64])
def test_tiled_online_softmax_reference(causal, block):
    q, k, v = _qkv(T=45)
    out, lse = flash_attention_reference(q, k, v, causal=causal, block_size=block)
    _close(out, attention(q, k, v, backend="eager", causal=causal))
    kk = A._repeat_kv(k, 2)
    s = q @ kk.transpose(-1, -2) / 4
    if causal:
        s = s.masked_fill(torch.ones(45, 45, dtype=torch.bool).triu(1), float("-inf"))
    _close(lse, torch.logsumexp(s, -1))
    # fewer queries than keys (queries at the end), as in decoding
    out, _ = flash_attention_reference(q[:, :, -9:], k, v, causal=causal, block_size=block)
    _close(out, attention(q[:, :, -9:], k, v, backend="eager", causal=causal))


def test_select_backend(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    assert select_backend("cpu") == "tiled"
    assert select_backend("cpu", packed=True) == "tiled"
    assert select_backend("cpu", has_mask=True) == "sdpa"
    assert select_backend("cpu", softcap=30.0) == "eager"
    assert select_backend("cpu", override="eager") == "eager"
    monkeypatch.setenv(A.ENV_VAR, "eager")
    assert select_backend("cpu") == "eager"
    with attention_backend("sdpa"):
        assert select_backend("cpu") == "sdpa"  # context beats env
        assert select_backend("cpu", override="eager") == "eager"  # argument beats context
    monkeypatch.setenv(A.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        select_backend("cpu")
    with pytest.raises(ValueError):
        A.set_backend("bogus")
    if not A.flash_attn_available():
        q, k, v = _qkv(T=8)
        with pytest.raises(RuntimeError):
            attention(q, k, v, backend="flash_attn")


def test_cu_seqlens_helpers():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 9, 16, 18]
    assert cu_seqlens_from_position_ids(torch.arange(9)[None].expand(2, -1)) is None
    with pytest.raises(ValueError):
        attention(*_qkv(T=8), cu_seqlens=torch.tensor([0, 4, 9]))  # does not end at B*T


# ---------------------------------------------------------------------------------------------------------------------
# transformers models

transformers = pytest.importorskip("transformers")


def _llama(seed=0, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device)


def _gemma2(seed=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
    )  # fmt: skip
    return Gemma2ForCausalLM(cfg)


def _logits(model, impl, ids, backend=None, **kw):
    if impl == "effine":
        enable(model)
    else:
        model.set_attn_implementation(impl)
    with attention_backend(backend):
        return model(ids, use_cache=False, **kw).logits


def test_register_and_enable(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    model = _llama()
    assert register() == "effine"
    try:
        assert enable(model) == "tiled"  # auto on CPU
        assert model.config._attn_implementation == "effine"
        assert model.model.layers[0].self_attn.config._attn_implementation == "effine"
        assert enable(model, "eager") == "eager"
        assert enable(_gemma2(), "auto") == "eager"  # attention softcap: SDPA cannot do it
    finally:
        A.set_backend(None)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "tiled", None])
def test_llama_logits_match_eager(backend):
    model = _llama().eval()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, "eager", ids)
    _close(_logits(model, "effine", ids, backend), ref)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_llama_padding_matches_eager(backend):
    model = _llama().eval()
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 24, dtype=torch.long)
    am[1, :5] = 0  # left padding
    am[2, 19:] = 0  # right padding
    ref = _logits(model, "eager", ids, attention_mask=am)
    out = _logits(model, "effine", ids, backend, attention_mask=am)
    real = am.bool()
    _close(out[real], ref[real])


def _packed_vs_separate(model, backend, lens, checkpointing=False):
    """Logits and parameter grads of one packed row vs the documents run one by one (same total loss).

    The packed row restarts its positions at every document (the data pipeline's format)."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 128, (1, n), generator=g).to(dev) for n in lens]
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    model.set_attn_implementation("eager")
    model.zero_grad()
    sep_logits = []
    for d, s in zip(docs, offsets.tolist()):
        pos = torch.arange(d.shape[1], device=dev)[None]
        out = model(d, labels=d, position_ids=pos, use_cache=False)
        (out.loss * (d.shape[1] - 1)).backward()  # sum, not mean, so docs add up
        sep_logits.append(out.logits.detach())
    sep_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = torch.cat(docs, dim=1)
    labels = packed.clone()
    labels[0, offsets[1:-1]] = -100  # a document's first token is not predicted from the previous document
    enable(model)
    model.zero_grad()
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(dev)
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with attention_backend(backend):
        out = model(packed, position_ids=pos, use_cache=False)
        loss = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        loss.backward()  # checkpointed layers are recomputed here
    if checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return sep_logits, sep_grads, out.logits.detach(), offsets, {n: p.grad for n, p in model.named_parameters()}


def _check_packed(model, backend, lens, checkpointing=False):
    sep_logits, sep_grads, logits, offsets, grads = _packed_vs_separate(model, backend, lens, checkpointing)
    for (s, e), ref in zip(zip(offsets[:-1].tolist(), offsets[1:].tolist()), sep_logits):
        _close(logits[:, s:e], ref)
    for name, ref in sep_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_llama_packed_row_equals_separate_docs(backend):
    _check_packed(_llama().train(), backend, [7, 12, 11])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_rows_with_right_padding(backend):
    """Right-padded packed rows, position 0 on padding: real tokens must match each document run alone, and no
    NaN anywhere."""
    model = _llama().eval()
    g = torch.Generator().manual_seed(6)
    rows = [[9, 6], [12], [5, 4, 3]]  # documents per row; T = 16, rows 1 and 2 padded
    T = 16
    ids = torch.randint(0, 128, (3, T), generator=g)
    pos = torch.zeros(3, T, dtype=torch.long)
    for b, lens in enumerate(rows):
        pos[b, : sum(lens)] = torch.cat([torch.arange(n) for n in lens])
    enable(model)
    with attention_backend(backend):
        derived = model(ids, position_ids=pos, use_cache=False).logits
    assert torch.isfinite(derived).all()
    model.set_attn_implementation("eager")
    for b, lens in enumerate(rows):
        s = 0
        for n in lens:
            alone = model(ids[b : b + 1, s : s + n], use_cache=False).logits
            _close(derived[b : b + 1, s : s + n], alone)
            s += n


def test_single_token_runs_do_not_call_the_kernel_per_token(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(B=1, T=40)
    cu = torch.tensor([0, 30, *range(31, 41)])  # one document, then ten one-token "documents" (padding)
    out = attention(q, k, v, backend="sdpa", cu_seqlens=cu)
    assert len(calls) == 2  # the 30-token document, and all ten one-token documents in one batched call
    _close(out, attention(q, k, v, backend="eager", cu_seqlens=cu))


def _many_docs(B: int, T: int, seed: int, max_len: int = 12) -> torch.Tensor:
    """cu_seqlens of rows of T tokens cut into random documents of 1..max_len tokens (what packing short samples
    gives: dozens of documents per row)."""
    g = torch.Generator().manual_seed(seed)
    bounds = [0]
    for b in range(B):
        end = (b + 1) * T
        while bounds[-1] < end:
            bounds.append(min(end, bounds[-1] + int(torch.randint(1, max_len + 1, (1,), generator=g))))
    return torch.tensor(bounds)


def test_a_document_crossing_a_row_end_is_an_error():
    q, k, v = _qkv(T=32)
    with pytest.raises(ValueError, match="crosses the end of row 0"):
        attention(q, k, v, backend="sdpa", cu_seqlens=torch.tensor([0, 20, 40, 64]))


def test_doc_buckets_cover_every_token_once():
    from effine.ops.attention_packing import DocBuckets

    cu = _many_docs(3, 96, seed=1, max_len=40)
    plan = DocBuckets(cu.tolist(), "cpu")
    assert sorted(plan.scatter.tolist()) == sorted(set(plan.scatter.tolist()))  # one row per token, no two alike
    rows = torch.cat([g for _, _, g in plan.buckets])
    assert torch.equal(rows[plan.scatter], torch.arange(3 * 96))  # row scatter[t] gathered token t itself
    starts, ends = cu[:-1].tolist(), cu[1:].tolist()
    doc_of = {t: d for d, (s, e) in enumerate(zip(starts, ends)) for t in range(s, e)}
    for n, W, gather in plan.buckets:  # a bucket's rows stay inside one document each, padded with its last token
        assert W == max(ends[doc_of[int(r[0])]] - starts[doc_of[int(r[0])]] for r in gather.view(n, W))
        for r in gather.view(n, W).tolist():
            assert len({doc_of[t] for t in r}) == 1 and r == sorted(r)
    assert len(plan.buckets) <= 8 < len(starts)  # a few calls for dozens of documents


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
@pytest.mark.parametrize("window", [None, 4])
def test_many_short_documents_equal_eager(backend, window):
    """Rows of dozens of 1-12 token documents (packed short samples): outputs and q/k/v gradients equal the eager
    reference with its explicit block-diagonal mask."""
    q, k, v = _qkv(B=2, T=96)
    cu = _many_docs(2, 96, seed=0)
    up = _upstream(q.shape)
    _assert_all_close(_fwd_bwd(q, k, v, up, backend=backend, cu_seqlens=cu, sliding_window=window),
                      _fwd_bwd(q, k, v, up, backend="eager", cu_seqlens=cu, sliding_window=window))


def test_packed_rows_survive_gradient_checkpointing():
    """Layers recomputed in backward derive the same document boundaries (a leak across documents would change
    the gradients)."""
    _check_packed(_llama().train(), "sdpa", [9, 6, 15], checkpointing=True)


def test_llama_generate_matches_eager():
    model = _llama().eval()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("eager")
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    enable(model)
    with attention_backend("sdpa"):
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


def test_gemma2_softcap_sliding_window():
    model = _gemma2().eval()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, "eager", ids)
    _close(_logits(model, "effine", ids), ref)  # auto: eager on CPU because of softcap
    _close(_logits(model, "effine", ids, "eager"), ref)


def test_gemma2_packed_row_equals_separate_docs():
    _check_packed(_gemma2().train(), "eager", [10, 13, 9])  # 13 > sliding_window: the window is exercised


def test_mistral_sliding_window_sdpa():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=256,
    )  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    _close(_logits(model, "effine", ids, "sdpa"), _logits(model, "eager", ids))


# ---------------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): SDPA's CUDA kernels against the eager reference

@pytest.mark.parametrize("kw", [{}, {"sliding_window": 33}, {"cu_seqlens": [0, 100, 350, 512, 700, 1024]}])
@pytest.mark.parametrize("hkv", [8, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
def test_cuda_sdpa_parity(kw, hkv, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw = {k: torch.tensor(v) if k == "cu_seqlens" else v for k, v in kw.items()}
    q, k, v = _qkv(B=2, Hq=8, Hkv=hkv, T=512, D=64, dtype=dtype, device="cuda")
    atol = 3e-2 if dtype == torch.bfloat16 else 2e-5
    _assert_all_close(_fwd_bwd(q, k, v, backend="sdpa", **kw), _fwd_bwd(q, k, v, backend="eager", **kw), atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_position_ids", [True, False])
def test_cuda_llama_packed_row_equals_separate_docs(use_position_ids):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_packed(_llama(device="cuda").train(), "sdpa", [7, 12, 11], use_position_ids)
