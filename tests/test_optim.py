"""lbtrain.optim: LARS and LAMB against their papers' equations, AdamW/SGD against torch, groups, validation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lbtrain.config import ConfigError
from lbtrain.optim import (
    LAMB,
    LARS,
    OPTIMIZER_NAMES,
    OPTIMIZERS,
    build_optimizer,
    param_groups,
    uses_sgd_noise_scale,
    validate_optimizer_options,
)

# Parameters of tiny_model() that exclude_bn_bias=True takes out of weight decay and the trust ratio.
EXCLUDED = {"0.bias", "2.weight", "2.bias", "3.bias"}
STEPS = 6
LRS = [0.8, 0.8, 0.5, 0.5, 0.3, 0.2]  # a schedule: the lr is set on the groups before every step, like the trainer


def tiny_model(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Linear + BatchNorm1d + Linear: BN parameters, Linear biases, and one zero-norm parameter (3.bias).

    The ReLU comes before the BN so that the first bias has a gradient (a bias right before a BN has none).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.5, 0.5)
        model[3].bias.zero_()  # ||w|| = 0 on the first step: the trust ratio must fall back to 1
    return model.to(dtype)


def batches(n: int = STEPS, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train(model: nn.Module, opt: torch.optim.Optimizer, data, lrs=LRS) -> list[dict[str, torch.Tensor]]:
    out = []
    for (x, y), lr in zip(data, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        backward(model, x, y)
        opt.step()
        out.append(snapshot(model))
    return out


# ---- The papers' update equations, written out independently of lbtrain.optim -------------------------------------

def lars_reference(model, data, lrs, *, momentum, wd, nesterov, tc, eps, exclude) -> list[dict[str, torch.Tensor]]:
    """You, Gitman, Ginsburg 2017, Alg. 1 (global lr outside the momentum, as in NVIDIA apex / timm)."""
    v: dict[str, torch.Tensor] = {}
    out = []
    for (x, y), lr in zip(data, lrs):
        backward(model, x, y)
        with torch.no_grad():
            for name, w in model.named_parameters():
                g = w.grad
                excluded = exclude and name in EXCLUDED
                decay = 0.0 if excluded else wd
                w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                if not excluded and w_norm > 0 and g_norm > 0:
                    local_lr = tc * w_norm / (g_norm + decay * w_norm + eps)
                else:
                    local_lr = 1.0
                d = g + decay * w
                v[name] = local_lr * d if name not in v else momentum * v[name] + local_lr * d
                update = local_lr * d + momentum * v[name] if nesterov else v[name]
                w -= lr * update
        out.append(snapshot(model))
    return out


def lamb_reference(model, data, lrs, *, betas, wd, eps, exclude, bias_correction=True,
                   phi=lambda z: z) -> list[dict[str, torch.Tensor]]:
    """You et al. 2019, Alg. 2 (with or without bias correction), phi the scaling function of ||w||."""
    b1, b2 = betas
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    out = []
    for t, ((x, y), lr) in enumerate(zip(data, lrs), start=1):
        backward(model, x, y)
        with torch.no_grad():
            for name, w in model.named_parameters():
                g = w.grad
                excluded = exclude and name in EXCLUDED
                decay = 0.0 if excluded else wd
                m[name] = b1 * m.get(name, torch.zeros_like(w)) + (1 - b1) * g
                v[name] = b2 * v.get(name, torch.zeros_like(w)) + (1 - b2) * g * g
                m_hat, v_hat = m[name] / (1 - b1 ** t), v[name] / (1 - b2 ** t)
                if not bias_correction:
                    m_hat, v_hat = m[name], v[name]
                r = m_hat / (torch.sqrt(v_hat) + eps) + decay * w
                w_norm, r_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(r)
                ratio = phi(w_norm) / r_norm if not excluded and w_norm > 0 and r_norm > 0 else 1.0
                w -= lr * ratio * r
        out.append(snapshot(model))
    return out


def assert_trajectories_close(ours, ref, rtol=1e-12, atol=1e-13):
    assert len(ours) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol,
                                       msg=lambda m, s=step, n=name: f"step {s} {n}: {m}")


def assert_moved(model0: nn.Module, final: dict[str, torch.Tensor]) -> None:
    """Guard against a vacuous comparison: every parameter changed visibly."""
    for name, p in model0.named_parameters():
        assert (final[name] - p).abs().max() > 1e-4, name


# ---- 1. LARS -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_paper_equations(exclude, nesterov):
    opts = dict(momentum=0.9, nesterov=nesterov, eps=1e-8)
    model, ref_model, data = tiny_model(), tiny_model(), batches()
    opt = build_optimizer(model, "lars", lr=LRS[0], weight_decay=5e-3, trust_coefficient=0.02,
                          exclude_bn_bias=exclude, **opts)
    assert isinstance(opt, LARS)
    ours = train(model, opt, data)
    ref = lars_reference(ref_model, data, LRS, wd=5e-3, tc=0.02, exclude=exclude, **opts)
    assert_trajectories_close(ours, ref)
    assert_moved(tiny_model(), ours[-1])


def test_lars_exclusions_get_no_weight_decay_and_no_trust_ratio():
    lr, wd, tc, eps = 0.5, 0.1, 0.02, 1e-8
    for exclude in (True, False):
        model = tiny_model()
        opt = build_optimizer(model, "lars", lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=tc, eps=eps,
                              exclude_bn_bias=exclude)
        params = dict(model.named_parameters())
        if exclude:
            assert [g["trust"] for g in opt.param_groups] == [True, False]
            assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
            assert {id(p) for p in opt.param_groups[1]["params"]} == {id(params[n]) for n in EXCLUDED}
        w0 = snapshot(model)
        backward(model, *batches(1)[0])
        grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()  # first step: v = local_lr * (g + wd w), w -= lr v
        for name in ("0.bias", "2.weight", "2.bias", "0.weight"):
            w, g, new = w0[name], grads[name], params[name].detach()
            plain = w - lr * g  # no weight decay, local_lr = 1
            local_lr = tc * w.norm() / (g.norm() + wd * w.norm() + eps)
            adapted = w - lr * local_lr * (g + wd * w)
            if exclude and name in EXCLUDED:
                torch.testing.assert_close(new, plain, rtol=0, atol=1e-15)
            else:
                torch.testing.assert_close(new, adapted, rtol=1e-13, atol=1e-15)
                assert (new - plain).abs().max() > 1e-3


def test_zero_norms_give_trust_ratio_one():
    """||g|| = 0 (LARS) or ||r|| = 0 (LAMB) with ||w|| > 0: ratio 1, not tc ||w|| / (wd ||w|| + eps) or w / 0."""
    w0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    w.grad = torch.zeros_like(w)
    LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02).step()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * 0.1 * w0, rtol=0, atol=1e-15)

    w = nn.Parameter(w0.clone())
    w.grad = torch.zeros_like(w)
    LAMB([w], lr=0.5, weight_decay=0.0).step()
    assert torch.equal(w.detach(), w0)


# ---- 2. LAMB -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exclude", [True, False])
def test_lamb_matches_paper_equations(exclude):
    model, ref_model, data = tiny_model(), tiny_model(), batches()
    lrs = [lr / 20 for lr in LRS]
    opt = build_optimizer(model, "lamb", lr=lrs[0], momentum=0.9, weight_decay=0.02, betas=(0.9, 0.999), eps=1e-6,
                          exclude_bn_bias=exclude)
    assert isinstance(opt, LAMB)
    ours = train(model, opt, data, lrs)
    ref = lamb_reference(ref_model, data, lrs, betas=(0.9, 0.999), wd=0.02, eps=1e-6, exclude=exclude)
    assert_trajectories_close(ours, ref)
    assert_moved(tiny_model(), ours[-1])


@pytest.mark.parametrize("bias_correction,bounds", [(False, None), (True, (0.5, 1.5)), (False, (2.0, 3.0))])
def test_lamb_options_match_the_paper_variants(bias_correction, bounds):
    """bias_correction=false (the paper's early versions) and phi(z) = min(max(z, lo), hi)."""
    model, ref_model, data = tiny_model(), tiny_model(), batches()
    lrs = [lr / 20 for lr in LRS]
    opt = build_optimizer(model, "lamb", lr=lrs[0], momentum=0.9, weight_decay=0.02, betas=(0.9, 0.999), eps=1e-6,
                          bias_correction=bias_correction, phi_bounds=bounds)
    ours = train(model, opt, data, lrs)
    phi = (lambda z: z.clamp(*bounds)) if bounds else (lambda z: z)
    ref = lamb_reference(ref_model, data, lrs, betas=(0.9, 0.999), wd=0.02, eps=1e-6, exclude=False,
                         bias_correction=bias_correction, phi=phi)
    assert_trajectories_close(ours, ref)
    plain = tiny_model()
    default = train(plain, build_optimizer(plain, "lamb", lr=lrs[0], momentum=0.9, weight_decay=0.02,
                                           betas=(0.9, 0.999), eps=1e-6), data, lrs)
    assert any(not torch.equal(ours[-1][k], default[-1][k]) for k in ours[-1])  # the option changes the run


def test_lamb_exclusions_get_no_weight_decay_and_no_trust_ratio():
    lr, wd, eps = 0.01, 0.1, 1e-6
    for exclude in (True, False):
        model = tiny_model()
        opt = build_optimizer(model, "lamb", lr=lr, momentum=0.0, weight_decay=wd, eps=eps, exclude_bn_bias=exclude)
        params = dict(model.named_parameters())
        w0 = snapshot(model)
        backward(model, *batches(1)[0])
        grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()  # first step: m_hat = g, sqrt(v_hat) = |g|
        for name in ("0.bias", "2.weight", "2.bias", "0.weight"):
            w, g, new = w0[name], grads[name], params[name].detach()
            plain = w - lr * g / (g.abs() + eps)
            r = g / (g.abs() + eps) + wd * w
            adapted = w - lr * (w.norm() / r.norm()) * r
            if exclude and name in EXCLUDED:
                torch.testing.assert_close(new, plain, rtol=0, atol=1e-15)
            else:
                torch.testing.assert_close(new, adapted, rtol=1e-13, atol=1e-15)
                assert (new - plain).abs().max() > 1e-4


# ---- 3, 4. AdamW and SGD are torch's, bit for bit ------------------------------------------------------------------

@pytest.mark.parametrize("exclude", [False, True])
def test_adamw_is_torch_adamw(exclude):
    kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-7)
    model, ref_model, data = tiny_model(torch.float32), tiny_model(torch.float32), batches(dtype=torch.float32)
    opt = build_optimizer(model, "adamw", momentum=0.9, weight_decay=0.05, exclude_bn_bias=exclude, **kw)
    assert type(opt) is torch.optim.AdamW
    named = list(ref_model.named_parameters())
    if exclude:
        groups = [{"params": [p for n, p in named if n not in EXCLUDED], "weight_decay": 0.05},
                  {"params": [p for n, p in named if n in EXCLUDED], "weight_decay": 0.0}]
        ref_opt = torch.optim.AdamW(groups, **kw)
    else:
        ref_opt = torch.optim.AdamW(ref_model.parameters(), weight_decay=0.05, **kw)
    lrs = [0.01] * STEPS
    for a, b in zip(train(model, opt, data, lrs), train(ref_model, ref_opt, data, lrs)):
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_torch_sgd(nesterov):
    model, ref_model, data = tiny_model(torch.float32), tiny_model(torch.float32), batches(dtype=torch.float32)
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    for a, b in zip(train(model, opt, data), train(ref_model, ref_opt, data)):
        assert all(torch.equal(a[n], b[n]) for n in a)


