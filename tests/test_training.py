"""SPViT training (design section 8): the training forward's pieces against float64 references written in
tests/training_oracle.py, gradchecks, the noise-free consistency with inference for every family, the loss, the
recipe helpers, a few optimisation steps, the official init, and the errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from spvit_kernels import accelerate
from spvit_kernels.models import calibrate_thresholds, create_model, from_timm, list_models, load_checkpoint
from spvit_kernels.models.selector import TokenSelector
from spvit_kernels.models.train_forward import gumbel_keep, pool_package_train
from spvit_kernels.training import (SPViTLoss, TrainOutput, lr_at_epoch, param_groups, policy_attention,
                                    policy_attention_reference, scaled_lr, set_lr, teacher_outputs)

from . import training_oracle as oracle

NUM_CLASSES = 5
ROWS = [197, 123, 31, 1]


def _tiny_vit(**kw):
    args = dict(img_size=32, patch_size=4, num_classes=NUM_CLASSES, embed_dim=64, depth=4, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args)


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


# --- the pieces ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("kind", ["soft", "binary", "ones"])
def test_selector_train_scores(M, kind):
    sel = TokenSelector(64, 2).double()
    g = torch.Generator().manual_seed(M)
    S = torch.randn(2, M, 64, generator=g, dtype=torch.float64)
    m = {"soft": torch.rand(2, M, generator=g), "ones": torch.ones(2, M),
         "binary": (torch.rand(2, M, generator=g) < 0.6).float()}[kind].double()
    m[:, 0] = 1.0  # every image keeps a row in the mean
    score, prob = sel.train_scores(S, m)
    want_s, want_p = oracle.selector_train(sel, S, m)
    torch.testing.assert_close(score, want_s, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(prob, want_p, atol=1e-10, rtol=1e-10)


def test_selector_train_scores_gradcheck():
    sel = TokenSelector(16, 2).double()
    S = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 5, dtype=torch.float64).add_(0.1).requires_grad_()
    torch.autograd.gradcheck(lambda S, m: sel.train_scores(S, m), (S, m))


def test_selector_inference_form_unchanged():
    """score_masked (inference) is the training form with 0/1 weights: keep_score = score[keep] - score[drop]."""
    sel = TokenSelector(64, 2).double()
    S = torch.randn(2, 31, 64, dtype=torch.float64)
    rows = torch.rand(2, 31) < 0.7
    rows[:, 0] = True
    ks, kp = sel.score_masked(S, rows)
    score, prob = sel.train_scores(S, rows.double())
    torch.testing.assert_close(ks, score[..., 0] - score[..., 1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(kp, prob[..., 0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gumbel_straight_through(tau):
    score = torch.log_softmax(torch.randn(3, 17, 2, dtype=torch.float64), -1).requires_grad_()
    noise = -torch.empty(3, 17, 2, dtype=torch.float64).exponential_().log()
    keep = gumbel_keep(score, noise, tau)
    want = oracle.gumbel_keep(score, noise, tau)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(keep, want, atol=1e-12, rtol=0)
    g = torch.randn(3, 17, dtype=torch.float64)
    got_grad, = torch.autograd.grad(keep, score, g)
    want_grad, = torch.autograd.grad(want, score, g)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-12)
    # As F.gumbel_softmax(hard=True)[..., 0] with the same noise (its value; ties have probability 0 here).
    torch.testing.assert_close(keep.detach(), F.one_hot(((score + noise) / tau).argmax(-1), 2)[..., 0].double())


def test_gumbel_tie_keeps_and_drawn_noise_is_gumbel():
    score = torch.zeros(1, 4, 2)
    assert gumbel_keep(score, torch.zeros(1, 4, 2), 1.0).tolist() == [[1.0] * 4]
    torch.manual_seed(1)
    draws = []
    for _ in range(50):
        s = torch.zeros(100, 100, 2)
        # keep iff g0 >= g1: with two independent Gumbel draws, probability 1/2
        draws.append(gumbel_keep(s, None, 1.0).mean())
    assert abs(torch.stack(draws).mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_package_token(mode):
    x = torch.randn(3, 31, 8, dtype=torch.float64)
    kp = torch.rand(3, 31, dtype=torch.float64)
    drop = (torch.rand(3, 31) < 0.4).double()
    drop[2] = 0  # nothing dropped: mean is 0
    torch.testing.assert_close(pool_package_train(x, kp, drop, mode), oracle.package(x, kp, drop, mode))
    args = (x.requires_grad_(), kp.requires_grad_(), (drop * 0.8 + 0.1).requires_grad_())
    torch.autograd.gradcheck(lambda a, b, c: pool_package_train(a, b, c, mode), args)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("N", ROWS)
def test_policy_attention_autograd_form(N, eps):
    """The CPU autograd form against the paper's eye-matrix form: forward and every gradient, policy included."""
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(2, 2, N, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    policy = (torch.rand(2, N, generator=g, dtype=torch.float64) < 0.5).double()
    policy[0, : min(3, N)] = torch.rand(min(3, N), generator=g, dtype=torch.float64)
    policy.requires_grad_()
    out = policy_attention(q, k, v, policy, eps)
    want = policy_attention_reference(q, k, v, policy, eps)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, policy), dout)
    ref = torch.autograd.grad(want, (q, k, v, policy), dout)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_policy_attention_gradcheck():
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    p = torch.rand(1, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, p: policy_attention(q, k, v, p, 0.0), (q, k, v, p))


