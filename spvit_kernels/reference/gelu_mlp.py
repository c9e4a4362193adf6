"""A transformer MLP, fc2(gelu(fc1(h))), in PyTorch: the "reference" backend of torch.ops.spvit.gelu_mlp_{fwd,bwd}.

    u = h @ w1^T + b1,  g = gelu(u),  out = g @ w2^T + b2       gelu the exact (erf) GELU
    du = (dout @ w2) * gelu'(u),  gelu'(x) = Phi(x) + x phi(x)
    dw2 = dout^T g,  db2 = sum_rows dout,  dw1 = du^T h,  db1 = sum_rows du,  dh = du @ w1

In h's dtype throughout, weights and biases rounded to it, as PyTorch's autocast runs the MLP; gelu'(u) and the
bias sums are computed in float32 (float64 for float64 h); weight and bias gradients return in their dtypes.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["bias_grad", "cast_optional", "gelu_grad", "gelu_mlp_bwd_reference", "gelu_mlp_fwd_reference",
           "no_autocast"]


def gelu_grad(x):
    """The derivative of the exact GELU, elementwise, in x's dtype."""
    return 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2)))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def cast_optional(t, dtype):
    return t.to(dtype) if t is not None else None


def bias_grad(d, bias, acc=torch.float32):
    """The gradient of a bias added to every row of d's (M, N) product: column sums accumulated in acc, in the
    bias's dtype; (0,) without a bias."""
    return d.sum(dim=0, dtype=acc).to(bias.dtype) if bias is not None else d.new_empty((0,))


def no_autocast(fn):
    """A backend whose PyTorch products run in its first tensor's dtype (h or dout), whatever autocast state the
    caller has."""
    def run(first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args)

    return run


@no_autocast
def gelu_mlp_fwd_reference(h, w1, b1, w2, b2, for_backward=True):
    """h (M, C) -> (out (M, C_out), u (M, F), g (M, F)), all in h's dtype; u, g empty (0,) without for_backward."""
    dt = h.dtype
    u = F.linear(h, w1.to(dt), cast_optional(b1, dt))
    g = F.gelu(u)
    out = F.linear(g, w2.to(dt), cast_optional(b2, dt))
    if not for_backward:
        return out, h.new_empty((0,)), h.new_empty((0,))
    return out, u, g


@no_autocast
def gelu_mlp_bwd_reference(dout, h, u, g, w1, b1, w2, b2):
    """-> (dh (M, C), dw1, db1, dw2, db2); db1 / db2 (0,) for absent biases."""
    dt = h.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    d = dout.to(dt)
    du = ((d @ w2.to(dt)).to(acc) * gelu_grad(u.to(acc))).to(dt)
    return (du @ w1.to(dt), (du.t() @ h).to(w1.dtype), bias_grad(du, b1, acc), (d.t() @ g).to(w2.dtype),
            bias_grad(d, b2, acc))
