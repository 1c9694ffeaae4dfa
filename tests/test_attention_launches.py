"""Device work of one conditional attention forward and one backward on the triton backend (issue 9, item 3).

Runs under TRITON_INTERPRET=1 on CPU tensors, tiny shapes: the count of launches does not depend on the size.

Counting rule, per pass:
- every Triton kernel launch (a counter around the jitted kernels of camtl.kernels.attention);
- every torch op dispatched on a tensor (a TorchDispatchMode) except the ones that launch nothing on a GPU:
  views (the op's schema says it returns an alias), detach / alias, and the bare allocations empty /
  empty_like / empty_strided / new_empty (memory from the caching allocator, no kernel), and scalar_tensor on the CPU (a
  Python number wrapped as a host tensor, as in torch.where(mask, 0.0, -inf): a CUDA kernel takes it as an
  argument). Composite ops (matmul, one_hot) are counted as the ops they run. Fills, copies, casts, reductions
  and GEMMs count. Ops that the Triton interpreter issues to run a kernel on the CPU are not counted (the
  launch is);
- device->host syncs: every `_local_scalar_dense` or `item` (what .item(), int(t), float(t), bool(t) dispatch to),
  and every copy to the CPU asked for by name (`_to_copy` with device=cpu: on a GPU, a device->host copy); its
  result is a host tensor: ops on host tensors launch nothing, and give host tensors.
  The dropout seed is a host tensor (draw_dropout_seed makes it on the CPU, whatever the device): making it and
  reading it cost no launch and no sync on a GPU, so those ops are not counted.
Counted in float32 (casts to float32 are no-ops there: a bf16 model adds the casts that the counts do not show).

The bounds are today's numbers: they keep the counts from growing. Issue 9's targets are written next to them.
"""

import contextlib

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import camtl
from camtl import ops
import camtl.kernels.attention as attention_kernels
import camtl.ops.attention as attention_ops

TARGET_FORWARD, TARGET_BACKWARD, TARGET_SYNCS = 4, 6, 0  # issue 9 deliverable 3

_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "alias", "lift_fresh", "set_"}

# (key mask, dropout, inside index_read_once) -> today's (forward launches, backward launches, host syncs in all).
# Forward: the index range check (one copy of the task ids to the host, no kernel: once per op outside
# index_read_once, once per model forward inside it), the dense
# bias expansion, the dropout bit mask (with dropout), the key mask conversion (where), the kernel. Backward: the
# dq kernel (which sums dS over heads), the dkdv kernel, the dtable kernel (per-task sums and the rows past L).
BOUNDS = {
    (False, False, False): (2, 3, 1),
    (False, False, True): (2, 3, 0),
    (True, False, False): (3, 3, 1),
    (True, False, True): (3, 3, 0),
    (False, True, False): (3, 3, 1),
    (False, True, True): (3, 3, 0),
    (True, True, False): (4, 3, 1),
    (True, True, True): (4, 3, 0),
}