# --- the model's training forward -----------------------------------------------------------------------------

CHEAP_MODELS = [n for n in list_models() if n not in ("spvit_lvvit_m", "spvit_deit_base", "spvit_deit_base_distilled",
                                                       "spvit_pit_s")]


def _family_model(name, merge, **cfg):
    if name.startswith("timm_"):
        kw = {"timm_reg": dict(reg_tokens=2), "timm_avg": dict(global_pool="avg", class_token=False),
              "timm_avg_cls": dict(global_pool="avg")}[name]
        return from_timm(_tiny_vit(**kw), selector_layers=(1, 2, 3), package_merge=merge, **cfg)
    return create_model(name, num_classes=NUM_CLASSES, package_merge=merge, **cfg)


def _image_size(model):
    size = getattr(model.vit.patch_embed, "img_size", (224, 224))
    return size[0] if isinstance(size, (tuple, list)) else size


FAMILY_CASES = ([(n, "concat") for n in CHEAP_MODELS if "pit" not in n] + [(n, "add") for n in CHEAP_MODELS]
                + [(n, m) for n in ("timm_reg", "timm_avg", "timm_avg_cls") for m in ("concat", "add")])


@pytest.mark.parametrize("name, merge", FAMILY_CASES)
def test_noise_free_training_equals_inference(name, merge):
    """Zero noise, train_attn_eps 0: the training logits are the inference logits with threshold 0, and each
    decision is the kept set (design section 8); here with thresholds t_s, which the noise (-t_s, 0) shifts to 0. LV-ViT's BatchNorm stem stays in eval mode (train-mode BatchNorm
    uses batch statistics, which is not part of the pruning semantics); dropout / drop path are off."""
    torch.manual_seed(3)
    model = _family_model(name, merge, pruning="threshold", threshold=0.0, train_attn_eps=0.0).double()
    size = _image_size(model)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    # Thresholds t_s under which each stage keeps about its keep ratio (so that some tokens are kept and some
    # dropped); in training the noise (-t_s, 0) makes the decision keep iff keep_score >= t_s.
    thresholds = calibrate_thresholds(model.eval(), torch.randn(4, 3, size, size, dtype=torch.float64))
    _no_dropout(model).train()
    if "lvvit" in name:
        model.vit.patch_embed.eval()
    S = model.config.num_stages
    out = model(images, gumbel_noise=[torch.tensor([-t, 0.0], dtype=torch.float64) for t in thresholds])
    assert isinstance(out, TrainOutput) and len(out.decisions) == S
    model.eval()
    with torch.no_grad():
        logits, info = model(images, return_info=True)
    torch.testing.assert_close(out.logits, logits, atol=1e-9, rtol=1e-9)
    some_kept = some_dropped = False
    for s in range(S):
        for b in range(2):
            kept = torch.nonzero(out.decisions[s][b] > 0.5).flatten()
            assert torch.equal(kept, info["kept_indices"][s][b]), f"stage {s} image {b}"
            some_kept |= len(kept) > 0
            some_dropped |= len(kept) < out.decisions[s].shape[1]
    assert some_kept and some_dropped, "the case must keep some tokens and drop some"
    B, P, C = out.tokens.shape
    assert B == 2 and out.decision.shape == (2, P) and not out.decision.requires_grad
    assert all(d.requires_grad for d in out.decisions)


