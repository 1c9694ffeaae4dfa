"""The per-task reduction on the GPU, with TF32 matmuls allowed: its sum must stay the correctly rounded one."""

import torch

from test_ops_reduce import check_correctly_rounded


def test_per_task_sum_ignores_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_correctly_rounded(torch.device("cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
