"""Conditional attention: softmax(Q Kᵀ · scale + M(z) + mask) · V.

M(z) is CA-MTL's conditional block-diagonal bias, shared by the heads. It is a
pure function of (task, i, j), read from a FiLM-modulated block table
``table`` [G, L_max, c] (one row per task) and an index [B] into it:

    M[b, i, j] = table[index[b], i, j - c·(i // c)]   if i // c == j // c
               = 0                                   otherwise

for i, j < L (the batch length, L <= L_max: with dynamic padding the bias is
the top-left L×L corner of the L_max×L_max one; the last block is cropped).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from camtl.backends import register, resolve, torch_ref
from camtl.ops import _checks


def _check_qkv(op: str, q, k, v, rank: int, layout: str, like: str) -> None:
    """q, k, v tensors of the given rank; k shaped like q, v like q but for its last dim (dv); d >= 1."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(op, name, t, (rank,), layout)
        if name != "q":
            _checks.like(op, name, t, q, "q")
            same = t.shape == q.shape if name == "k" else t.shape[:-1] == q.shape[:-1]
            if not same:
                want = _checks.shape_str(q.shape) if name == "k" else _checks.shape_str(q.shape[:-1]) + " + [dv]"
                raise ValueError(f"{op}: argument '{name}' must have shape {want} {like}, "
                                 f"got {_checks.shape_str(t.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: argument 'q' must have a head dim d >= 1 (the scores are scaled by 1/sqrt(d)), "
                         f"got shape {_checks.shape_str(q.shape)}")


def _check_head_mask_dropout_scale(op, head_mask, shape_name: str, shape: tuple, dropout_p: float, scale) -> None:
    if head_mask is not None:
        if not isinstance(head_mask, torch.Tensor) or not head_mask.is_floating_point():
            raise TypeError(f"{op}: argument 'head_mask' must be a float tensor broadcastable to {shape_name}")
        try:
            torch.broadcast_shapes(head_mask.shape, shape)
        except RuntimeError:
            raise ValueError(f"{op}: argument 'head_mask' must broadcast to {shape_name}={list(shape)}, "
                             f"got {_checks.shape_str(head_mask.shape)}") from None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: argument 'dropout_p' must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op}: argument 'scale' must be a finite float or None, got {scale}")


def _check_table(op: str, table: torch.Tensor, index: Optional[torch.Tensor], batch: int, seq_len: int,
                 like: torch.Tensor, like_name: str) -> None:
    _checks.tensor(op, "table", table, (3,), "[G, L_max, c]")
    _checks.like(op, "table", table, like, like_name)
    if table.shape[1] < seq_len:
        raise ValueError(
            f"{op}: the sequence length {seq_len} is greater than max_seq_length={table.shape[1]} "
            f"(dim 1 of 'table' {_checks.shape_str(table.shape)}); pad or truncate to at most {table.shape[1]}"
        )
    if table.shape[2] < 1:
        raise ValueError(f"{op}: argument 'table' must have a block width c >= 1, got shape "
                         f"{_checks.shape_str(table.shape)}")
    _checks.index(op, "index", index, batch, table.shape[0], like.device)


def block_bias(table: torch.Tensor, index: Optional[torch.Tensor] = None, seq_len: Optional[int] = None,
               block_rows: Optional[int] = None, num_cols: Optional[int] = None) -> torch.Tensor:
    """The dense block-diagonal bias [B, L, L] (the published CBDA output).

    bias[b, i, j] = table[index[b], i, j - c·(i // r)] when 0 <= j - c·(i // r) < c, else 0,
    with r = block_rows (default c, square diagonal blocks), L = seq_len
    (default L_max) and num_cols columns (default L). Kernels never form this;
    it is for the published CBDA module and for references.
    """
    op = "camtl.ops.block_bias"
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{op}: argument 'table' must be a torch.Tensor of shape [G, L_max, c]")
    for name, value, least in (("seq_len", seq_len, 0), ("block_rows", block_rows, 1), ("num_cols", num_cols, 0)):
        if value is None:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{op}: argument '{name}' must be an int or None, got {type(value).__name__} {value!r}")
        if value < least:
            raise ValueError(f"{op}: argument '{name}' must be >= {least}, got {value}")
    seq_len = table.shape[1] if seq_len is None else int(seq_len)
    batch = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 1 else table.shape[0]
    _check_table(op, table, index, batch, seq_len, table, "table")
    _, fn = resolve("block_bias", table.device)
    return fn(table, index, seq_len, block_rows, num_cols)


