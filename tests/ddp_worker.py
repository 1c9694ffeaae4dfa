"""Run by test_training.py: N steps of training, alone or under torchrun (gloo on the CPU); saves the parameters."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training import ToyDataset, collate, tiny_model  # noqa: E402

from camtl.training import Trainer, TrainingArguments  # noqa: E402

if __name__ == "__main__":
    out, per_device = sys.argv[1], int(sys.argv[2])
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = tiny_model(dropout=0.0)  # no dropout: the processes must compute what one process would
    args = TrainingArguments(output_dir=os.path.dirname(out) + f"/ddp-{per_device}", max_steps=4,
                             per_device_train_batch_size=per_device, progress=False, learning_rate=1e-3,
                             save_steps=100)
    Trainer(model, args, ToyDataset(), collate).train()
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(model.state_dict(), out)
    if dist.is_initialized():
        dist.destroy_process_group()
