"""INTERFACES §3: under DeepSpeed (which averages gradients over ranks) two ranks holding unequal view counts give
the gradients one process computes on their concatenated batch: every element of the global batch weighs the same.
Two real processes, gloo, DeepSpeed ZeRO-2 engines from training.engine, the loss from training.step."""

from __future__ import annotations

import multiprocessing
import os
import socket

import torch

from onegen.train_config import TrainSection

# rank -> (samples, views): unequal view counts AND unequal sample counts
SHARES = {0: (3, 1), 1: (1, 2)}
SIZE = (16, 8, 8)


def _model():
    from model.nextdit import NextDiT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return NextDiT.from_preset("nextdit-tiny")


def _batch(rank: int):
    from model.views import Batch

    samples, views = SHARES[rank]
    g = torch.Generator().manual_seed(100 + rank)
    return Batch(latents=torch.randn(samples, views, *SIZE, generator=g),
                 target_mask=torch.tensor([[v == 0 for v in range(views)]] * samples),
                 view_mask=torch.ones(samples, views, dtype=torch.bool),
                 prompts=[f"prompt {rank} {i}" for i in range(samples)])


def _text():
    from training.step import TextEncoding

    def encode(prompts):
        g = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        return torch.randn(len(prompts), 8, 32, generator=g), torch.ones(len(prompts), 8, dtype=torch.long)

    return TextEncoding(encode, torch.zeros(1, 8, 32), torch.ones(1, 8, dtype=torch.long))


def _runner(engine):
    from model.flow import FlowConfig
    from training.step import StepRunner

    return StepRunner(engine, _text(), FlowConfig(text_dropout_prob=0.0, loss_on="all"),
                      channel_mask=torch.tensor([True] * 12 + [False] * 4))


def _train_section() -> TrainSection:
    return TrainSection(data={"builds": [{"uri": "unused"}]},
                        stages=[{"name": "s", "steps": 1, "resolution": 64, "mixture": [{"task": "text2image"}]}],
                        global_batch_size=2, zero_stage=2)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from training.engine import init_distributed, make_engine

    init_distributed("gloo")
    engine = make_engine(_model(), _train_section(), total_steps=1, per_rank_batch=1)
    loss, _ = _runner(engine).loss(_batch(rank), torch.Generator().manual_seed(7 + rank), dist.group.WORLD)
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()


def test_unequal_view_counts_on_two_ranks_give_the_one_process_gradients(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(rank, port, out)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    distributed = torch.load(out)

    # one process, both shares: (sum_0 + sum_1) / (count_0 + count_1), each share with its rank's random draws
    model = _model()
    runner = _runner(model)
    sums, counts = [], []
    for rank in (0, 1):
        loss, stats = runner.loss(_batch(rank), torch.Generator().manual_seed(7 + rank), None)
        sums.append(loss * stats["loss_count"])
        counts.append(int(stats["loss_count"]))
    assert counts[0] != counts[1]
    (sum(sums) / sum(counts)).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(distributed[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    # the unweighted mean of the two ranks' own means differs: the test can fail
    wrong = sum(s / c for s, c in zip(sums, counts)) / 2
    assert not torch.isclose(wrong, sum(sums) / sum(counts))
