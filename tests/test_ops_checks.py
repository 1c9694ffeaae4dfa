"""camtl.ops.index_read_once: inside it the ops read a task-id tensor's range once; outside, every op reads it."""

import pytest
import torch
from transformers import BertConfig

from camtl import ops
from camtl.ops import _checks
from camtl.models import CaMtlBaseEncoder


@pytest.fixture
def count_reads(monkeypatch):
    reads = []
    real = _checks._read_range

    def counted(idx):
        reads.append(1)
        return real(idx)

    monkeypatch.setattr(_checks, "_read_range", counted)
    return reads


def film_inputs(G=3):
    return torch.randn(4, 5, 6), torch.randn(G, 6), torch.randn(G, 6)


def test_outside_every_op_reads(count_reads):
    x, g, b = film_inputs()
    index = torch.tensor([2, 0, 1, 2])
    for _ in range(3):
        ops.film(x, g, b, index)
    assert len(count_reads) == 3


def test_inside_one_read_per_index_tensor(count_reads):
    x, g, b = film_inputs()
    index = torch.tensor([2, 0, 1, 2])
    with ops.index_read_once(index):
        first = ops.film(x, g, b, index)
        for _ in range(3):
            torch.testing.assert_close(ops.film(x, g, b, index), first)
        assert len(count_reads) == 1
        ops.film(x, g, b, index.clone())  # another tensor: read
        assert len(count_reads) == 2
    index[1] = 3  # out of range for G=3, after the block: read again, and refused
    with pytest.raises(IndexError, match=r"argument 'index' holds 3, out of range"):
        ops.film(x, g, b, index)


def test_an_index_changed_inside_the_block_is_read_again(count_reads):
    x, g, b = film_inputs()
    index = torch.tensor([2, 0, 1, 2])
    with ops.index_read_once(index):
        ops.film(x, g, b, index)
        index[1] = 5  # e.g. a forward hook: the version counter moves
        with pytest.raises(IndexError, match=r"argument 'index' holds 5, out of range"):
            ops.film(x, g, b, index)
    assert len(count_reads) == 2


def test_inference_tensors_are_read_by_every_op(count_reads):
    x, g, b = film_inputs()
    with torch.inference_mode():
        index = torch.tensor([2, 0, 1, 2])
        with ops.index_read_once(index):
            ops.film(x, g, b, index)
            ops.film(x, g, b, index)
    assert len(count_reads) == 2


def test_the_range_read_once_is_checked_against_each_table(count_reads):
    index = torch.tensor([0, 4, 1, 2])
    with ops.index_read_once(index):
        ops.film(*film_inputs(G=5), index)
        with pytest.raises(IndexError, match=r"holds 4, out of range: task ids must be in \[0, 4\)"):
            ops.film(*film_inputs(G=4), index)  # the same ids, a smaller table
    assert len(count_reads) == 1


def test_an_encoder_forward_reads_the_task_ids_once(count_reads):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    model = CaMtlBaseEncoder(config, num_tasks=3, max_seq_length=16).eval()
    task_id = torch.tensor([2, 0, 1])
    out = model(torch.randint(1, 50, (3, 16)), task_id=task_id)
    assert len(count_reads) == 1 and torch.isfinite(out[0]).all()
    with pytest.raises(IndexError, match="holds 3, out of range"):
        model(torch.randint(1, 50, (3, 16)), task_id=torch.tensor([2, 3, 1]))
    with torch.inference_mode():
        again = model(torch.randint(1, 50, (3, 16)), task_id=task_id)[0]  # inference tensors: no version counter
    assert again.shape == out[0].shape and torch.isfinite(again).all()
