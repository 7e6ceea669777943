"""Several processes (torchrun, gloo, CPU): 2 ranks x micro-batch b == 1 rank x 2b; resume across world sizes;
a killed or signalled rank; two "nodes" on localhost; the `effine train --nproc 2` command end to end.

Tolerance (fp32): per-step loss within 2e-6 absolute (measured <= 6e-7), trainable weights within 2e-5 absolute
(measured <= 2e-6 after 3 AdamW steps at lr 1e-3; the ranks sum the same gradients in a different order).
A wrong shard (a sample lost or repeated) or a per-rank loss normaliser moves the loss by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from effine.config import TrainConfig
from effine.data import pack_examples
from effine.train.dist_checkpoint import is_dist_checkpoint, load_any_checkpoint
from effine.train.distributed import SINGLE, Dist
from effine.train.loop import micro_batches
from effine.train.optim import build_optimizer
from tests.integration import dist_worker as w

ROOT = Path(__file__).resolve().parents[2]
LOSS_ATOL, WEIGHT_ATOL = 2e-6, 2e-5


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _rows(batch: dict) -> list[list[int]]:
    """The real (unpadded) rows of a collated batch."""
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"]) if m.any()]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_rank_shards_are_the_single_process_order(world, packed):
    """Every global micro-batch, split over the ranks, is exactly one process's micro-batch: none lost or repeated."""
    data = w.examples(25)  # 25 = 6 x 4 + 1 = 4 x 6 + 1: the last batch of an epoch has 1 sample
    if packed:
        data = pack_examples(data, 40)
    cfg = TrainConfig(batch_size=2 * world, seed=5)
    n_batches = 3 * -(-len(data) // cfg.batch_size)  # three epochs, each ending on a short batch
    single = micro_batches(data, cfg, 0, 0, 0)
    ranks = [micro_batches(data, cfg, 0, 0, 0, Dist(world=world, rank=r)) for r in range(world)]
    dummies = 0
    for _ in range(n_batches):
        epoch, index, whole, where = next(single)
        parts = [next(r) for r in ranks]
        assert {(e, i) for e, i, _, _ in parts} == {(epoch, index)}
        assert all(rows == where for *_, rows in parts)  # each rank knows the rows (file:line) of the global batch
        assert sum((_rows(b) for _, _, b, _ in parts), []) == _rows(whole)
        for _, _, b, _ in parts:
            if not b["attention_mask"].any():  # an empty shard: a dummy row without any label
                dummies += 1
                assert (b["labels"] == -100).all()
    rem = len(data) % cfg.batch_size  # each epoch's last batch: fewer samples than ranks leaves some ranks empty
    assert dummies == 3 * (world - rem if 0 < rem < world else 0)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Run every scenario once on 2 ranks (one torchrun); also a one-process checkpoint for the 1 -> 2 resume."""
    out = tmp_path_factory.mktemp("dist")
    single = w.run("llama", "lora", SINGLE, w.train_config(1, "none", 4, save_every=2), out / "single")
    ckpt = out / "single" / "checkpoints" / "step-000002"
    proc = subprocess.run(_torchrun("--standalone", "--nproc-per-node=2", "-m", "tests.integration.dist_worker",
                                    "all", str(out), str(ckpt)),
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, single


def _assert_same(got: dict, ref: dict, steps: slice = slice(None)) -> None:
    assert len(got["losses"]) == len(ref["losses"][steps])
    for a, b in zip(got["losses"], ref["losses"][steps]):
        assert abs(a - b) <= LOSS_ATOL, (got["losses"], ref["losses"])
    assert set(got["weights"]) == set(ref["weights"])
    diff = max(float((got["weights"][k] - ref["weights"][k]).abs().max()) for k in ref["weights"])
    assert diff <= WEIGHT_ATOL, diff


_REFERENCES: dict[tuple[str, str], dict] = {}  # one-process runs, shared by the DDP and the FSDP comparison


def _reference(family: str, method: str, run_dir: Path) -> dict:
    if (family, method) not in _REFERENCES:
        _REFERENCES[family, method] = w.run(family, method, SINGLE, w.train_config(1, "none", 3), run_dir)
    return _REFERENCES[family, method]


@pytest.mark.parametrize("name,family,method,parallel", w.SCENARIOS, ids=[s[0] for s in w.SCENARIOS])
def test_two_ranks_equal_one_rank_with_the_global_batch(two_rank_results, tmp_path, name, family, method, parallel):
    out, _ = two_rank_results
    got = torch.load(out / f"{name}.pt", weights_only=True)
    ref = _reference(family, method, tmp_path)
    _assert_same(got, ref)
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) < 1e-2  # sanity: values, not NaNs
    if method == "qlora":  # the quantized base really was sharded: its uint8 codes are FSDP shards
        assert any(n.endswith("qweight") for n in got["sharded_uint8"]), got["sharded_uint8"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_checkpoint_of_two_ranks_resumes_in_one_process(two_rank_results, tmp_path, parallel):
    out, _ = two_rank_results
    ckpt = out / f"save2-{parallel}" / "checkpoints" / "step-000002"
    # the periodic checkpoint and the one every run writes at its last step (train.keep_checkpoints=2)
    assert is_dist_checkpoint(ckpt) and sorted(p.name for p in ckpt.parent.iterdir()) == ["step-000002", "step-000004"]
    meta = json.loads((ckpt / "distributed.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch_size"] == 2 * w.B
    resumed = w.run("llama", "lora", SINGLE, w.train_config(1, "none", 4), tmp_path, resume_from=ckpt)
    _assert_same(resumed, torch.load(out / f"save2-{parallel}.pt", weights_only=True), slice(2, None))


def test_one_process_checkpoint_resumes_on_two_ranks(two_rank_results):
    out, single = two_rank_results
    _assert_same(torch.load(out / "resume1-fsdp.pt", weights_only=True), single, slice(2, None))


def test_resume_refuses_another_global_batch(two_rank_results):
    out, _ = two_rank_results
    ckpt = out / "save2-fsdp" / "checkpoints" / "step-000002"
    model = w.build("llama", "lora")
    opt = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], TrainConfig())
    with pytest.raises(Exception, match="global micro-batch of 4 samples"):
        load_any_checkpoint(ckpt, model, opt, SINGLE, global_batch=2)


def _endless(out: Path) -> subprocess.Popen:
    return subprocess.Popen(_torchrun("--standalone", "--nproc-per-node=2", "-m", "tests.integration.dist_worker",
                                      "endless", str(out)), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"condition not reached (rc {proc.poll()}): {proc.communicate()[0][-3000:]}")
        time.sleep(0.2)


def _committed(out: Path) -> list[Path]:
    return sorted(p for p in (out / "endless" / "checkpoints").glob("step-*") if is_dist_checkpoint(p))


def _loads_in_one_process(ckpt: Path) -> int:
    model = w.build("llama", "lora")
    opt = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], TrainConfig())
    return load_any_checkpoint(ckpt, model, opt, SINGLE, global_batch=2 * w.B).step


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_signalled_rank_ends_the_job_and_leaves_a_loadable_checkpoint(tmp_path, sig):
    """SIGKILL on rank 1: the job exits non-zero quickly. SIGTERM on rank 1: all ranks checkpoint, then stop."""
    proc = _endless(tmp_path)
    _wait_for(lambda: len(_committed(tmp_path)) >= 1 and (tmp_path / "pid-1").exists(), proc, 120)
    os.kill(int((tmp_path / "pid-1").read_text()), sig)
    t0 = time.monotonic()
    try:
        log, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end within 60 s of a rank being signalled")
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    last = _committed(tmp_path)[-1]
    step = _loads_in_one_process(last)
    assert step == int(last.name.split("-")[1])
    if sig == signal.SIGTERM:  # both ranks agreed to stop and checkpointed together (no half-written checkpoint)
        assert "stop signal on one of the ranks" in log, log[-2000:]
        assert not list((tmp_path / "endless" / "checkpoints").glob("*.tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_with_c10d_rendezvous(tmp_path):
    """Two torchrun launchers (one per "node", one process each) meet at a c10d endpoint, as on two machines."""
    port = _free_port()
    nodes = [subprocess.Popen(_torchrun("--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=effine-test",
                                        "-m", "tests.integration.dist_worker", "one", str(tmp_path)),
                              env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [n.communicate(timeout=180)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    _assert_same(torch.load(tmp_path / "one.pt", weights_only=True), _reference("llama", "lora", tmp_path / "ref"))


def test_cli_nproc_trains_qlora_on_two_ranks_and_rank0_alone_writes(tmp_path, tiny_llama_dir):
    from tests.conftest import chat_rows, write_jsonl

    data = write_jsonl(tmp_path / "chats.jsonl", chat_rows(24))
    sets = [f"model.name={tiny_llama_dir}", "model.dtype=fp32", f"data.path={data}", "data.max_length=64",
            "data.eval_fraction=0.2", f"output.dir={tmp_path}/run", "adapter.r=4", "adapter.alpha=8",
            "train.lr=5e-3", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=0", "train.max_steps=4",
            "train.save_every=2", "train.parallel=fsdp", "quant.method=nf4", "eval.max_new_tokens=2",
            "eval.prompts_from_eval=0", "data.packing=false"]
    # QLoRA: the quantized base is sharded, gathered and rebuilt on rank 0
    (tmp_path / "cfg.yaml").write_text("{}\n")  # every setting comes from --set
    cmd = [sys.executable, "-m", "effine", "train", str(tmp_path / "cfg.yaml"), "--nproc", "2"]
    cmd += sum((["--set", s] for s in sets), [])
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert summary["steps"] == 4 and proc.stdout.count('"run_dir"') == 1
    log = (run / "train.log").read_text()
    assert log.count("before: eval_loss") == 1 and "FSDP2 over 2 processes" in log
    assert "quantized tensors sharded" in log
    assert "global batch: 2 x 1 accum x 2 processes = 4 samples" in log
    train_rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # the adapter is the standard single-file PEFT format, gathered from the shards
    from safetensors.torch import load_file

    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert is_dist_checkpoint(run / "checkpoints" / "step-000002")
