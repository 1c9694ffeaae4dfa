"""camtl.ops._reduce.per_task_sum, the second stage of the kernels' deterministic reductions."""

import torch

from camtl.ops._reduce import per_task_sum


def naive_per_task_sum(partials, index, num_tasks):
    """A Python loop over examples, accumulated in float64."""
    out = torch.zeros(num_tasks, *partials.shape[2:], dtype=torch.float64)
    for b, task in enumerate(index.tolist()):
        out[task] += partials[b].double().sum(0).cpu()
    return out


def check_correctly_rounded(device):
    B, P, G = 11, 6, 5
    # A wide dynamic range with cancellation: an fp32 accumulation (or a TF32 GEMM) would round differently.
    partials = torch.randn(B, P, 4, 9, device=device) * torch.logspace(-3, 3, P, device=device)[None, :, None, None]
    index = torch.tensor([3, 0, 3, 1, 4, 0, 0, 3, 1, 4, 4], device=device)  # task 2 absent
    got = per_task_sum(partials, index, G)
    want = naive_per_task_sum(partials, index, G)
    assert got.dtype == torch.float32 and got.shape == (G, 4, 9)
    assert torch.equal(got.cpu(), want.float()), (got.cpu().double() - want).abs().max()
    assert (got[2] == 0).all() and (got[[0, 1, 3, 4]] != 0).all()


def test_per_task_sum_is_the_correctly_rounded_sum(device):
    check_correctly_rounded(device)


def test_int32_index_and_half_partials(device):
    partials = torch.randn(4, 3, 7, device=device, dtype=torch.bfloat16)
    index = torch.tensor([1, 1, 0, 1], device=device, dtype=torch.int32)
    got = per_task_sum(partials, index, 2)
    assert torch.equal(got.cpu(), naive_per_task_sum(partials, index, 2).float())
