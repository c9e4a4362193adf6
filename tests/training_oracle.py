"""Independent float64 references of SPViT's training formulas (design section 8), written from the formulas, with
loops over heads and images where the library vectorises: the selector with the weighted global mean, the Gumbel
straight-through keep, the training package token, and the loss terms."""

import math

import torch


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def lin(layer, x):
    return x @ layer.weight.double().T + layer.bias.double()


def selector_train(sel, S, m):
    """sel: a TokenSelector; S (B, M, C), m (B, M) -> (score (B, M, 2), prob (B, M, 2)) in float64, head by head."""
    S, m = S.double(), m.double()
    B, M, C = S.shape
    H, d = sel.num_heads, sel.head_dim
    hbar = torch.stack([S[..., h * d:(h + 1) * d].mean(-1) for h in range(H)], -1)      # (B, M, H)
    w = torch.sigmoid(lin(sel.se2, gelu(lin(sel.se1, hbar))))
    score = torch.zeros(B, M, 2, dtype=torch.float64)
    prob = torch.zeros(B, M, 2, dtype=torch.float64)
    for h in range(H):
        x = S[..., h * d:(h + 1) * d]
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        ln = (x - mu) / torch.sqrt(var + 1e-5) * sel.norm.weight.double() + sel.norm.bias.double()
        u = gelu(lin(sel.proj_in, ln))
        g = (u[..., d // 2:] * m[..., None]).sum(1, keepdim=True) / m.sum(1)[:, None, None]
        z = torch.cat([u[..., :d // 2], g.expand(B, M, d - d // 2)], -1)
        logits = lin(sel.mlp3, gelu(lin(sel.mlp2, gelu(lin(sel.mlp1, z)))))
        score += w[..., h:h + 1] * torch.log_softmax(logits, -1)
        prob += w[..., h:h + 1] * torch.softmax(logits, -1)
    ws = w.sum(-1, keepdim=True)
    return score / ws, prob / ws


def gumbel_keep(score, noise, tau):
    """Value: 1 where (score + noise)[keep] >= [drop]; gradient: that of softmax((score + noise) / tau)[keep]."""
    y = torch.softmax((score + noise) / tau, -1)[..., 0]
    hard = ((score + noise)[..., 0] >= (score + noise)[..., 1]).to(y.dtype)
    return hard + (y - y.detach())


def package(x, keep_prob, drop, mode):
    """sum_i keep_prob_i drop_i x_i (/ sum_i keep_prob_i drop_i for "mean", 0 when that is 0), image by image."""
    out = []
    for b in range(x.shape[0]):
        w = keep_prob[b].double() * drop[b].double()
        s = (w[:, None] * x[b].double()).sum(0)
        if mode == "mean":
            t = w.sum()
            s = s / t if t != 0 else torch.zeros_like(s)
        out.append(s)
    return torch.stack(out)


def loss_terms(logits, tokens, decision, decisions, t_logits, t_tokens, targets, ratios, token_loss):
    """The four unweighted terms (clf with label smoothing 0.1 on class indices, or soft-target CE)."""
    logp = torch.log_softmax(logits.double(), -1)
    if targets.dim() == 2:
        clf = -(targets.double() * logp).sum(-1).mean()
    else:
        nll = -logp.gather(1, targets[:, None]).squeeze(1)
        clf = (0.9 * nll - 0.1 * logp.mean(-1)).mean()
    ratio = sum((d.double().mean() - r) ** 2 for d, r in zip(decisions, ratios)) / len(decisions)
    lt = torch.log_softmax(t_logits.double(), -1)
    cls_kl = (lt.exp() * (lt - logp)).sum() / logits.shape[0]
    rows = [(b, i) for b in range(decision.shape[0]) for i in range(decision.shape[1]) if decision[b, i] > 0.5]
    if not rows:
        token = torch.zeros((), dtype=torch.float64)
    elif token_loss == "mse":
        token = torch.stack([((tokens[b, i].double() - t_tokens[b, i].double()) ** 2).mean() for b, i in rows]).mean()
    else:
        kl = []
        for b, i in rows:
            ps, pt = torch.log_softmax(tokens[b, i].double(), -1), torch.log_softmax(t_tokens[b, i].double(), -1)
            kl.append((pt.exp() * (pt - ps)).sum())
        token = torch.stack(kl).sum() / len(rows)
    return {"clf": clf, "ratio": ratio, "cls_kl": cls_kl, "token": token}
