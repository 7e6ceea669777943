"""``effine plan``: predict the peak memory of a training run before loading any weights.

Everything is computed from the model's ``config.json`` and the run config. Parameter counts and the shape of
every linear layer come from the model built on the ``meta`` device (exact, no memory, ~1 s; the inventory is
:mod:`effine.plan.inventory`), so every family transformers knows is covered without per-family tables.
:func:`effine.plan.measure.measure_peak` runs the real thing in a subprocess for validation
(``bench/memory_plan.py``, ``tests/unit/test_memory_plan.py``).

Notation: ``N = B * T`` tokens per micro-batch (``train.batch_size`` x ``data.max_length``; packing or not, the
planner assumes the worst case of full rows: packing only makes it the typical case), ``n = B * (T - 1)``
supervised positions (worst case: all supervised), ``L`` decoder layers, ``H`` hidden size, ``Hq`` / ``Hkv`` query /
key-value heads of size ``D``, ``I`` MLP intermediate size, ``V`` vocabulary, ``r`` LoRA rank, ``b`` bytes of
``model.dtype`` (2 for bf16/fp16, 4 for fp32), ``a = 4`` bytes of the fp32 adapters.

Components (bytes)
------------------
weights      quantized linears: exactly the buffers :class:`~effine.quant.QuantLinear` allocates (nf4/fp4: n/2 codes
             + one absmax per 64-block, fp32, or with double quant uint8 + an fp32 scale per 256 blocks, i.e.
             0.516 or 0.563 byte/weight; int8: 1 byte + fp32 scale per group; int4: 0.5 + scales), plus everything
             else (embeddings, norms, lm_head, unquantized linears) at ``b`` bytes. Tied embeddings count once.
adapters     LoRA: ``r * (in + out)`` fp32 parameters per adapted linear (4 bytes each).
gradients    one per trainable parameter in its own dtype (LoRA: fp32; full fine-tuning: ``b``).
optimizer    AdamW ``exp_avg`` + ``exp_avg_sq``: 2 per trainable parameter, in the parameter's dtype (that is what
             ``torch.optim.AdamW`` allocates: fp32 for the adapters, ``b`` for full fine-tuning of a bf16 model).
activations  tensors autograd keeps for backward, per decoder layer: TRACED, not restated (:mod:`effine.plan.trace`).
             One layer of the model is built as training builds it (LoRA, fused ops, QAT, effine's attention
             backend) and its forward runs on short CPU rows under ``saved_tensors_hooks``; saved bytes are
             linear in the batch and, for the backends without a (T, T) term, in T, so two short traces give the
             bytes at any (B, T) exactly; eager attention and masked sliding windows are traced at T itself. A
             change to ``effine.ops`` changes the plan with no edit here. Layer 0 under LoRA keeps less (the frozen
             embedding needs no gradient): it is traced without an input gradient. Outside the layers: the final
             norm and the token ids (a few bytes per token), and the loss's saved dL/dh (below).
             Gradient checkpointing keeps only each layer's input (b*H per token and layer) and, while one layer
             is recomputed in backward, that layer's activations.
loss         the chunked loss (:mod:`effine.ops.loss`) at its forward peak: the chunk workspace ``c*V*b`` + 16 MiB
             (compute-dtype logits, ``c = min(n, 128 MiB / (b V))``, + an fp32 column block for the softmax),
             the final hidden states ``N*H*b``, the selected rows and dL/dh ``2*n*H*b``; full fine-tuning adds
             the ``V*H`` fp32 dL/dW accumulator and a ``V*H*b`` scratch. The (N, V) logits never exist.
workspace    the transient of whichever phase is the peak: backward of one layer (~``4*b*I + 12*H`` bytes per
             token, measured), dequantizing one quantized weight (~6 bytes per weight of the largest layer), or
             the optimizer step's temporaries (bounded by one copy of the trainable parameters: the foreach
             AdamW needs it; the fused AdamW used on CPU and CUDA needs less).
runtime      CPU: the process before any model exists, measured with torch 2.13 / transformers 5.24:
             ``import torch, transformers`` = 240 MiB RSS, and importing the model's code + first kernels
             (oneDNN, tokenizer-free) = +100 MiB. GPU: the CUDA context, assumed 0.5 GiB (not measured here: it
             is outside PyTorch's allocator and varies with driver and card).
allocator    CPU: glibc malloc keeps freed heap memory resident (tensors below its dynamic mmap threshold of up to
             32 MiB are carved from the heap and holes are not returned to the OS), so peak RSS exceeds the live
             peak. Calibrated on SmolLM2-135M and Gemma-3-270M (``bench/results/memory_plan.md``):
             ``ALLOC_CPU_FACTOR`` x (activations + loss + workspace) + ``ALLOC_CPU_FIXED``. Under jemalloc (what
             ``effine train`` uses when it finds one, :mod:`effine.system.allocator`) ``ALLOC_CPU_FACTOR_JEMALLOC``.
             GPU: the caching allocator's fragmentation, assumed 10% of the transient part (not calibrated).

Peak: the maximum over the phases "loss forward", "backward" and "optimizer step" of the live bytes; on CPU also
the load: ``from_pretrained`` maps the checkpoint file (its pages count in RSS while mapped: the file size) and
converts into the dense ``model.dtype`` weights; quantization happens after that, so a QLoRA run needs the dense
model in RAM first. (A checkpoint already in ``model.dtype`` is used zero-copy and adds nothing.)

    plan = plan_memory(load_config("configs/smollm2-135m-lora.yaml"))
    print(plan.format())
    plan_memory(cfg, gpu_memory_gb="a100-40").fits   # False / True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from effine.train.batching import packed_batch_rows
from effine.config import Config
from effine.errors import ConfigError
from effine.quant.swap import check_quant_settings
from effine.plan.inventory import (_TORCH_DTYPES, _build_inventory, _checkpoint_bytes, _Inventory, _model_config, _Norm)

__all__ = [
    "GPU_SIZES",
    "MemoryPlan",
    "parse_gpu",
    "plan_memory",
]

GiB = 2**30
MiB = 2**20

# --- calibrated / measured constants (see the module docstring and bench/results/memory_plan.md) --------------
RUNTIME_CPU_IMPORT = 240 * MiB  # RSS after `import torch, transformers` (python 3.11, torch 2.13, transformers 5.24)
RUNTIME_CPU_MODEL_CODE = 100 * MiB  # importing the model's modeling code, building it, first kernels
RUNTIME_CUDA_CONTEXT = GiB // 2  # assumption: CUDA context + cuBLAS/cuDNN handles, outside torch's allocator
ALLOC_CPU_FACTOR = 0.55  # glibc heap retention, as a share of the transient bytes (activations, loss, workspace)
ALLOC_CPU_FACTOR_JEMALLOC = 0.15  # the same under jemalloc as effine train configures it (system/allocator.py); fit:
# 0.13-0.18 on SmolLM2-135M and Gemma-3-270M, LoRA and QLoRA, 4x512 (bench/results/memory_plan.md, jemalloc rows)
ALLOC_CPU_FIXED = 0  # bytes
ALLOC_GPU_FACTOR = 0.10  # assumption: CUDA caching-allocator fragmentation on the transient bytes
BWD_WORKSPACE_PER_I = 4  # backward of one layer: ~(BWD_WORKSPACE_PER_I * b) * I + 12 * H bytes per token

# Usable memory of common accelerators, GiB (what the driver reports as total).
GPU_SIZES: dict[str, float] = {
    "h200": 139.8, "b200": 178.4, "h100": 79.6, "h100-80": 79.6, "h100-94": 93.0, "gh200": 94.5,
    "a100": 79.2, "a100-80": 79.2, "a100-40": 39.4, "l40s": 44.5, "l40": 44.5, "a6000": 47.5, "rtx6000": 47.5,
    "a40": 44.4, "l4": 22.0, "a10": 22.0, "a10g": 22.0, "rtx4090": 23.6, "rtx3090": 23.6, "rtx5090": 31.4,
    "rtx4080": 15.6, "rtx4070": 11.6, "rtx3080": 9.8, "v100": 15.8, "v100-32": 31.7, "t4": 14.6,
    "mi300x": 191.5, "mi250": 63.9,
}

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def parse_gpu(spec: str | float | int | None) -> tuple[float | None, str | None]:
    """``--gpu`` value -> (GiB, name): a number of GiB (``80``, ``"24"``, ``"24GB"``) or a card name (``h100``)."""
    if spec is None:
        return None, None
    if isinstance(spec, (int, float)):
        return float(spec), None
    s = str(spec).strip().lower().replace("_", "-").replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if s.endswith(suffix) and s[: -len(suffix)].replace(".", "", 1).isdigit():
            s = s[: -len(suffix)]
            break
    try:
        return float(s), None
    except ValueError:
        pass
    key = s.removeprefix("nvidia-").removeprefix("geforce-")
    if key in GPU_SIZES:
        return GPU_SIZES[key], key
    import difflib

    close = difflib.get_close_matches(key, list(GPU_SIZES), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"--gpu {spec!r}: not a size in GiB nor a known card ({', '.join(sorted(GPU_SIZES))}).{hint}")


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training run, by component (bytes). ``total`` is the predicted peak."""

    model: str
    device: str  # "cpu" or "cuda"
    method: str  # "lora", "qlora-nf4", "full", ...
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    attention: str  # "sdpa" or "eager"
    n_params: int
    n_trainable: int
    n_quantized: int  # weights stored quantized
    runtime: int
    weights_quantized: int
    weights_dense: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    workspace: int
    allocator: int
    loss_saved: int  # of `loss`: what the loss keeps for backward (dL/dh, or the log-probabilities when unchunked)
    load_peak: int  # CPU RAM while loading, above runtime (0 on a GPU plan: loading happens in host RAM)
    peak_phase: str  # "loss forward", "backward", "optimizer step" or "load"
    activation_bytes_per_token_layer: int  # the per-layer formula's value (no checkpointing)
    gpu_memory_gb: float | None = None
    gpu_name: str | None = None
    baseline: int = 0  # the part of `runtime` that exists before anything is loaded (what measure_peak subtracts)
    notes: list[str] = field(default_factory=list)

    COMPONENTS = ("runtime", "weights_quantized", "weights_dense", "adapters", "gradients", "optimizer",
                  "activations", "loss", "workspace", "allocator")
    LABELS = {"runtime": "runtime (process / CUDA context)", "weights_quantized": "weights, quantized",
              "weights_dense": "weights, dense", "adapters": "adapters (fp32)", "gradients": "gradients",
              "optimizer": "AdamW states", "activations": "activations (saved for backward)",
              "loss": "loss (chunked)", "workspace": "workspace (transient)", "allocator": "allocator overhead"}

    @property
    def train_total(self) -> int:
        return sum(getattr(self, c) for c in self.COMPONENTS)

    @property
    def total(self) -> int:
        """Predicted peak: the training peak, or on CPU the load peak when that is higher."""
        if self.device == "cpu":
            return max(self.train_total, self.runtime + self.load_peak)
        return self.train_total

    @property
    def above_baseline(self) -> int:
        """Predicted peak minus the process baseline: comparable to ``peak`` of
        :func:`effine.plan.measure.measure_peak`."""
        return self.total - self.baseline

    @property
    def largest(self) -> str:
        if self.device == "cpu" and self.runtime + self.load_peak > self.train_total:
            return "load"
        return max(self.COMPONENTS, key=lambda c: getattr(self, c))

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_gb is None:
            return None
        return self.total <= self.gpu_memory_gb * GiB

    def suggestions(self) -> list[str]:
        """What to change when it does not fit: every applicable change, the one acting on the largest part first."""
        out: list[tuple[int, str]] = []
        transient = self.activations + self.loss + self.workspace + self.allocator
        if not self.gradient_checkpointing and self.activations > 0.1 * self.total:
            out.append((self.activations, "model.gradient_checkpointing=true (only each layer's input is kept; "
                                          "one layer is recomputed at a time in backward)"))
        if transient > 0.1 * self.total:
            half_b = max(1, self.batch_size // 2)
            out.append((transient // 2, f"train.batch_size={half_b} with train.grad_accum doubled (same effective "
                                        "batch), or a lower data.max_length: activations and loss scale with B x T"))
        if self.method == "full":
            out.append((self.gradients + self.optimizer + self.workspace,
                        "adapter.method=lora: gradients and AdamW states only for the adapters"))
        if not self.method.startswith("qlora") and self.weights_dense > 0.1 * self.total:
            out.append((self.weights_dense * 3 // 4, "quant.method=nf4 with adapter.method=lora (QLoRA: ~0.52 byte "
                                                     "per frozen base weight)"))
        out.sort(key=lambda t: -t[0])
        return [s for _, s in out] or ["a larger card, or a smaller model"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total=self.total, train_total=self.train_total, above_baseline=self.above_baseline,
                 largest=self.largest, fits=self.fits)
        return d

    def format(self) -> str:
        total = self.total
        where = "CPU RAM (peak RSS)" if self.device == "cpu" else "GPU memory"
        head = (f"effine plan: {self.model}, {self.method}, batch {self.batch_size} x {self.max_length} tokens, "
                f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, attention "
                f"{self.attention}, on {self.device}")
        lines = [head,
                 f"parameters: {self.n_params:,} ({self.n_trainable:,} trainable, {self.n_quantized:,} stored "
                 f"quantized); activations {self.activation_bytes_per_token_layer:,} bytes/token/layer", "",
                 f"{'component':36s} {'GiB':>8s} {'share':>6s}", "-" * 52]
        for c in self.COMPONENTS:
            v = getattr(self, c)
            if v == 0 and c in ("weights_quantized", "adapters", "allocator"):
                continue
            lines.append(f"{self.LABELS[c]:36s} {v / GiB:8.3f} {100 * v / max(1, self.train_total):5.1f}%")
        lines.append("-" * 52)
        lines.append(f"{'training peak (' + self.peak_phase + ')':36s} {self.train_total / GiB:8.3f}")
        if self.device == "cpu":
            lines.append(f"{'load peak (file pages + dense copy)':36s} {(self.runtime + self.load_peak) / GiB:8.3f}")
        lines.append(f"{'predicted peak, ' + where:36s} {total / GiB:8.3f}")
        if self.gpu_memory_gb is not None:
            card = f"{self.gpu_name} " if self.gpu_name else ""
            lines.append("")
            if self.fits:
                lines.append(f"fits on a {card}{self.gpu_memory_gb:g} GiB GPU "
                             f"({100 * total / (self.gpu_memory_gb * GiB):.0f}% used)")
            else:
                lines.append(f"does NOT fit on a {card}{self.gpu_memory_gb:g} GiB GPU: needs {total / GiB:.2f} GiB; "
                             f"the largest part is {self.LABELS.get(self.largest, self.largest)}")
                lines += [f"  try: {s}" for s in self.suggestions()]
            sizes = [("rtx4090", 24), ("a100-40", 40), ("l40s", 48), ("h100", 80), ("h200", 141)]
            lines.append("  " + "  ".join(f"{n} ({g} GB): {'yes' if total <= GPU_SIZES[n] * GiB else 'no'}"
                                          for n, g in sizes))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The formula


def _quant_bytes(inv: _Inventory, cfg: Config, b: int) -> tuple[int, int]:
    """(bytes of the quantized buffers incl. bias, number of quantized weights): QuantLinear's own buffers."""
    from effine.quant.linear import QuantLinear

    total = n = 0
    by_name = {l.name: l for l in inv.linears}
    for name in inv.quant_names:
        l = by_name[name]
        q = QuantLinear(l.k, l.d, bias=l.bias, method=cfg.quant.method, group_size=cfg.quant.group_size,
                        blocksize=cfg.quant.blocksize, double_quant=cfg.quant.double_quant,
                        compute_dtype=_TORCH_DTYPES[cfg.model.dtype], device="meta")
        total += q.nbytes()
        n += l.k * l.d
    return total, n


def _activations(model_config, inv: _Inventory, cfg: Config, b: int, B: int, T: int, attn: str,
                 fused: bool) -> tuple[int, int, int, int]:
    """(saved bytes without checkpointing, saved layer inputs with checkpointing, bytes of the largest layer's
    activations for this batch (what one recomputed layer holds), the largest layer's bytes per token).

    Each decoder layer's bytes come from a traced forward of that layer (:mod:`effine.plan.trace`); outside the
    layers only the final norm and the token ids are added here (the loss is its own term)."""
    from effine.plan.trace import model_layer_bytes

    N = B * T
    traced_attn = "sdpa" if attn == "flash_attn" else attn  # flash-attn keeps what SDPA keeps; CPU has no flash
    layers, kinds = model_layer_bytes(model_config, cfg, traced_attn, fused, T)
    shared = sum(k.shared_at(B) for k in kinds)  # e.g. the rotary cos/sin every layer reads: once
    final = [n for n in inv.norms if n.layer is None]
    fin = final[-1] if final else _Norm("norm", inv.H, False, None)
    if fin.layer_norm:
        final_norm = b * inv.H + 8
    elif fused and fin.fusable:
        final_norm = b * inv.H + 4
    else:
        final_norm = 4 * inv.H + 4 + ((4 if fin.gemma else b) * inv.H if cfg.adapter.method == "full" else 0)
    final_norm += 16  # int64 token ids (embedding backward) and the loss's row index
    no_ckpt = sum(lb.at(B) for lb in layers) + shared + final_norm * N
    # with checkpointing a layer is recomputed in backward with its input requiring grad
    one_layer = max(k.at(B) + k.shared_at(B) for k in kinds)
    inputs = inv.L * b * inv.H * N + final_norm * N
    return int(no_ckpt), int(inputs), int(one_layer), int(max(lb.per_row for lb in layers) / T)


def _fused_ops(cfg: Config) -> bool:
    """Whether ``build_model`` swaps in the fused RMSNorm / gated MLP (``model.fused_ops``, ``EFFINE_FUSED``)."""
    if not getattr(cfg.model, "fused_ops", False):
        return False
    try:
        from effine.ops.fused import fused_enabled
    except ImportError:  # pragma: no cover
        return False
    return fused_enabled()


def plan_memory(cfg: Config, device: str = "cpu", gpu_memory_gb: float | str | None = None,
                model_config=None, fused: bool | None = None, world: int = 1, parallel: str = "none"
                ) -> MemoryPlan:
    """Predict the peak memory of training ``cfg`` (see the module docstring for every term).

    ``device``: "cpu" (peak RSS) or "cuda" (GPU memory; implied when ``gpu_memory_gb`` is given).
    ``gpu_memory_gb``: GiB of the card, or a name from :data:`GPU_SIZES` ("h100", "a100-40", "rtx4090"); the plan
    then says whether it fits. ``model_config``: a transformers config to plan for instead of ``cfg.model.name``'s
    (e.g. ``random_large_config("mistral-7b")``); nothing is downloaded or loaded then. ``fused``: whether the
    fused RMSNorm / gated MLP of :mod:`effine.ops.swap` are in use (None: ``model.fused_ops`` and EFFINE_FUSED).
        ``world`` / ``parallel``: the plan is per process of a ``world``-process run (:mod:`effine.plan.distributed`).
    """
    gpu_gb, gpu_name = parse_gpu(gpu_memory_gb)
    if gpu_gb is not None and device == "cpu":
        device = "cuda"
    device = "cuda" if str(device).startswith("cuda") or device == "gpu" else "cpu"
    check_quant_settings(cfg.quant, cfg.adapter.method)
    model_dir, ckpt_per_weight = None, None
    if model_config is None:
        model_config, model_dir, ckpt_per_weight = _model_config(cfg)
    inv = _build_inventory(model_config, cfg)
    b = _DTYPE_BYTES[cfg.model.dtype]
    T = cfg.data.max_length
    # rows per micro-batch: train.tokens_per_step fixes them; otherwise batch_size rows of T bound them (packed, a
    # micro-batch takes the rows of batch_size samples on average: never more than batch_size)
    B = cfg.train.batch_size if cfg.train.tokens_per_step is None else packed_batch_rows(1, 1, cfg)
    N, n = B * T, B * max(T - 1, 1)
    full = cfg.adapter.method == "full"
    notes: list[str] = []

    # attention backend as effine picks it (ops.attention.select_backend)
    attn = cfg.model.attn
    if attn in ("auto", "flash_attn"):
        attn = "eager" if (inv.attn_softcap and not (device == "cuda" and attn == "flash_attn")) else \
            ("tiled" if device == "cpu" and attn == "auto" else "sdpa")
    eager = attn == "eager"
    if eager:
        notes.append("eager attention keeps (B, Hq, T, T) fp32 probabilities per layer: memory grows with T^2")

    # weights
    q_bytes, n_quant = _quant_bytes(inv, cfg, b)
    n_params = inv.n_params
    dense = (n_params - n_quant) * b + inv.buffers_bytes
    if cfg.quant.method != "none":
        quant_bias = sum(l.d for l in inv.linears if l.bias and l.name in set(inv.quant_names))
        dense -= quant_bias * b  # biases of quantized linears are inside QuantLinear.nbytes()
    # adapters / trainable
    by_name = {l.name: l for l in inv.linears}
    n_lora = sum(cfg.adapter.r * (by_name[t].k + by_name[t].d) for t in inv.lora_targets)
    if full:
        n_train, adapters = n_params, 0
        grads, optim = n_params * b, 2 * n_params * b
    else:
        n_train, adapters = n_lora, 4 * n_lora
        grads, optim = 4 * n_lora, 8 * n_lora
    if cfg.quant.qat_bits:
        notes.append("QAT fake-quantization adds a weight-sized temporary per layer (not modelled)")

    # activations
    fused = _fused_ops(cfg) if fused is None else fused
    acts_full, acts_inputs, acts_one_layer, per_tok_layer = _activations(model_config, inv, cfg, b, B, T, attn,
                                                                         fused)
    ckpt = cfg.model.gradient_checkpointing
    # checkpointing: the loss runs while only the layer inputs exist; backward recomputes one layer at a time
    acts_fwd = acts_inputs if ckpt else acts_full
    acts_bwd = acts_inputs + acts_one_layer if ckpt else acts_full
    H, V, I = inv.H, inv.V, inv.mlp_I

    # loss (effine.ops.loss): forward peak of the fused chunked loss
    from effine.ops.loss import SCRATCH_BYTES, default_chunk_size

    chunk = min(n, default_chunk_size(V, cfg.train.loss_chunk_mb * 2**20, itemsize=b))
    ws = chunk * V * b + min(chunk * V * 4, max(SCRATCH_BYTES, chunk * 1024 * 4))  # logits + fp32 column block
    loss_saved = n * H * b  # dL/dh, kept until backward
    loss_fwd = ws + N * H * b + 2 * n * H * b
    if cfg.train.loss_impl == "reference" or inv.head_bias:
        # (n, V) logits in the compute dtype, upcast to fp32, fp32 log-softmax kept for backward
        loss_fwd = n * V * (b + 4 + 4) + N * H * b + n * H * b
        loss_saved = n * V * 4 + n * H * b
        notes.append("the loss builds the (n, V) logits of the labelled rows ("
                     + ("train.loss_impl=reference)" if not inv.head_bias else "a biased lm_head is not chunked)"))
    elif full:  # the fused loss accumulates dL/dW of the head in fp32 (+ a compute-dtype scratch) and keeps it
        loss_fwd += V * H * 4 + (V * H * b if b != 4 else 0)
        loss_saved += V * H * b
    # phases (bytes that exist in addition to weights, adapters, optimizer states)
    bwd_ws = (BWD_WORKSPACE_PER_I * b * I + 12 * H) * N
    deq_ws = 0
    if n_quant:
        biggest = max(by_name[q].k * by_name[q].d for q in inv.quant_names)
        deq_ws = 6 * biggest + b * biggest
    grads_during = grads if cfg.train.grad_accum > 1 else 0
    phases = {
        "loss forward": dict(activations=acts_fwd, loss=loss_fwd, workspace=0, gradients=grads_during),
        "backward": dict(activations=acts_bwd, loss=loss_saved + 2 * N * H * b, workspace=bwd_ws + deq_ws,
                         gradients=grads_during),
        "optimizer step": dict(activations=0, loss=0, workspace=n_train * (4 if not full else b), gradients=grads),
    }
    alloc_factor, alloc_fixed = (ALLOC_CPU_FACTOR, ALLOC_CPU_FIXED) if device == "cpu" else (ALLOC_GPU_FACTOR, 0)
    if device == "cpu":
        from effine.system.allocator import will_use_jemalloc

        if will_use_jemalloc():
            alloc_factor = ALLOC_CPU_FACTOR_JEMALLOC
            notes.append("allocator: jemalloc (effine train found one; EFFINE_ALLOCATOR=system plans for glibc)")
        else:
            notes.append("allocator: glibc malloc (no jemalloc found; with one the peak is lower)")

    def phase_total(p: dict) -> int:
        transient = p["activations"] + p["loss"] + p["workspace"]
        return transient + p["gradients"] + int(alloc_factor * transient) + alloc_fixed

    phase = max(phases, key=lambda k: phase_total(phases[k]))
    p = phases[phase]
    transient = p["activations"] + p["loss"] + p["workspace"]
    runtime = RUNTIME_CPU_IMPORT + RUNTIME_CPU_MODEL_CODE if device == "cpu" else RUNTIME_CUDA_CONTEXT
    baseline = RUNTIME_CPU_IMPORT if device == "cpu" else 0

    # load peak (host RAM): checkpoint file pages + dense copy in model.dtype; quantization comes after
    file_bytes, per_weight = _checkpoint_bytes(model_dir, n_params, model_config, ckpt_per_weight)
    dense_all = n_params * b + inv.buffers_bytes
    zero_copy = per_weight == b
    load_peak = (0 if zero_copy else file_bytes) + dense_all
    if n_quant:
        load_peak = max(load_peak, dense_all + q_bytes + deq_ws)
    if device == "cuda":
        notes.append(f"loading needs ~{(load_peak + RUNTIME_CPU_IMPORT) / GiB:.2f} GiB of host RAM (checkpoint "
                     "pages + the dense model, before quantization)")
        notes.append("GPU terms not calibrated here: CUDA context 0.5 GiB and 10% allocator fragmentation assumed")
    if device == "cpu" and zero_copy:
        notes.append("the checkpoint is already in model.dtype: its file pages are the weights (zero copy)")
    if cfg.data.packing is not False:
        notes.append("packing fills every row to max_length: the planned worst case is the typical case")
    name = cfg.model.name if model_dir is not None or ckpt_per_weight else (
        getattr(model_config, "name_or_path", "") or f"{inv.model_type} (config)")
    plan = MemoryPlan(
        model=name, device=device,
        method=(f"qlora-{cfg.quant.method}" if cfg.quant.method != "none" else cfg.adapter.method),
        batch_size=B, max_length=T, gradient_checkpointing=ckpt, attention=attn,
        n_params=n_params + (n_lora if not full else 0), n_trainable=n_train, n_quantized=n_quant,
        runtime=runtime, weights_quantized=q_bytes, weights_dense=dense, adapters=adapters,
        gradients=p["gradients"], optimizer=optim, activations=p["activations"], loss=p["loss"],
        workspace=p["workspace"], allocator=int(alloc_factor * transient) + alloc_fixed, loss_saved=loss_saved,
        load_peak=load_peak,
        peak_phase=phase, activation_bytes_per_token_layer=per_tok_layer, gpu_memory_gb=gpu_gb, gpu_name=gpu_name,
        baseline=baseline, notes=notes,
    )
    if world == 1 and parallel in ("none", "auto"):
        return plan
    from effine.plan.distributed import per_rank  # [distributed hook] one process of a world-process run

    return per_rank(plan, inv, cfg, b, world, parallel)
