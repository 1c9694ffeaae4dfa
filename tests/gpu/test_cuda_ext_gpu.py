"""The cuda backend's conditional layer norm (camtl._C through camtl.backends.cuda_ext) on a GPU, against the
torch backend: outputs and every gradient, dtypes, odd D, strided rows, determinism, opcheck, torch.compile."""

import pytest
import torch

from camtl.ops.layer_norm import _cuda_conditional_layer_norm as cuda_layer_norm

try:
    import camtl._C as ext
except ImportError:
    ext = None


@pytest.fixture(autouse=True)
def _extension_built():
    if ext is None:
        pytest.fail("camtl._C is not built on this machine (no nvcc when camtl was installed?): the cuda backend "
                    "cannot be checked")


TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.float16: dict(rtol=4e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _gpu_inputs(Bn, Ln, Dn, Gn, dtype, residual, seed, row_stride=None):
    """Fresh CUDA inputs; with row_stride, every 2-D+ operand's rows sit in a wider buffer (row stride != D)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(dtype).cuda()
        if row_stride is not None and t.dim() > 1:
            wide = torch.zeros(*shape[:-1], row_stride, dtype=dtype, device="cuda")
            wide[..., :shape[-1]] = t
            t = wide[..., :shape[-1]]
        return t
    args = dict(x=rand(Bn, Ln, Dn, scale=2.0), weight=rand(Dn), bias=rand(Dn), gamma=rand(Gn, Dn, scale=0.5),
                beta=rand(Gn, Dn, scale=0.5), residual=rand(Bn, Ln, Dn) if residual else None)
    return args, rand(Bn, Ln, Dn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Dn,row_stride", [(13, None), (768, None), (769, None), (8192, None), (13, 16)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cuda_ext_matches_torch(dtype, Dn, row_stride, residual):
    from camtl.backends import torch_ref

    args, dy = _gpu_inputs(4, 5, Dn, 5, dtype, residual, seed=Dn, row_stride=row_stride)
    index = torch.tensor([3, 0, 3, 1], device="cuda")  # tasks 2 and 4 absent
    leaves = {k: v.detach().requires_grad_() for k, v in args.items() if v is not None}  # strides kept
    y = cuda_layer_norm(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                                        leaves["beta"], index, 1e-5, leaves.get("residual"))
    y.backward(dy)
    ref = {k: v.detach().double().requires_grad_() for k, v in args.items() if v is not None}
    y_ref = torch_ref.conditional_layer_norm(ref["x"], ref["weight"], ref["bias"], ref["gamma"], ref["beta"],
                                             index, 1e-5, ref.get("residual"))
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    torch.testing.assert_close(leaves["x"].grad.double(), ref["x"].grad, **TOL[dtype])
    for name in ("weight", "bias", "gamma", "beta") + (("residual",) if residual else ()):
        # the parameter gradients are rounded to the dtype once, after fp32 sums
        torch.testing.assert_close(leaves[name].grad.double(), ref[name].grad,
                                   **(TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)))
    assert leaves["gamma"].grad[[2, 4]].eq(0).all()


def test_cuda_ext_is_bitwise_deterministic():
    args, dy = _gpu_inputs(8, 64, 769, 3, torch.bfloat16, True, seed=1)
    index = torch.tensor([2, 0, 2, 1, 1, 0, 2, 2], device="cuda")
    outs = []
    for _ in range(2):
        leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
        y = cuda_layer_norm(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                                            leaves["beta"], index, 1e-5, leaves["residual"])
        y.backward(dy)
        outs.append([y] + [leaves[k].grad for k in sorted(leaves)])
    for first, second in zip(*outs):
        assert torch.equal(first.view(torch.int16), second.view(torch.int16))


def test_cuda_ext_opcheck_and_compile():
    args, _ = _gpu_inputs(2, 3, 768, 3, torch.float32, True, seed=2)
    index = torch.tensor([2, 0], device="cuda")
    leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
    torch.library.opcheck(torch.ops.camtl.cuda_conditional_layer_norm_fwd,
                          (leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"], leaves["beta"], index,
                           leaves["residual"], 1e-5))
    compiled = torch.compile(cuda_layer_norm, fullgraph=True)
    y = compiled(args["x"], args["weight"], args["bias"], args["gamma"], args["beta"], index, 1e-5, args["residual"])
    torch.testing.assert_close(y, cuda_layer_norm(args["x"], args["weight"], args["bias"],
                                                                  args["gamma"], args["beta"], index, 1e-5,
                                                                  args["residual"]))