def conditional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
    index: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None, *,
    dropout_p: float = 0.0, scale: Optional[float] = None, head_mask: Optional[torch.Tensor] = None,
    return_probs: bool = False, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(q kᵀ · scale + M(table, index) + attn_mask) · v, non-causal.

    Args:
        q, k: [B, H, L, d] and v: [B, H, L, dv], any strides (views of one QKV projection are fine).
        table: [G, L_max, c] FiLM-modulated block table, L <= L_max.
        index: [B] int64 row of ``table`` for each example; None means arange(B), G == B.
        attn_mask: None; a key padding mask [B, L]: a bool or integer
            keep-mask (True / 1 = attend) or a float additive mask (added to
            the scores, e.g. the published (1 - mask)·-10000); or a float
            additive mask broadcastable to [B, H, L, L] (e.g. the published
            [B, 1, 1, L]). The dtype decides, as in camtl.nn: bool / integer
            keep, float adds.
        dropout_p: attention dropout probability in [0, 1); pass 0 in eval.
        scale: score scale; None means 1/sqrt(d).
        head_mask: None or a float tensor broadcastable to [B, H, L, L] that
            multiplies the probabilities (the published head_mask).
        return_probs: also return the probabilities [B, H, L, L].
        cu_seqlens, max_seqlen: packed (varlen) input, as flash-attn's varlen
            functions take it: q, k [N, H, d] and v [N, H, dv] hold S
            sequences end to end, cu_seqlens int32 / int64 [S+1] their
            boundaries (0, strictly increasing, N) and index [S] their tasks.
            Sequence s gets the top-left Ls×Ls corner of its task's bias
            (positions counted from its start) and never attends across a
            boundary. max_seqlen (optional) is an upper bound on the
            longest sequence, checked. No attn_mask (there is no padding);
            head_mask broadcasts to [S, H, Lmax, Lmax] and probs are
            [S, H, Lmax, Lmax] (Lmax = the longest sequence), zero outside
            each sequence's Ls×Ls corner. The triton backend runs the varlen
            kernels (forward and backward, dropout included; its dropout mask
            is its own Philox one, not torch's); a named cuda backend raises
            BackendUnavailableError (no varlen attention yet), auto runs torch.
    With return_probs or head_mask, the torch reference runs whatever the
    backend: only it forms the probabilities.

    Every backend: float16 / bfloat16 inputs get fp32 scores, bias and mask
    adds, softmax and P·V; only out (and probs) are rounded to the input
    dtype, so fp16 scores above 65504 are fine. A query row whose keys are
    all masked (a bool / 0 keep-mask or -inf additive entries on every key)
    outputs zeros and passes zero gradients, never NaN; an additive -10000
    on every key is finite, so it attends uniformly, as published. B = 0 or
    L = 0 gives an empty result; d = 0 is refused. Double backward runs on
    the torch backend only.
    Returns:
        out [B, H, L, dv] ([N, H, dv] packed), or (out, probs) with return_probs.
    """
    op = "camtl.ops.conditional_attention"
    q, k, v, table = _checks.autocast_inputs("lower", q, k, v, table)
    if cu_seqlens is not None or max_seqlen is not None:
        return _conditional_attention_varlen(op, q, k, v, table, index, attn_mask, dropout_p, scale, head_mask,
                                             return_probs, cu_seqlens, max_seqlen)
    _check_qkv(op, q, k, v, 4, "[B, H, L, d]", "(like q)")
    B, H, L, d = q.shape
    _check_table(op, table, index, B, L, q, "q")
    attn_mask = _check_attn_mask(op, attn_mask, B, H, L, q.device)
    _check_head_mask_dropout_scale(op, head_mask, "[B, H, L, L]", (B, H, L, L), dropout_p, scale)
    if return_probs or head_mask is not None:
        fn = torch_ref.conditional_attention  # documented: only the reference forms the probabilities
    else:
        _, fn = resolve("conditional_attention", q.device, _unsupported_by_kernels(q, v, attn_mask), q.dtype)
    out, probs = fn(q, k, v, table, index, attn_mask, dropout_p, scale, head_mask, return_probs)
    return (out, probs) if return_probs else out


def _conditional_attention_varlen(op, q, k, v, table, index, attn_mask, dropout_p, scale, head_mask, return_probs,
                                  cu_seqlens, max_seqlen):
    """The packed form of conditional_attention: checks, then the backend's varlen implementation."""
    _check_qkv(op, q, k, v, 3, "[N, H, d] (packed input: cu_seqlens is given)", "(like q, packed [N, H, d])")
    N, H, d = q.shape
    lengths = _check_cu_seqlens(op, cu_seqlens, N, q.device)
    S = len(lengths)
    longest = max(lengths, default=0)
    if max_seqlen is not None:
        if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool):
            raise TypeError(f"{op}: argument 'max_seqlen' must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < longest:
            raise ValueError(f"{op}: argument 'max_seqlen'={max_seqlen} is less than the longest sequence in "
                             f"'cu_seqlens' ({longest} tokens); it must be an upper bound")
    _checks.tensor(op, "table", table, (3,), "[G, L_max, c]")
    if longest > table.shape[1]:
        seq = lengths.index(longest)
        raise ValueError(f"{op}: sequence {seq} in 'cu_seqlens' has {longest} tokens, more than max_seq_length="
                         f"{table.shape[1]} (dim 1 of 'table' {_checks.shape_str(table.shape)}); truncate it")
    width = longest  # the reference pads to the longest sequence: max_seqlen is only a checked bound
    if isinstance(index, torch.Tensor) and (index.dim() != 1 or index.shape[0] != S):
        raise ValueError(f"{op}: argument 'index' must have shape [S]=[{S}] (one task per sequence, S = "
                         f"len(cu_seqlens) - 1), got {_checks.shape_str(index.shape)}")
    _check_table(op, table, index, S, width, q, "q")
    if attn_mask is not None:
        raise ValueError(f"{op}: argument 'attn_mask' must be None with packed input (cu_seqlens): packed "
                         f"sequences have no padding, and attention never crosses a sequence boundary")
    _check_head_mask_dropout_scale(op, head_mask, "[S, H, Lmax, Lmax]", (S, H, width, width), dropout_p, scale)
    if return_probs or head_mask is not None:
        name = "torch"  # documented: only the reference forms the probabilities
    else:
        name, _ = resolve("conditional_attention", q.device, _unsupported_by_kernels(q, v, None), q.dtype)
        if name not in _VARLEN_IMPLS:  # auto falls back to torch, a named backend raises
            name, _ = resolve("conditional_attention", q.device,
                              f"the {name} backend has no varlen (cu_seqlens) attention yet")
    out, probs = _VARLEN_IMPLS[name](q, k, v, cu_seqlens, width, table, index, dropout_p, scale, head_mask,
                                     return_probs)
    return (out, probs) if return_probs else out


def _check_cu_seqlens(op: str, cu_seqlens, N: int, device: torch.device) -> list:
    """Checks the packing (one host read of cu_seqlens); returns the sequence lengths."""
    want = "an int32 or int64 tensor [S+1] of sequence boundaries: 0, strictly increasing, ending at N"
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: argument 'cu_seqlens' must be {want}, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument 'cu_seqlens' must be {want}, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: argument 'cu_seqlens' must be {want}, got shape {_checks.shape_str(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: argument 'cu_seqlens' is on {cu_seqlens.device} but q is on {device}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{op}: argument 'cu_seqlens' must start at 0, got {bounds[0]} ({want})")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for seq, length in enumerate(lengths):
        if length <= 0:
            raise ValueError(f"{op}: argument 'cu_seqlens' must be strictly increasing (every sequence has >= 1 "
                             f"token), but sequence {seq} spans [{bounds[seq]}, {bounds[seq + 1]})")
    if bounds[-1] != N:
        raise ValueError(f"{op}: argument 'cu_seqlens' must end at N={N} (dim 0 of q, the packed tokens), "
                         f"got {bounds[-1]}")
    return lengths


def _check_attn_mask(op: str, attn_mask, B: int, H: int, L: int, device: torch.device) -> Optional[torch.Tensor]:
    """Checks attn_mask against the mask rule; returns it with an integer keep-mask turned into bool."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{op}: argument 'attn_mask' must be a tensor [B, L] or [B, H, L, L] or None, "
                        f"got {type(attn_mask).__name__}")
    if attn_mask.device != device:
        raise ValueError(f"{op}: argument 'attn_mask' is on {attn_mask.device} but q is on {device}")
    if attn_mask.is_complex():
        raise TypeError(f"{op}: argument 'attn_mask' must be bool or integer (a keep-mask) or floating point "
                        f"(additive), got {attn_mask.dtype}")
    keep = not attn_mask.is_floating_point()
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (B, L):
            raise ValueError(f"{op}: a 2-D 'attn_mask' is a key padding mask of shape [B, L]=[{B}, {L}], "
                             f"got {_checks.shape_str(attn_mask.shape)}")
    elif attn_mask.dim() == 4 and not keep:
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, L, L))
        except RuntimeError:
            raise ValueError(f"{op}: a 4-D 'attn_mask' must broadcast to [B, H, L, L]=[{B}, {H}, {L}, {L}], "
                             f"got {_checks.shape_str(attn_mask.shape)}") from None
    else:
        raise ValueError(f"{op}: argument 'attn_mask' must be a key padding mask [B, L]=[{B}, {L}] (a bool or "
                         f"integer keep-mask, or a float additive mask) or a float additive mask broadcastable "
                         f"to [B, H, L, L], got {attn_mask.dtype} {_checks.shape_str(attn_mask.shape)}")
    return attn_mask != 0 if keep and attn_mask.dtype != torch.bool else attn_mask


def _unsupported_by_kernels(q, v, attn_mask) -> Optional[str]:
    """Why the fused kernels cannot take these inputs, or None."""
    if attn_mask is not None and attn_mask.dim() == 4:
        return "the fused kernels take a [B, L] key padding mask, not a 4-D mask"
    if v.shape[-1] != q.shape[-1]:
        return "the fused kernels need v's head dim equal to q's"
    if _checks.kernel_dtype(q) is not None:
        return _checks.kernel_dtype(q)
    limit = kernel_head_dim_limit(q.dtype, q.device.type)
    if q.shape[-1] > limit:
        return (f"the fused kernels take {'float32 (TF32) ' if limit < 256 else ''}head dims up to {limit}, "
                f"got {q.shape[-1]}")
    return None


def kernel_head_dim_limit(dtype: torch.dtype, device_type: str) -> int:
    """The largest head dim the fused kernels take: 256, but 128 for float32 on a GPU, where d 256's tiles on TF32
    do not fit a GPU's shared memory, or spill (`make kernel-report KERNEL_REPORT_ARGS='--dtype fp32 ...'`)."""
    return 128 if dtype == torch.float32 and device_type == "cuda" else 256


# ---- the fused (Triton) implementation, as torch.library ops ---------------------------------------------------

@torch.library.custom_op("camtl::conditional_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                   key_mask: Optional[torch.Tensor], scale: float, dropout_p: float, seed: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, L, d], lse [B, H, L] fp32, the dense bias and its transpose [2, G, L, L'] fp32 (L' = L rounded
    up to 16), the dropout bit mask, the key bias [B, L] fp32) of the kernels; the last four are saved for the backward.
    key_mask [B, L]: bool (True: keep) or float (added to the scores)."""
    from camtl.kernels.attention import attention_forward

    return attention_forward(q, k, v, table, index, key_mask, scale, dropout_p, int(seed.item()))


@_attention_fwd.register_fake
def _(q, k, v, table, index, key_mask, scale, dropout_p, seed):
    from camtl.kernels.attention import dense_bias_shape, dropout_mask_shape, key_bias_shape

    B, H, L, d = q.shape
    return (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32),
            q.new_empty(dense_bias_shape(table.shape[0], L), dtype=torch.float32),
            q.new_empty(dropout_mask_shape(B * H, L, d, q.dtype, dropout_p), dtype=torch.int32),
            q.new_empty(key_bias_shape(B, L, key_mask is not None), dtype=torch.float32))


@torch.library.custom_op("camtl::conditional_attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, table: torch.Tensor,
                   index: torch.Tensor, key_bias: Optional[torch.Tensor], scale: float, dropout_p: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dtable); key_bias: the forward's key bias [B, L] fp32, or None. dtable sums the bias gradients over
    heads and per task, deterministically."""
    from camtl.kernels.attention import attention_backward

    return attention_backward(dout, q, k, v, out, lse, bias, mask, table, index, key_bias, scale, dropout_p)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias, mask, table, index, key_bias, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), table.new_empty(table.shape)


_checks.refuse_double_backward(_attention_bwd, "camtl.ops.conditional_attention")


def _attention_setup_context(ctx, inputs, output):
    q, k, v, table, index, key_mask, scale, dropout_p, seed = inputs
    out, lse, bias, mask, key_bias = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask, table, index, key_bias)
    ctx.scale, ctx.dropout_p, ctx.has_key_mask = scale, dropout_p, key_mask is not None
    ctx.set_materialize_grads(False)  # lse, bias and mask get no gradient: no zero tensors for them


