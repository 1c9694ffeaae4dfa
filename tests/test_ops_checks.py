"""camtl.ops._checks.index: the task-id range is read once per index tensor, and re-read when it changes."""

import pytest
import torch

from camtl import ops
from camtl.ops import _checks


@pytest.fixture
def count_reads(monkeypatch):
    reads = []
    real = torch.aminmax

    def counted(*args, **kwargs):
        reads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counted)
    return reads


def film_inputs(G=3):
    return torch.randn(4, 5, 6), torch.randn(G, 6), torch.randn(G, 6)


def test_one_read_per_index_tensor(count_reads):
    x, g, b = film_inputs()
    index = torch.tensor([2, 0, 1, 2])
    first = ops.film(x, g, b, index)
    for _ in range(3):
        torch.testing.assert_close(ops.film(x, g, b, index), first)
    assert len(count_reads) == 1
    ops.film(x, g, b, index.clone())  # another tensor: read again
    assert len(count_reads) == 2


def test_an_index_changed_in_place_is_read_again(count_reads):
    x, g, b = film_inputs()
    index = torch.tensor([2, 0, 1, 2])
    ops.film(x, g, b, index)
    index[1] = 3  # out of range for G=3
    with pytest.raises(IndexError, match=r"argument 'index' holds 3, out of range"):
        ops.film(x, g, b, index)
    index[1] = 1
    with torch.no_grad():
        ops.film(x, g, b, index)
    assert len(count_reads) == 3


def test_the_remembered_range_is_checked_against_each_table(count_reads):
    index = torch.tensor([0, 4, 1, 2])
    x, g, b = film_inputs(G=5)
    ops.film(x, g, b, index)
    x, g, b = film_inputs(G=4)  # the same index, a smaller table: 4 is now out of range
    with pytest.raises(IndexError, match=r"holds 4, out of range: task ids must be in \[0, 4\)"):
        ops.film(x, g, b, index)
    assert len(count_reads) == 1


def test_inference_tensors_are_read_every_time(count_reads):
    x, g, b = film_inputs()
    with torch.inference_mode():
        index = torch.tensor([2, 0, 1, 2])
        ops.film(x, g, b, index)
        ops.film(x, g, b, index)
    assert len(count_reads) == 2


def test_dead_tensors_leave_no_entry():
    before = len(_checks._RANGES)
    x, g, b = film_inputs()
    for _ in range(5):
        ops.film(x, g, b, torch.tensor([2, 0, 1, 2]))
    assert len(_checks._RANGES) == before
