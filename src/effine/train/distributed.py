"""Training on several processes: torchrun's world, data sharding, the global loss normaliser, DDP and FSDP2.

    torchrun --nproc-per-node 2 -m effine train CONFIG      (or: effine train CONFIG --nproc 2)

One object, :class:`Dist`, is all the loop, the step and the run see of it. Its single-process instance
(``SINGLE``) does nothing: no collective, no wrapping, the whole micro-batch for the one rank. With N processes:

* **data**: the loop draws *global* micro-batches of ``batch_size x N`` samples (the same order one process with
  that batch size draws, packing included) and each rank collates its own contiguous slice of every one of them
  (:meth:`Dist.collate_shard`). A global batch with fewer samples than ranks gives the empty ranks a zero-weight
  dummy row (no label, no counted token) so every rank still runs the forward/backward the collectives need.
* **loss**: the supervised-token count of the whole global window is all-reduced before backward, and each rank's
  loss is multiplied by N because DDP and FSDP *average* gradients over ranks: the result is the gradient of the
  global window's mean loss, so N ranks x batch b == 1 rank x batch N*b (up to float summation order).
* **DDP** (``train.parallel: ddp``): the model is wrapped in a small module whose forward is the loss, so DDP's
  hooks see the forward effine actually runs (the backbone, then the chunked output head). Only trainable
  parameters are bucketed (DDP skips frozen ones); micro-batches before the last of a window run under
  ``no_sync()``.
* **FSDP2** (``train.parallel: fsdp``): ``fully_shard`` on every decoder layer, then on the same loss module as
  the root (embeddings, final norm and head). Parameters compute in the dtype they are stored in (the base in
  ``model.dtype``, LoRA adapters in fp32, as in one process); gradients are reduced in fp32
  (``MixedPrecisionPolicy``). ``train.fsdp_cpu_offload`` keeps the shards and optimizer state in CPU memory.
  QLoRA: the quantized base's uint8 codes and fp32 scales are turned from buffers into frozen parameters first, so
  FSDP shards them like any weight (it all-gathers non-float parameters as raw bytes, without casting).
* **failures**: SIGTERM / SIGINT on any rank set a flag; the ranks agree on it after every step (one tiny
  all-reduce) and all stop, checkpoint and exit together. Every collective has ``train.dist_timeout_s``: a dead
  rank makes the others fail with an error (and torchrun stops the job), never hang forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from effine.config import TrainConfig
from effine.data import collate
from effine.errors import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LossModule(nn.Module):
    """``forward(batch) -> (loss sum, supervised tokens)``: the model's loss as one module call, for DDP/FSDP hooks."""

    def __init__(self, model: nn.Module, impl: str = "chunked", chunk_bytes: int | None = None):
        super().__init__()
        self.model = model
        self.impl = impl
        self.chunk_bytes = chunk_bytes

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        from effine.ops.model_loss import loss_sum

        return loss_sum(self.model, batch, impl=self.impl, chunk_bytes=self.chunk_bytes)