@pytest.mark.parametrize("name", ["spvit_lvvit_s", "spvit_pit_ti"])
def test_dropped_rows_keep_their_values(name):
    """LV-ViT and PiT in training: a row dropped at the last stage keeps its value through the later blocks."""
    torch.manual_seed(4)
    model = _no_dropout(create_model(name, num_classes=NUM_CLASSES)).double().train()
    images = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    captured = {}
    last = model.config.selector_layers[-1]
    blocks = model.vit.blocks if hasattr(model.vit, "blocks") else [b for t in model.vit.transformers for b in t.blocks]
    handle = blocks[last].norm1.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    # Noise of +-10 on the keep logit decides (scores are O(1)): about 70% kept at each stage.
    sizes = model.grid_sizes() if hasattr(model, "grid_sizes") else [(14, 14)] * model.config.num_stages
    g = torch.Generator().manual_seed(0)
    noise = [torch.stack([torch.where(torch.rand(1, h * w, generator=g) < 0.7, 10.0, -10.0),
                          torch.zeros(1, h * w)], -1).double() for h, w in sizes]
    out = model(images, gumbel_noise=noise)
    handle.remove()
    x_in, P = captured["x"], out.tokens.shape[1]
    dropped = out.decision[0] < 0.5
    assert dropped.any() and (~dropped).any()
    norm = model.vit.norm
    frozen = norm(x_in[0, 1: 1 + P][dropped])  # the block input's rows, normed as the tokens are
    torch.testing.assert_close(out.tokens[0][dropped], frozen, atol=1e-10, rtol=1e-10)


def test_deit_dropped_rows_keep_moving():
    torch.manual_seed(4)
    model = _no_dropout(from_timm(_tiny_vit(), selector_layers=(1, 2, 3))).double().train()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    captured = {}
    handle = model.vit.blocks[3].norm1.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    out = model(images, gumbel_noise=[torch.zeros(1, 1, 2)] * 3)
    handle.remove()
    dropped = out.decision[0] < 0.5
    assert dropped.any()
    moved = out.tokens[0][dropped] - model.vit.norm(captured["x"][0, 1:65][dropped])
    assert moved.abs().max() > 1e-3  # the official form: dropped rows go on through the blocks


def test_gradients_reach_every_selector_and_earlier_stages():
    torch.manual_seed(5)
    model = _no_dropout(from_timm(_tiny_vit(), selector_layers=(1, 2, 3))).train()
    images = torch.randn(4, 3, 32, 32)
    out = model(images)
    loss = SPViTLoss(copy.deepcopy(model.vit), model.config.keep_ratios)(images, out, torch.randint(0, 5, (4,)))
    loss.backward()
    for s, sel in enumerate(model.selectors):
        for name, p in sel.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (s, name)
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # Through the later stage's decision and package token alone, the first selector still gets a gradient.
    model.zero_grad()
    out = model(images)
    out.decisions[2].sum().backward()
    assert model.selectors[0].mlp3.weight.grad.abs().sum() > 0


# --- the loss -------------------------------------------------------------------------------------------------

def _loss_case(token_loss, soft):
    torch.manual_seed(6)
    model = _no_dropout(from_timm(_tiny_vit(), selector_layers=(1, 2, 3))).double().train()
    teacher = _tiny_vit().double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.softmax(torch.randn(3, NUM_CLASSES), -1).double() if soft else torch.tensor([0, 3, 4])
    out = model(images)
    return model, teacher, images, targets, out