def _attention_backward(ctx, dout, dlse, dbias, dmask, dkey_bias):
    q, k, v, out, lse, bias, mask, table, index, key_bias = ctx.saved_tensors
    if dout is None:  # grads are not materialized: out took no part in the loss
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv, dtable = _attention_bwd(dout, q, k, v, out, lse, bias, mask, table, index,
                                        key_bias if ctx.has_key_mask else None, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, dtable, None, None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("camtl::conditional_attention_varlen_fwd", mutates_args=())
def _attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, table: torch.Tensor, index: torch.Tensor, scale: float, dropout_p: float,
                          seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed: (out [N, H, d], lse [H, N] fp32, the dense bias and its transpose [2, G, max_seqlen, L'] fp32 (L' =
    max_seqlen rounded up to 16), the dropout bit mask) for q, k, v [N, H, d] and sequences cu_seqlens [S+1]; the
    last three are saved for the backward."""
    from camtl.kernels.attention import attention_forward_varlen

    return attention_forward_varlen(q, k, v, cu_seqlens, max_seqlen, table, index, scale, dropout_p,
                                    int(seed.item()))


@_attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, table, index, scale, dropout_p, seed):
    from camtl.kernels.attention import dense_bias_shape, dropout_mask_shape

    N, H, d = q.shape
    S = cu_seqlens.shape[0] - 1
    return (q.new_empty(q.shape), q.new_empty((H, N), dtype=torch.float32),
            q.new_empty(dense_bias_shape(table.shape[0], max_seqlen), dtype=torch.float32),
            q.new_empty(dropout_mask_shape(S * H, max_seqlen, d, q.dtype, dropout_p), dtype=torch.int32))


@torch.library.custom_op("camtl::conditional_attention_varlen_bwd", mutates_args=())
def _attention_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, table: torch.Tensor, index: torch.Tensor, scale: float, dropout_p: float
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dtable). dtable sums the bias gradients over heads and per task, deterministically."""
    from camtl.kernels.attention import attention_backward_varlen

    return attention_backward_varlen(dout, q, k, v, out, lse, bias, mask, cu_seqlens, max_seqlen, table, index,
                                     scale, dropout_p)


@_attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, bias, mask, cu_seqlens, max_seqlen, table, index, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), table.new_empty(table.shape)