class _DeviceWork(TorchDispatchMode):
    """Counts torch ops by the rule above, kernel launches and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.syncs = [], 0, 0
        self.in_kernel = False  # inside a Triton launch, or making the host-side dropout seed
        self.host_tensors = []  # the dropout seeds

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "camtl":  # a custom op: count what its implementation runs, not the op itself
            with self:
                return OPDEFS[func._name]._init_fn(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_host = bool(tensors) and all(any(a is h for h in self.host_tensors) for a in tensors)
        to_host = func.overloadpacket.__name__ == "_to_copy" and kwargs.get("device") is not None and \
            torch.device(kwargs["device"]).type == "cpu"
        if to_host and not self.in_kernel and not on_host:  # a device->host copy: one sync, and a host tensor
            self.syncs += 1
            result = func(*args, **kwargs)
            self.host_tensors.append(result)
            return result
        if on_host:  # e.g. the min of a host copy: no launch, and its result is on the host too
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor):
                self.host_tensors.append(result)
            return result
        if not self.in_kernel and not on_host:
            with self:  # a composite op (matmul, one_hot, ...): count the ops it runs
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "item"):
                self.syncs += 1
            elif name == "scalar_tensor" and torch.device(kwargs.get("device") or "cpu").type == "cpu":
                pass
            elif name not in _NO_LAUNCH and not func.is_view:
                self.ops.append(name)
        return func(*args, **kwargs)

    @property
    def total(self):
        return len(self.ops) + self.launches


class _CountedKernel:
    """Stands in for a jitted kernel: kernel[grid](...) counts one launch, then runs it."""

    def __init__(self, kernel, work):
        self.kernel, self.work = kernel, work

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.work.launches += 1
            self.work.in_kernel = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.work.in_kernel = False
        return counted


def _jitted_kernels():
    return {name: obj for name, obj in vars(attention_kernels).items()
            if name.endswith("_kernel") and hasattr(obj, "__getitem__")}


@pytest.fixture
def work(monkeypatch):
    counter = _DeviceWork()
    kernels = _jitted_kernels()
    assert {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"} <= set(kernels)
    for name, kernel in kernels.items():
        monkeypatch.setattr(attention_kernels, name, _CountedKernel(kernel, counter))
    draw_seed = attention_ops.draw_dropout_seed

    def host_seed(*args, **kwargs):
        counter.in_kernel = True
        try:
            seed = draw_seed(*args, **kwargs)
        finally:
            counter.in_kernel = False
        assert seed.device.type == "cpu"
        counter.host_tensors.append(seed)
        return seed
    monkeypatch.setattr(attention_ops, "draw_dropout_seed", host_seed)
    return counter


def _inputs(masked: bool):
    B, H, L, d, G, c = 3, 2, 12, 16, 2, 4
    q, k, v = (torch.randn(B, H, L, d, requires_grad=True) for _ in range(3))
    table = torch.randn(G, L + 4, c, requires_grad=True)  # L < L_max, as with dynamic padding
    index = torch.tensor([1, 0, 1])
    mask = None
    if masked:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, 9:] = False
    return (q, k, v, table), index, mask


def _count(work, fn):
    before = (work.total, work.syncs)
    with work:
        result = fn()
    return result, work.total - before[0], work.syncs - before[1]


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_mask"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("read_once", [False, True], ids=["plain", "index_read_once"])
def test_attention_launches_and_syncs_do_not_grow(work, masked, dropout_p, read_once):
    leaves, index, mask = _inputs(masked)
    block = ops.index_read_once(index) if read_once else contextlib.nullcontext()
    with camtl.use_backend("triton"), block:
        if read_once:
            ops.conditional_attention(*leaves, index, mask)  # the first op in the block reads the range
        fwd_ops = len(work.ops)
        out, fwd, fwd_syncs = _count(work, lambda: ops.conditional_attention(*leaves, index, mask,
                                                                              dropout_p=dropout_p))
        fwd_ops = work.ops[fwd_ops:]
    assert work.launches >= 1, "no Triton kernel ran: the counter missed the launches"
    dout = torch.randn_like(out)
    bwd_start = len(work.ops)
    grads, bwd, bwd_syncs = _count(work, lambda: torch.autograd.grad(out, leaves, dout))
    bwd_ops = work.ops[bwd_start:]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    max_fwd, max_bwd, max_syncs = BOUNDS[(masked, dropout_p > 0, read_once)]
    detail = f"forward torch ops {fwd_ops}, backward torch ops {bwd_ops}"
    assert fwd <= max_fwd, f"forward: {fwd} launches > {max_fwd} (target {TARGET_FORWARD}); {detail}"
    assert bwd <= max_bwd, f"backward: {bwd} launches > {max_bwd} (target {TARGET_BACKWARD}); {detail}"
    assert fwd_syncs + bwd_syncs <= max_syncs, (
        f"{fwd_syncs} forward + {bwd_syncs} backward host syncs > {max_syncs} (target {TARGET_SYNCS})")
