"""The loss under data parallelism (INTERFACES.md §3): two gloo ranks on 127.0.0.1 with unequal numbers of views in the
loss and different channel masks, DDP averaging the gradients, give the gradients of one process on the concatenated
batch. Same model init, and the σ and noise of the global batch are injected, so the two runs see the same numbers."""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model.flow import FlowConfig, flow_matching_loss
from stand_in_denoisers import TinyDenoiser

WORLD = 2
TIMEOUT_S = 60
# rank 0: samples 0-2, each with 2 views in the loss (view 0 a clean condition); rank 1: sample 3, 1 view in the loss
# (view 2 is padding), and the pad channels 12..15 masked on rank 0 only.
RANK_SAMPLES = {0: slice(0, 3), 1: slice(3, 4)}


def global_batch():
    g = torch.Generator().manual_seed(1234)
    batch, views = 4, 3
    x0 = torch.randn(batch, views, 16, 4, 4, generator=g)
    text = torch.randn(batch, 5, 8, generator=g)
    text_mask = torch.ones(batch, 5, dtype=torch.long)
    text_mask[1, 3:] = 0
    noise = torch.randn(x0.shape, generator=g)
    sigmas = torch.rand(batch, views, generator=g) * 0.9 + 0.05
    targets = torch.tensor([[False, True, True]] * batch)
    view_mask = torch.tensor([[True, True, True]] * 3 + [[True, True, False]])
    channels = torch.ones(batch, 16, dtype=torch.bool)
    channels[:3, 12:] = False
    return dict(x0=x0, text=text, text_mask=text_mask, noise=noise, sigmas=sigmas, targets=targets,
                view_mask=view_mask, channels=channels)


CFG = FlowConfig(clean_condition_prob=1.0, text_dropout_prob=0.0)


def model_init() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser()


def loss_of(model, batch, part=slice(None), **kwargs):
    return flow_matching_loss(model, batch["x0"][part], batch["text"][part], batch["text_mask"][part],
                              batch["targets"][part], CFG, torch.Generator().manual_seed(0),
                              channel_mask=batch["channels"][part], view_mask=batch["view_mask"][part],
                              noise=batch["noise"][part], sigmas=batch["sigmas"][part], **kwargs)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        model = torch.nn.parallel.DistributedDataParallel(model_init())
        loss, stats = loss_of(model, global_batch(), RANK_SAMPLES[rank],
                              process_group=torch.distributed.group.WORLD)
        loss.backward()  # DDP all-reduces the mean of the gradients
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        torch.save({"grads": grads, "loss": loss.detach(), "stats": stats}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_with_unequal_views_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"the two gloo ranks did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = model_init()
    batch = global_batch()
    loss, stats = loss_of(model, batch)
    loss.backward()

    # the ranks really were unequal: 3 samples × 2 views × 12 channels vs 1 sample × 1 view × 16 channels
    assert ranks[0]["stats"]["in_loss"].sum().item() == 6 and ranks[1]["stats"]["in_loss"].sum().item() == 1
    assert ranks[0]["stats"]["loss_count"].item() == 6 * 12 * 16 and ranks[1]["stats"]["loss_count"].item() == 16 * 16
    for r in ranks:
        assert torch.equal(r["stats"]["global_count"], stats["loss_count"])
    # per-rank losses are world_size · local sum / global count; their mean is the global loss
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / WORLD, loss.detach(), rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # the naive per-rank mean (no global count) would weigh rank 1's single view like rank 0's six
    naive = [loss_of(model_init(), batch, RANK_SAMPLES[r])[0] for r in range(WORLD)]
    assert abs(((naive[0] + naive[1]) / 2 - loss).item()) > 1e-3