# ---- 5. resume is bit-exact ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_state_dict_round_trip(name):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=name == "lars", trust_coefficient=0.02,
              exclude_bn_bias=True)
    data = batches(dtype=torch.float32)
    model = tiny_model(torch.float32)
    opt = build_optimizer(model, name, **kw)
    train(model, opt, data[:3], LRS[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    straight = train(model, opt, data[3:], LRS[3:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed_model = tiny_model(torch.float32)
    resumed_opt = build_optimizer(resumed_model, name, **kw)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed = train(resumed_model, resumed_opt, data[3:], LRS[3:])
    for a, b in zip(straight, resumed):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


# ---- 6. parameter groups -------------------------------------------------------------------------------------------

class GhostLikeBN(nn.BatchNorm2d):
    """Stands for GhostBatchNorm: a subclass of _BatchNorm."""


def test_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), GhostLikeBN(4), nn.Conv2d(4, 4, 1, bias=False),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # frozen: left out
    model[6].bias.requires_grad_(False)
    p = dict(model.named_parameters())

    groups = param_groups(model, 0.1, exclude_bn_bias=True)
    assert [(g["weight_decay"], g["trust"]) for g in groups] == [(0.1, True), (0.0, False)]
    assert all(type(g["weight_decay"]) is float for g in groups)
    assert [id(x) for x in groups[0]["params"]] == [id(p[n]) for n in ("0.weight", "6.weight")]
    assert [id(x) for x in groups[1]["params"]] == [id(p[n]) for n in ("0.bias", "1.weight", "1.bias", "3.weight",
                                                                       "3.bias", "5.weight", "5.bias")]
    (single,) = param_groups(model, 0.1, exclude_bn_bias=False)
    assert single["weight_decay"] == 0.1 and single["trust"] is True
    assert [id(x) for x in single["params"]] == [id(x) for x in model.parameters() if x.requires_grad]


# ---- 7. validation -------------------------------------------------------------------------------------------------

GOOD = dict(momentum=0.9, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8, trust_coefficient=0.001, nesterov=False)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_validate_accepts_defaults(name):
    validate_optimizer_options(name, **GOOD)


@pytest.mark.parametrize(("name", "bad", "key"), [
    ("rmsprop", {}, "optimizer.name"),
    ("lars", {"trust_coefficient": -0.001}, "optimizer.trust_coefficient"),
    ("lars", {"trust_coefficient": 0.0}, "optimizer.trust_coefficient"),
    ("lamb", {"betas": (1.0, 0.999)}, "optimizer.betas"),
    ("adamw", {"betas": (0.9, -0.1)}, "optimizer.betas"),
    ("lamb", {"betas": (0.9,)}, "optimizer.betas"),
    ("lamb", {"eps": 0.0}, "optimizer.eps"),
    ("adamw", {"eps": -1e-8}, "optimizer.eps"),
    ("lars", {"eps": float("nan")}, "optimizer.eps"),
    ("adamw", {"nesterov": True}, "base.nesterov"),
    ("lamb", {"nesterov": True}, "base.nesterov"),
    ("lars", {"nesterov": True, "momentum": 0.0}, "base.nesterov"),
    ("sgd", {"momentum": 1.0}, "base.momentum"),
    ("sgd", {"weight_decay": -1e-4}, "base.weight_decay"),
])
def test_validate_rejects(name, bad, key):
    with pytest.raises(ConfigError) as err:
        validate_optimizer_options(name, **{**GOOD, **bad})
    assert err.value.key == key and str(err.value).startswith(key)
    with pytest.raises(ConfigError, match=key):  # build_optimizer validates first
        build_optimizer(tiny_model(), name, lr=0.1, **{**GOOD, **bad})


def test_adamw_error_message_names_the_optimizer():
    with pytest.raises(ConfigError, match="base.nesterov.*not used by adamw"):
        validate_optimizer_options("adamw", **{**GOOD, "nesterov": True})


# ---- registry, groups the trainer drives, no host sync -------------------------------------------------------------

def test_registry_and_plain_float_hyperparameters():
    assert OPTIMIZER_NAMES == ("sgd", "adamw", "lars", "lamb") == tuple(OPTIMIZERS)
    for name in OPTIMIZER_NAMES:
        model = tiny_model()
        opt = build_optimizer(model, name, lr=0.1, momentum=0.9, weight_decay=1e-3, exclude_bn_bias=True)
        for g in opt.param_groups:
            assert type(g["lr"]) is float and type(g["weight_decay"]) is float
            assert all(type(g[k]) is float for k in ("momentum", "trust_coefficient", "eps") if k in g)
            assert all(type(b) is float for b in g.get("betas", ()))
            g["lr"] = 0.0  # the trainer sets the lr on every update: lr 0 must freeze the model
        before = snapshot(model)
        backward(model, *batches(1)[0])
        opt.step()
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), name


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_step_reads_no_tensor_values_on_the_host(name):
    """On the meta device any .item() / bool(tensor) raises: step() must be sync-free on CUDA as well."""
    model = tiny_model(torch.float32).to("meta")
    opt = build_optimizer(model, name, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=name == "lars",
                          exclude_bn_bias=True)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_cuda_step_has_no_sync(name):
    model, data = tiny_model(torch.float32).cuda(), batches(2, torch.float32)
    opt = build_optimizer(model, name, lr=0.1, momentum=0.9, weight_decay=1e-3, exclude_bn_bias=True)
    for x, y in data:
        backward(model, x.cuda(), y.cuda())
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---- 8. cross-check against timm where the conventions coincide ----------------------------------------------------

@pytest.mark.parametrize("exclude", [True, False])
def test_matches_timm(exclude):
    timm_optim = pytest.importorskip("timm.optim")

    def timm_groups(model):  # timm adapts iff weight_decay != 0 or always_adapt: make that our "trust" flag
        return [{"params": g["params"], "weight_decay": g["weight_decay"], "always_adapt": g["trust"]}
                for g in param_groups(model, 5e-3, exclude)]

    data = batches()
    for name in ("lars", "lamb"):
        model, ref_model = tiny_model(), tiny_model()
        opt = build_optimizer(model, name, lr=LRS[0], momentum=0.9, weight_decay=5e-3, nesterov=name == "lars",
                              trust_coefficient=0.02, eps=1e-6, exclude_bn_bias=exclude)
        if name == "lars":
            ref_opt = timm_optim.Lars(timm_groups(ref_model), lr=LRS[0], momentum=0.9, nesterov=True,
                                      trust_coeff=0.02, eps=1e-6)
        else:
            ref_opt = timm_optim.Lamb(timm_groups(ref_model), lr=LRS[0], betas=(0.9, 0.999), eps=1e-6,
                                      max_grad_norm=None)
        assert_trajectories_close(train(model, opt, data), train(ref_model, ref_opt, data))


# ---- 9. noise scale ------------------------------------------------------------------------------------------------

def test_uses_sgd_noise_scale():
    assert uses_sgd_noise_scale("sgd", 0.9) and uses_sgd_noise_scale("sgd", 0.0)
    assert not any(uses_sgd_noise_scale(n, 0.9) for n in ("adamw", "lars", "lamb"))
    with pytest.raises(ConfigError, match="optimizer.name"):
        uses_sgd_noise_scale("adam", 0.9)