@pytest.mark.parametrize("token_loss", ["mse", "kl"])
@pytest.mark.parametrize("soft", [False, True])
def test_loss_terms(token_loss, soft):
    model, teacher, images, targets, out = _loss_case(token_loss, soft)
    loss_fn = SPViTLoss(teacher, model.config.keep_ratios, token_loss=token_loss)
    loss = loss_fn(images, out, targets)
    with torch.no_grad():
        t_logits, t_tokens = teacher_outputs(teacher.eval(), images)
    want = oracle.loss_terms(out.logits, out.tokens, out.decision, out.decisions, t_logits, t_tokens, targets,
                             model.config.keep_ratios, token_loss)
    for name, value in want.items():
        assert loss_fn.last[name] == pytest.approx(float(value.detach()), rel=1e-9, abs=1e-12), name
    total = want["clf"] + 2.0 * want["ratio"] + 0.5 * (want["cls_kl"] + want["token"])
    assert float(loss.detach()) == pytest.approx(float(total), rel=1e-9)
    assert loss_fn.last["total"] == pytest.approx(float(total), rel=1e-9)


def test_loss_no_kept_row_and_no_teacher():
    model, teacher, images, targets, out = _loss_case("mse", False)
    none_kept = out._replace(decision=torch.zeros_like(out.decision))
    loss_fn = SPViTLoss(teacher, model.config.keep_ratios)
    loss_fn(images, none_kept, targets)
    assert loss_fn.last["token"] == 0.0
    plain = SPViTLoss(None, model.config.keep_ratios)
    plain(images, out, targets)
    assert set(plain.last) == {"clf", "ratio", "total"}


def test_loss_ratio_multipliers():
    """The optional Lagrange multipliers: the loss gains sum_s lambda_s (mean_s - r_s) / S, its gradient lowers the
    kept ratios when lambda > 0, and update_multipliers takes dual-ascent steps (off by default: the paper's loss)."""
    model, teacher, images, targets, out = _loss_case("mse", False)
    ratios = model.config.keep_ratios
    plain = SPViTLoss(teacher, ratios)
    plain.update_multipliers([1.0] * len(ratios))  # eta 0: a no-op
    assert plain.ratio_multipliers.abs().sum() == 0
    base = float(plain(images, out, targets).detach())
    loss_fn = SPViTLoss(teacher, ratios, ratio_multiplier_lr=0.5)
    below = [r - 0.1 for r in ratios]  # below every target: lambda stays at 0 (projected on lambda >= 0)
    loss_fn.update_multipliers(below)
    assert loss_fn.ratio_multipliers.tolist() == [0.0] * len(ratios)
    kept = [r + float(torch.rand(())) * 0.5 for r in ratios[:-1]] + [ratios[-1] - 0.05]
    loss_fn.update_multipliers(kept)
    loss_fn.update_multipliers(kept)
    lam = [max(0.0, 2 * 0.5 * (k - r)) for k, r in zip(kept, ratios)]
    assert lam[-1] == 0 and min(lam[:-1]) > 0
    assert loss_fn.ratio_multipliers.tolist() == pytest.approx(lam, rel=1e-12)
    loss_fn.update_multipliers([r - 0.01 for r in ratios])  # a step below the target lowers each one by eta * 0.01
    lam = [max(0.0, m_s - 0.5 * 0.01) for m_s in lam]
    assert loss_fn.ratio_multipliers.tolist() == pytest.approx(lam, rel=1e-12)
    assert "ratio_multipliers" not in loss_fn.state_dict()  # non-persistent: the train command checkpoints it
    total = loss_fn(images, out, targets)
    means = [float(d.detach().double().mean()) for d in out.decisions]
    extra = sum(m_s * (d - r) for m_s, d, r in zip(lam, means, ratios)) / len(ratios)
    assert float(total.detach()) == pytest.approx(base + extra, rel=1e-9, abs=1e-12)
    # The multiplier term's gradient on each stage's decisions is lambda_s / (S * elements) >= 0: it pushes the
    # kept ratios down, never up.
    rest = dict(logits=out.logits.detach(), tokens=out.tokens.detach(), decision=out.decision.detach())
    decisions = [d.detach().clone().requires_grad_(True) for d in out.decisions]
    loss_fn(images, out._replace(decisions=decisions, **rest), targets).backward()
    plain_decisions = [d.detach().clone().requires_grad_(True) for d in out.decisions]
    plain(images, out._replace(decisions=plain_decisions, **rest), targets).backward()
    for d, p, m_s in zip(decisions, plain_decisions, lam):
        torch.testing.assert_close(d.grad - p.grad, torch.full_like(d, m_s / (len(ratios) * d.numel())))
    with pytest.raises(ValueError, match="ratio_multiplier_lr"):
        SPViTLoss(teacher, ratios, ratio_multiplier_lr=-1.0)
    with pytest.raises(ValueError, match="kept has 1 ratios"):
        loss_fn.update_multipliers([0.5])