@dataclass
class Dist:
    """The world this process trains in; the default instance is one process, where every method is a no-op."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its CPU threads)
    parallel: str = "none"  # none | ddp | fsdp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrapped: nn.Module | None = None  # the DDP / FSDP root module whose forward is the loss
    _stop: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.parallel != "none"

    # --- data --------------------------------------------------------------------------------------------------
    def global_config(self, cfg: TrainConfig) -> TrainConfig:
        """The train config of the one process that sees what all ranks see together: batch_size x world."""
        return replace(cfg, batch_size=cfg.batch_size * self.world) if self.world > 1 else cfg

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [start, end) of a global batch of n samples (sizes differ by at most 1).

        Contiguous, not strided: the batch order groups similar lengths, so neighbours pad least together.
        """
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def collate_shard(self, items: list, pad_id: int) -> dict:
        """Collate this rank's slice of a global micro-batch; an empty slice becomes a zero-weight dummy row."""
        start, end = self.shard_bounds(len(items))
        if end > start:
            return collate(items[start:end], pad_id)
        batch = collate(items[:1], pad_id)
        batch["labels"].fill_(-100)  # no supervised token: contributes nothing to loss or gradient
        batch["attention_mask"].zero_()  # and no counted token (the model never reads the mask, see model_inputs)
        return batch

    # --- collectives -------------------------------------------------------------------------------------------
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. filling a cache), then the others; one process: just run it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # --- the step ----------------------------------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; the loss is scaled by N so the result is their sum."""
        return float(self.world) if self.wrapped is not None else 1.0

    def loss_sum(self, model: nn.Module, batch: dict, impl: str, chunk_bytes: int | None = None
                 ) -> tuple[torch.Tensor, int]:
        if self.wrapped is None:
            from effine.ops.model_loss import loss_sum

            return loss_sum(model, batch, impl=impl, chunk_bytes=chunk_bytes)
        return self.wrapped(batch)

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool):
        """Inside an accumulation window only the last micro-batch's backward communicates."""
        if self.wrapped is None or enabled:
            if self.parallel == "fsdp" and self.wrapped is not None:
                self.wrapped.set_requires_gradient_sync(True)
            yield
        elif self.parallel == "ddp":
            with self.wrapped.no_sync():
                yield
        else:  # fsdp: keep unsharded gradients until the last micro-batch, then reduce-scatter once
            self.wrapped.set_requires_gradient_sync(False)
            yield

    # --- stopping together -------------------------------------------------------------------------------------
    def on_signal(self, signum, frame) -> None:
        self._stop = True

    def agree_to_stop(self, local: bool = False) -> bool:
        """True on every rank when any rank got SIGTERM/SIGINT (``local``: this rank's own signal handling saw one)
        since the last window (one all-reduce per window)."""
        return self.all_reduce_sum([1.0 if (self._stop or local) else 0.0])[0] > 0


SINGLE = Dist()


class _Quiet:
    """The log and metrics of ranks other than 0: rank 0 alone prints and writes (its numbers are global)."""

    def __call__(self, msg: str) -> None:
        pass

    def write(self, kind: str, **values) -> None:
        pass

    def close(self) -> None:
        pass


quiet = _Quiet()


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) in a plain process."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def resolve_parallel(parallel: str, world: int) -> str:
    if parallel == "auto":
        return "none" if world == 1 else "ddp"
    if parallel == "none" and world > 1:
        raise ConfigError(f"train.parallel: 'none' with {world} processes would train {world} independent copies; "
                          "use ddp or fsdp (or auto), or run one process.")
    return parallel


def init_distributed(cfg: TrainConfig, device: torch.device) -> Dist:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when there is one; else return ``SINGLE``."""
    world, rank, local_rank = world_from_env()
    parallel = resolve_parallel(cfg.parallel, world)
    if parallel == "none":
        return SINGLE
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(f"train.parallel={parallel} needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR): "
                          "run `effine train CONFIG --nproc N` or "
                          "`torchrun --nproc-per-node N -m effine train CONFIG`.")
    import torch.distributed as tdist

    if device.type == "cuda":
        if device.index is not None and world > 1:
            raise ConfigError(f"model.device: {device} would put all {world} processes on one GPU; use cuda (or "
                              "auto): each process takes the GPU numbered by its LOCAL_RANK.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                 timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Dist(world=world, rank=rank, local_rank=local_rank, local_world=local_world, parallel=parallel,
                device=device)


def exec_torchrun(nproc: int, effine_args: list[str]) -> None:
    """Replace this process by ``torchrun --standalone --nproc-per-node N -m effine ARGS`` (one machine)."""
    import sys

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc: already running under torchrun; drop --nproc (torchrun sets the world size).")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "effine", *effine_args]
    os.execv(sys.executable, argv)


_PEER_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "peer")


def run_as_rank(main) -> int:
    """Run the CLI's ``main`` as one torchrun worker: errors are printed with this rank and recorded for torchrun."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import record

    world, rank, _ = world_from_env()

    @record  # torchrun's failure summary then shows this rank's exception, not only its exit code
    def entry() -> int:
        try:
            rc = main()
        except Exception as e:
            lost = any(s in str(e).lower() for s in _PEER_LOST)
            hint = (" -- another process of the job stopped or died (its own error is above, and in torchrun's "
                    "summary); resume from the last committed checkpoint with --resume") if lost else ""
            print(f"effine: rank {rank}/{world}: {type(e).__name__}: {e}{hint}", file=sys.stderr, flush=True)
            raise
        if rc:
            print(f"effine: rank {rank}/{world} exits with code {rc}", file=sys.stderr, flush=True)
        return rc

    return entry()


