"""The accelerated SPViT-PiT model: each stage runs dense up to its selector, then packed and pruned.

Per stage s (see spvit_kernels.models.pit for the semantics):
    pooling                  conv on the (B, C, H, W) grid, fc on the [cls, package] rows (B, r, C)
    blocks before selector   plain timm blocks on (B, 1 + P + r - 1, C)
    selector                 token_scores / prune_pack (num_prefix=1, package_merge="add") on packed rows
    later blocks             packed rows + varlen_attention; PiT's head dims (32, 48) are zero-padded to
                             a size the op supports (`padded_varlen_attention`)
    end of stage             one index_copy_ of every packed patch row into a (B * P, C) buffer that holds
                             the stage's grid values at pruning time (the frozen values of dropped tokens);
                             cls and package rows gathered by cu_seqlens. No loop over images.
Top-k pruning needs no host synchronisation; threshold pruning syncs once per stage inside prune_pack.
"""

import torch
import torch.nn.functional as F

from ..models.pit import SPViTPiT
from ..ops._validate import HEAD_DIMS  # the head dims varlen_attention supports
from ..models.timm_block import attention_output, block_forward, qk_norm
from . import AcceleratedSPViT



def padded_varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """varlen_attention for any head dim d <= 128: q, k, v (T, H, d) are zero-padded on the last dim to the
    next supported size. Exact: zero channels add nothing to q . k, and the padded channels of the output
    (attention-weighted zeros) are sliced off. softmax_scale must be given (d**-0.5 for timm), as the op's
    default would use the padded size. Returns (T, H, d)."""
    d = q.shape[-1]
    if d in HEAD_DIMS:
        return torch.ops.spvit.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    padded = next((n for n in HEAD_DIMS if n > d), None)
    if padded is None:
        raise ValueError(f"q: head dim {d} is larger than varlen_attention's largest ({HEAD_DIMS[-1]})")
    pad = (0, padded - d)
    out = torch.ops.spvit.varlen_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), cu_seqlens, max_seqlen,
                                           softmax_scale)
    return out[..., :d]


def _packed_attention(attn, x, cu_seqlens, max_seqlen):
    """timm `Attention` on packed rows x (T, C) -> (T, C), any head dim up to 128."""
    T = x.shape[0]
    q, k, v = attn.qkv(x).view(T, 3, attn.num_heads, attn.head_dim).unbind(1)
    q, k = qk_norm(attn, q, k)
    out = padded_varlen_attention(q, k, v, cu_seqlens, max_seqlen, float(attn.scale))
    return attention_output(attn, out.reshape(T, attn.num_heads * attn.head_dim), x)


class AcceleratedPiT(SPViTPiT, AcceleratedSPViT):
    """An SPViTPiT whose stages run pruned and packed on the fused ops (same modules, same outputs)."""

    @staticmethod
    def check_accelerable(model):
        """Every head dim is padded up to a supported one: only dims above 128 are refused."""
        for t in model.vit.transformers:
            d = t.blocks[0].attn.head_dim
            if d > HEAD_DIMS[-1]:
                raise ValueError(f"model: head dim {d} is larger than varlen_attention supports "
                                 f"({HEAD_DIMS[-1]})")

    def _forward_packed(self, images, return_info):
        """images (B >= 1, in_chans, H, W) -> logits (B, num_classes), or (logits, info) (info as SPViTPiT's).
        AcceleratedSPViT.forward wraps it (inference-only checks, batch 0)."""
        grid, rows = self.forward_stem(images)
        stage_rows = []  # for return_info: (cu_seqlens, grid position of every packed row) per selector
        for t_index, t in enumerate(self.vit.transformers):
            grid, rows = self.pool_stage_input(t_index, grid, rows)
            B, C, Hs, Ws = grid.shape
            P = Hs * Ws
            x = t.norm(torch.cat([rows[:, :1], grid.flatten(2).transpose(1, 2), rows[:, 1:]], dim=1))
            cu = None
            for j, block in enumerate(t.blocks):
                s = self.selector_at.get((t_index, j))
                if s is not None:
                    frozen = x[:, 1: 1 + P].reshape(B * P, C)  # the grid values when the selector drops tokens
                    x, cu, patch_id, max_len = self._prune_dense(s, x, P)
                    if return_info:
                        stage_rows.append((cu, patch_id))
                x = block(x) if cu is None else block_forward(
                    block, x, lambda attn, h: _packed_attention(attn, h, cu, max_len))
            if cu is None:  # a stage without selector stays dense
                grid = x[:, 1: 1 + P].transpose(1, 2).reshape(B, C, Hs, Ws)
                rows = torch.cat([x[:, :1], x[:, 1 + P:]], dim=1)
            else:
                grid, rows = self._unpack(x, cu, patch_id, frozen, (B, C, Hs, Ws))
        logits = self.forward_head_from_cls(rows[:, 0])
        if not return_info:
            return logits
        info = self._packed_info(stage_rows)
        info["grid_sizes"] = self.grid_sizes()
        return logits, info

    def _prune_dense(self, stage, x, P):
        """Selector `stage` on the dense rows x (B, N, C) = [cls, P grid tokens, 0 or 1 package row].

        Returns (packed rows (T, C), cu_seqlens (B+1,) int32, grid position of every packed row (T,) int64
        with -1 for cls and -2 for the package row, an upper bound on the longest image)."""
        cfg = self.config
        B, N, C = x.shape
        n_pkg = N - 1 - P
        cu_in = torch.arange(B + 1, device=x.device, dtype=torch.int32) * N
        flat = x.reshape(B * N, C)
        keep_score, keep_prob = torch.ops.spvit.token_scores(
            flat, cu_in, n_pkg, self.selectors[stage].num_heads, *self.selectors[stage].op_weights(),
            num_prefix=1)
        num_keep = self.num_keep(stage, P) if cfg.pruning == "topk" else None
        packed, cu, src = torch.ops.spvit.prune_pack(
            flat, cu_in, keep_score, keep_prob, n_pkg, cfg.pruning, cfg.threshold_at(stage), num_keep, cfg.package,
            package_merge="add", num_prefix=1)
        # Grid position of each input row: -1 the class row, -2 a package row.
        pos_in = torch.arange(N, device=x.device) - 1
        pos_in = torch.where(pos_in >= P, -2, pos_in).repeat(B)
        patch_id = torch.where(src >= 0, pos_in[src.clamp(min=0)], torch.full_like(src, -2))
        max_len = 2 + (num_keep if cfg.pruning == "topk" else P)  # cls + kept + the one package row
        return packed, cu, patch_id, max_len

    def _unpack(self, x, cu, patch_id, frozen, shape):
        """Packed rows x (T, C) at the end of a stage -> (grid (B, C, H, W), [cls, package] rows (B, 2, C)).

        The grid starts from `frozen` (B * P, C), the values at pruning time, and every packed patch row is
        written to its position in one index_copy_ (rows that are not patches go to a scratch row)."""
        B, C, Hs, Ws = shape
        P = Hs * Ws
        image, _, _ = self._row_layout(x, cu)
        target = torch.where(patch_id >= 0, image * P + patch_id, B * P)
        buffer = torch.cat([frozen, frozen.new_zeros(1, C)]).to(x.dtype)
        buffer.index_copy_(0, target, x)
        grid = buffer[: B * P].view(B, P, C).transpose(1, 2).reshape(B, C, Hs, Ws)
        rows = torch.stack([x[cu[:-1].long()], x[cu[1:].long() - 1]], dim=1)
        return grid, rows
