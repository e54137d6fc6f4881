"""Gradient averaging over micro-batches and processes (library/training/grad_sync.py), with two real gloo
processes: the mean over every micro-batch of both, half-precision gradients reduced in their own
dtype and in bounded buckets, tensors without a gradient anywhere left without one."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from library.training.grad_sync import average_gradients, buckets

BUCKET = 1024  # bytes: small, so that the tensors below need several buckets


def _gradients(rank: int):
    """Per process: (params with gradients set, micro-batch count). Rank 0 ran 1 micro-batch, rank 1 ran 2;
    `only_rank1` got a gradient in rank 1 only, `unused` in neither."""
    generator = torch.Generator().manual_seed(rank)
    shapes = {"a": (64, 3), "b": (5,), "c": (300,), "big": (40, 20)}
    params = {}
    for name, shape in shapes.items():
        p = torch.zeros(shape, requires_grad=True)
        p.grad = torch.randn(shape, generator=generator)
        params[name] = p
    half = torch.zeros(200, dtype=torch.bfloat16, requires_grad=True)
    half.grad = torch.randn(200, generator=generator).to(torch.bfloat16)
    params["half"] = half
    only = torch.zeros(7, requires_grad=True)
    if rank == 1:
        only.grad = torch.randn(7, generator=generator)
    params["only_rank1"] = only
    params["unused"] = torch.zeros(3, requires_grad=True)
    params["transposed"] = torch.zeros(6, 4, requires_grad=True)
    params["transposed"].grad = torch.randn(4, 6, generator=generator).t()  # not contiguous
    return params, rank + 1


def _worker(rank: int, port: int, out: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []
    reduce = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        calls.append((tensor.dtype, tensor.numel() * tensor.element_size()))
        return reduce(tensor, *args, **kwargs)

    dist.all_reduce = spy
    try:
        params, micro = _gradients(rank)
        average_gradients(list(params.values()), micro, num_processes=2, bucket_bytes=BUCKET)
    finally:
        dist.all_reduce = reduce
        dist.destroy_process_group()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}
    torch.save({"grads": grads, "calls": calls}, os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gradsync"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def test_two_processes_hold_the_mean_over_all_their_micro_batches(two_process_results):
    (p0, micro0), (p1, micro1) = _gradients(0), _gradients(1)
    total = micro0 + micro1  # 3 micro-batches in all: the mean is the sum of both sums / 3
    for result in two_process_results:
        grads = result["grads"]
        for name in ("a", "b", "c", "big", "transposed"):
            want = (p0[name].grad + p1[name].grad) / total
            assert torch.allclose(grads[name], want, atol=1e-6), name
        # a tensor that got a gradient in one process only counts as zero in the other
        assert torch.allclose(grads["only_rank1"], p1["only_rank1"].grad / total, atol=1e-6)
        assert grads["unused"] is None  # no process had one: it keeps none (the optimizer skips it)
        half = grads["half"]
        assert half.dtype == torch.bfloat16
        want = (p0["half"].grad.float() + p1["half"].grad.float()) / total
        assert torch.allclose(half.float(), want, rtol=2e-2, atol=1e-2)
    assert torch.equal(two_process_results[0]["grads"]["half"], two_process_results[1]["grads"]["half"])


def test_the_reduction_stays_in_each_dtype_and_in_bounded_buckets(two_process_results):
    calls = two_process_results[0]["calls"]
    assert calls == two_process_results[1]["calls"]  # both processes made the same collective calls
    flags, *reductions = calls
    assert flags == (torch.float32, 4 * (8 + 1))  # one flag per tensor and the micro-batch count
    # the bf16 gradient went over the wire as bf16, not promoted to float32 with the others
    assert (torch.bfloat16, 200 * 2) in reductions
    sizes = {"c": 300 * 4, "big": 40 * 20 * 4}
    for dtype, nbytes in reductions:
        assert nbytes <= BUCKET or nbytes in sizes.values()  # only a tensor larger than a bucket exceeds it
    # every gradient someone had is reduced exactly once: 8 tensors minus `unused`
    expected = sum(n * 4 for n in (64 * 3, 5, 300, 40 * 20, 7, 24)) + 200 * 2
    assert sum(nbytes for _, nbytes in reductions) == expected


def test_one_process_divides_by_its_micro_batches_and_keeps_missing_gradients_missing():
    params, _ = _gradients(1)
    before = {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}
    average_gradients(list(params.values()), 4)
    for name, p in params.items():
        if before[name] is None:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad.float(), before[name].float() / 4, rtol=1e-2)


def test_buckets_group_by_dtype_in_order_and_respect_the_size():
    f = [torch.zeros(10), torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16), torch.zeros(100), torch.zeros(5)]
    groups = buckets(f, 80)
    assert [[id(t) for t in g] for g in groups] == [[id(f[0]), id(f[1])], [id(f[2])], [id(f[3])], [id(f[4])]]