def install_stop_handlers(dist: Dist) -> dict:
    """SIGTERM/SIGINT set the stop flag instead of raising mid-collective; returns the old handlers."""
    return {s: signal.signal(s, dist.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}


def shutdown(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


# --- wrapping ----------------------------------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (FSDP's unit): the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"train.parallel=fsdp: {type(model).__name__} has no list of decoder layers to shard.")
    return list(max(lists, key=len))


def quant_buffers_to_params(model: nn.Module) -> int:
    """Turn QuantLinear's quantized buffers (codes, scales) into frozen parameters so FSDP shards them.

    Same names, same tensors, same state dict; only the registration changes (0-d scalars stay buffers: there is
    nothing to shard). Returns the number of tensors converted.
    """
    from effine.quant.linear import QuantLinear

    n = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            for name, buf in list(mod.named_buffers(recurse=False)):
                if buf is None or buf.dim() == 0:
                    continue
                del mod._buffers[name]
                mod.register_parameter(name, nn.Parameter(buf, requires_grad=False))
                n += 1
    return n


def wrap_model(model: nn.Module, dist: Dist, cfg: TrainConfig, log=print) -> None:
    """Wrap ``model`` for DDP or FSDP2 in place (FSDP replaces its parameters by shards); sets ``dist.wrapped``."""
    if dist.parallel == "none":
        return
    root = LossModule(model, cfg.loss_impl, cfg.loss_chunk_mb * 2**20)
    if dist.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.wrapped = DDP(root, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                           broadcast_buffers=False)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"parallel: DDP over {dist.world} processes ({n:,} trainable parameters all-reduced)")
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    n_quant = quant_buffers_to_params(model)
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.fsdp_cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mp_policy=mp, offload_policy=offload)
    dist.wrapped = fully_shard(root, mp_policy=mp, offload_policy=offload)
    log(f"parallel: FSDP2 over {dist.world} processes, {len(layers)} decoder layers + root sharded"
        + (f", {n_quant} quantized tensors sharded" if n_quant else "")
        + (", CPU offload" if cfg.fsdp_cpu_offload else ""))


def full_state_on_main(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """Every parameter and buffer as full CPU tensors on rank 0 (a collective: all ranks call it); None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.parallel != "fsdp":
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.is_main else None
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.is_main else None


def unshard_on_main(model: nn.Module, dist: Dist, rebuild, leave: bool = True) -> nn.Module:
    """After training: the whole trained model on rank 0, for evaluation and the standard single-file outputs.

    DDP: every rank already holds it. FSDP: the full state dict is gathered to rank 0 (a collective) and loaded into
    a freshly built, unsharded model (``rebuild()``). Then leaves the process group (unless ``leave`` is False);
    other ranks get ``model`` back.
    """
    if not dist.active:
        return model
    if dist.parallel == "fsdp":
        full = full_state_on_main(model, dist)
        if dist.is_main:
            del model
            model = rebuild()
            model.load_state_dict(full, strict=True)
    dist.wrapped = None
    if leave:
        shutdown(dist)
    return model