_checks.refuse_double_backward(_attention_varlen_bwd, "camtl.ops.conditional_attention")


def _attention_varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, table, index, scale, dropout_p, seed = inputs
    out, lse, bias, mask = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask, cu_seqlens, table, index)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p = max_seqlen, scale, dropout_p
    ctx.set_materialize_grads(False)


def _attention_varlen_backward(ctx, dout, dlse, dbias, dmask):
    q, k, v, out, lse, bias, mask, cu_seqlens, table, index = ctx.saved_tensors
    if dout is None:
        return (None,) * 10
    dq, dk, dv, dtable = _attention_varlen_bwd(dout, q, k, v, out, lse, bias, mask, cu_seqlens, ctx.max_seqlen,
                                               table, index, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None, dtable, None, None, None, None


_attention_varlen_fwd.register_autograd(_attention_varlen_backward, setup_context=_attention_varlen_setup_context)


def draw_dropout_seed(dropout_p: float) -> torch.Tensor:
    """A Philox seed from torch's default generator, so torch.manual_seed makes dropout reproducible."""
    if dropout_p == 0.0:
        return torch.zeros((), dtype=torch.int64)
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def _triton_conditional_attention(q, k, v, table, index=None, attn_mask=None, dropout_p=0.0, scale=None,
                                  head_mask=None, return_probs=False):
    B, H, L, d = q.shape
    if index is None:
        index = torch.arange(B, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # attn_mask: None or [B, L], bool (True: keep) or float (added): the forward turns it into its key bias operand
    out = _attention_fwd(q, k, v, table, index.contiguous(), attn_mask, scale, float(dropout_p),
                         draw_dropout_seed(dropout_p))[0]
    return out, None


def _triton_conditional_attention_varlen(q, k, v, cu_seqlens, max_seqlen, table, index=None, dropout_p=0.0,
                                         scale=None, head_mask=None, return_probs=False):
    """The triton backend's packed attention; the arguments as torch_ref.conditional_attention_varlen takes them
    (max_seqlen: the longest sequence; no head_mask or return_probs: those run the reference)."""
    if index is None:
        index = torch.arange(cu_seqlens.shape[0] - 1, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = _attention_varlen_fwd(q, k, v, cu_seqlens.contiguous(), int(max_seqlen), table, index.contiguous(),
                                scale, float(dropout_p), draw_dropout_seed(dropout_p))[0]
    return out, None


# The packed form of each backend's conditional_attention, chosen by the same resolve().
_VARLEN_IMPLS = {"torch": torch_ref.conditional_attention_varlen, "triton": _triton_conditional_attention_varlen}

register("block_bias", "torch", torch_ref.block_bias)
register("conditional_attention", "torch", torch_ref.conditional_attention)
register("conditional_attention", "triton", _triton_conditional_attention)