def test_teachers():
    """timm ViT, timm PiT, LVViT and a plain (logits, tokens) module all give (logits (B, K), tokens (B, P, C))."""
    import timm

    from spvit_kernels.models.lvvit import LVViT

    images = torch.randn(2, 3, 224, 224)
    for teacher, P in ((timm.create_model("pit_ti_224", num_classes=5), 49),
                       (LVViT(num_classes=5, embed_dim=64, depth=2, num_heads=2), 196)):
        logits, tokens = teacher_outputs(teacher.eval(), images)
        assert logits.shape == (2, 5) and tokens.shape[:2] == (2, P)
        torch.testing.assert_close(logits, teacher(images), atol=1e-5, rtol=1e-5)

    class Pair(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 5), torch.zeros(x.shape[0], 64, 64)

    assert teacher_outputs(Pair(), torch.zeros(2, 3, 32, 32))[1].shape == (2, 64, 64)
    vit = _tiny_vit().eval()
    logits, tokens = teacher_outputs(vit, torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 64, 64)


def test_loss_errors_and_teacher_stays_eval():
    model, teacher, images, targets, out = _loss_case("mse", False)
    with pytest.raises(ValueError, match="keep_ratios has 2 ratios but the model has 3 stages"):
        SPViTLoss(teacher, (0.5, 0.3))(images, out, targets)
    with pytest.raises(ValueError, match="teacher: its tokens have shape"):
        SPViTLoss(_tiny_vit(patch_size=8).double(), model.config.keep_ratios)(images, out, targets)
    with pytest.raises(ValueError, match="token_loss"):
        SPViTLoss(teacher, (0.5,), token_loss="l1")
    with pytest.raises(ValueError, match="keep_ratios"):
        SPViTLoss(teacher, (1.5,))
    bad = out._replace(logits=out.logits.detach().clone().fill_(float("nan")))
    with pytest.raises(FloatingPointError, match="the clf term"):
        SPViTLoss(teacher, model.config.keep_ratios)(images, bad, targets)
    loss_fn = SPViTLoss(teacher, model.config.keep_ratios)
    loss_fn.train()
    assert not teacher.training


# --- recipe -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token_loss", ["mse", "kl"])
def test_training_step_compiles_fullgraph(token_loss):
    """A whole training step (student forward with policy attention, teacher, loss; then backward) is one graph
    under torch.compile(fullgraph=True) and gives eager's loss and gradients. The aot_eager backend traces forward
    and backward through AOT autograd (the ops' fakes and autograd formulas) without generating C++ code."""
    torch.manual_seed(0)
    model = _no_dropout(from_timm(_tiny_vit(), selector_layers=(1, 2, 3))).train()
    loss_fn = SPViTLoss(copy.deepcopy(model.vit), model.config.keep_ratios, token_loss=token_loss)
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    # Gumbel noise leaning to keep, so that rows survive the three stages and the token term is not 0.
    noise = [0.3 * torch.randn(3, 64, 2) + torch.tensor([1.5, 0.0]) for _ in range(3)]

    def step(images, noise, targets):
        return loss_fn(images, model(images, gumbel_noise=noise), targets)

    def grads(fn):
        model.zero_grad()
        loss = fn(images, noise, targets)
        loss.backward()
        return loss.detach(), dict(loss_fn.last), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}

    want_loss, want_last, want = grads(step)
    got_loss, got_last, got = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    assert got_last.keys() == want_last.keys() and got_last["token"] > 0, (got_last, want_last)
    assert got.keys() == want.keys() and any(n.startswith("selectors.0.") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_param_groups():
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3))
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = g["name"]
            n = names[id(p)]
            assert g["name"].startswith("selectors") == n.startswith("selectors."), n
            no_decay = p.dim() <= 1 or n.endswith(".bias")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
    for n, p in model.named_parameters():
        frozen = n.endswith(("cls_token", "pos_embed"))
        assert (id(p) in seen) == (not frozen) and p.requires_grad == (not frozen), n


