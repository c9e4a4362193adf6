"""The parts of a timm ViT `Block` that every execution form shares (masked reference, packed ragged).

Only how attention mixes rows differs between the forms; the pre-norm residual structure, the optional
q/k norms and the attention output path (optional norm and gate, proj) are written once here, so the two
forms cannot drift apart. Optional parts are Identity in DeiT and absent in older timm releases.
"""


def qk_norm(attn, q, k):
    """timm Attention's q_norm / k_norm (Identity unless qk_norm; absent in older timm)."""
    if getattr(attn, "q_norm", None) is None:
        return q, k
    return attn.q_norm(q), attn.k_norm(k)


def attention_output(attn, o, h):
    """o (..., H * d), the heads' outputs concatenated; h, the attention's input (for the optional gate)
    -> optional norm, optional sigmoid gate, proj."""
    norm = getattr(attn, "norm", None)
    if norm is not None:
        o = norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    return attn.proj_drop(attn.proj(o))


def block_forward_carried(block, x, pending, attention, add_norm, mlp):
    """block_forward with the residual add of the previous block's MLP branch moved into this block's first
    norm, so that each `x = x + drop_path(branch); h = norm(x)` pair is one `add_norm(norm, x, branch, drop_path)
    -> (x, h)` call (drop path applied in it: the fused op folds timm's into its pass): x is the residual stream
    without `pending` (the previous block's MLP branch and its drop path, a pair, or None for the first block);
    `mlp(block.mlp, h)` stands in for block.mlp(h).
    Returns (x + pending + the attention branch, this block's (MLP branch, drop path)): the caller adds it
    (`add_pending`, or an add_norm call). Random draws come in timm's order (each drop path's after its branch)."""
    x, h = add_norm(block.norm1, x, *(pending or (None, None)))
    x, h = add_norm(block.norm2, x, block.ls1(attention(block.attn, h)), block.drop_path1)
    return x, (block.ls2(mlp(block.mlp, h)), block.drop_path2)


def blocks_forward_carried(blocks, x, attention, add_norm, mlp):
    """block_forward_carried over consecutive blocks from a whole residual stream x: -> (the stream without the
    last block's MLP branch, (that branch, its drop path) or None without blocks), for the caller to add
    (`add_pending`) or fuse into its norm (`add_norm(norm, x, *pending)`)."""
    pending = None
    for block in blocks:
        x, pending = block_forward_carried(block, x, pending, attention, add_norm, mlp)
    return x, pending


def add_pending(x, pending):
    """x + drop_path(branch) for a (branch, drop path) pair from blocks_forward_carried; x itself for None."""
    if pending is None:
        return x
    branch, drop_path = pending
    return x + drop_path(branch)


def block_forward(block, x, attention):
    """timm `Block` (pre-norm, layer scale, drop path; eval mode) with `attention(attn, h)` standing in for
    block.attn(h). Rows other than attention's are treated independently, so x may be (B, N, C) or (T, C)."""
    x = x + block.drop_path1(block.ls1(attention(block.attn, block.norm1(x))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