def test_lr_schedule():
    lr = scaled_lr(5e-4, 256)
    assert lr == pytest.approx(2.5e-4)
    for epoch in range(30):
        sel, bb = lr_at_epoch(epoch, 30, lr)
        import math
        want = 1e-5 + (lr - 1e-5) * (1 + math.cos(math.pi * epoch / 30)) / 2
        assert sel == pytest.approx(want)
        assert bb == (0.0 if epoch < 5 else pytest.approx(min(0.01 * lr, want)))
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3))
    opt = torch.optim.AdamW(param_groups(model))
    set_lr(opt, 1e-3, 1e-5)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["selectors"] == 1e-3
    assert {g["name"]: g["lr"] for g in opt.param_groups}["backbone"] == 1e-5


def test_a_few_steps_move_the_kept_ratios_to_the_targets():
    torch.manual_seed(0)
    vit = _tiny_vit()
    teacher = copy.deepcopy(vit)
    model = from_timm(vit, selector_layers=(1, 2, 3)).train()
    loss_fn = SPViTLoss(teacher, model.config.keep_ratios)
    opt = torch.optim.AdamW(param_groups(model))
    set_lr(opt, 1e-2, 0.0)
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    history = []
    for _ in range(30):
        out = model(images)
        loss = loss_fn(images, out, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss_fn.last["ratio"], loss_fn.last["total"]))
    first = sum(h[0] for h in history[:3]) / 3
    last = sum(h[0] for h in history[-3:]) / 3
    assert last < first / 2, history
    assert sum(h[1] for h in history[-3:]) < sum(h[1] for h in history[:3])


# --- init, accelerated training, errors, checkpoints ----------------------------------------------------------

@pytest.mark.official_init
def test_fresh_selectors_follow_the_official_init():
    sel = TokenSelector(384, 6)
    for m in sel.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.bias.abs().max() == 0 and m.weight.abs().max() <= 2.0
            if m.weight.numel() >= 512:
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.15)
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and m.bias.abs().max() == 0


def test_accelerated_model_trains_on_the_same_parameters():
    torch.manual_seed(7)
    ref = from_timm(_tiny_vit(), selector_layers=(1, 2, 3))
    acc = accelerate(copy.deepcopy(ref))
    images = torch.randn(2, 3, 32, 32)
    noise = [torch.randn(2, 64, 2) for _ in range(3)]
    outs = [m.train()(images, gumbel_noise=noise) for m in (ref, acc)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=0, rtol=0)
    outs[1].logits.sum().backward()
    assert acc.selectors[0].mlp3.weight.grad is not None
    ref.eval(), acc.eval()
    with torch.no_grad():
        torch.testing.assert_close(acc(images), ref(images), atol=1e-4, rtol=1e-4)


def test_errors():
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3)).train()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="gumbel_noise must hold one tensor per stage"):
        model(images, gumbel_noise=[torch.zeros(2, 64, 2)])
    with pytest.raises(ValueError, match=r"gumbel_noise\[1\] must broadcast"):
        model(images, gumbel_noise=[torch.zeros(2, 64, 2), torch.zeros(2, 63, 2), torch.zeros(2, 64, 2)])
    with pytest.raises(TypeError, match="gumbel_noise"):
        model(images, gumbel_noise=torch.zeros(2, 64, 2))
    with pytest.raises(ValueError, match="return_info"):
        model(images, return_info=True)
    model.eval()
    with pytest.raises(ValueError, match="gumbel_noise is only used in training mode"):
        model(images, gumbel_noise=[torch.zeros(1, 1, 2)] * 3)
    with pytest.raises(ValueError, match="gumbel_tau"):
        from_timm(_tiny_vit(), selector_layers=(1, 2, 3), gumbel_tau=0.0)
    with pytest.raises(ValueError, match="train_attn_eps"):
        from_timm(_tiny_vit(), selector_layers=(1, 2, 3), train_attn_eps=-1.0)


def test_trained_model_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(8)
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3)).train()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    images = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        out = model(images)
        SPViTLoss(None, model.config.keep_ratios)(images, out, torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    fresh = from_timm(_tiny_vit(), selector_layers=(1, 2, 3))
    load_checkpoint(fresh, str(tmp_path / "ckpt.pth"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images), atol=0, rtol=0)
