"""Tests for Ghost Batch Normalization (lbtrain.ghost_bn)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT
from torch import nn

from lbtrain.ghost_bn import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    apply_deferred_stats,
    convert_to_ghost_bn,
    defer_running_stats,
    set_ghost_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 32
C = 5
# name -> (GBN class, plain BN class, input shape, channels_last)
LAYOUTS = {
    "1d-2D": (GhostBatchNorm1d, nn.BatchNorm1d, (BATCH, C), False),
    "1d-3D": (GhostBatchNorm1d, nn.BatchNorm1d, (BATCH, C, 7), False),
    "2d": (GhostBatchNorm2d, nn.BatchNorm2d, (BATCH, C, 4, 6), False),
    "2d-channels_last": (GhostBatchNorm2d, nn.BatchNorm2d, (BATCH, C, 4, 6), True),
}




def _input(shape: tuple[int, ...], channels_last: bool, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2.0 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _randomize_affine(m: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5)
        if m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))


def _ghost_batches(x: torch.Tensor, g: int) -> list[torch.Tensor]:
    """lbtrain's ghost batches of size g: ghost k is the strided x[k::G], G = len(x) // g."""
    n = x.shape[0] // g
    return [x[k::n] for k in range(n)]


def _reference(x: torch.Tensor, weight, bias, g: int, eps: float) -> torch.Tensor:
    """The authors' way: F.batch_norm on each ghost batch, one call per ghost batch; outputs put back in place."""
    outs = [F.batch_norm(xk, None, None, weight, bias, True, 0.0, eps) for xk in _ghost_batches(x, g)]
    return torch.stack(outs, 1).flatten(0, 1)  # row j of ghost k is sample j*G + k


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _hand_running_stats(inputs, g: int, momentum: float | None):
    mean = torch.zeros(C, dtype=torch.float64)
    var = torch.ones(C, dtype=torch.float64)
    for step, x in enumerate(inputs, start=1):
        chunks = _ghost_batches(x, g)
        ghost_mean = torch.stack([ch.mean(dim=_reduce_dims(ch)) for ch in chunks]).mean(0)
        ghost_var = torch.stack([ch.var(dim=_reduce_dims(ch), unbiased=True) for ch in chunks]).mean(0)
        f = 1.0 / step if momentum is None else momentum
        mean = (1 - f) * mean + f * ghost_mean
        var = (1 - f) * var + f * ghost_var
    return mean, var


@pytest.mark.parametrize("g", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_per_chunk_reference(layout: str, g: int) -> None:
    cls, _, shape, channels_last = LAYOUTS[layout]
    m = cls(C, ghost_batch=g, eps=1e-3, dtype=torch.float64)
    _randomize_affine(m)
    x = _input(shape, channels_last, seed=g).requires_grad_()
    y = m(x)
    dy = _input(shape, channels_last, seed=100 + g)
    y.backward(dy)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = m.weight.detach().clone().requires_grad_()
    b_ref = m.bias.detach().clone().requires_grad_()
    y_ref = _reference(x_ref, w_ref, b_ref, g, 1e-3)
    y_ref.backward(dy)

    tol = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(m.weight.grad, w_ref.grad, **tol)
    torch.testing.assert_close(m.bias.grad, b_ref.grad, **tol)
    assert y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("affine,bias", [(False, True), (True, False)])
def test_no_affine_or_no_bias(affine: bool, bias: bool) -> None:
    if not bias and "bias" not in nn.BatchNorm2d.__init__.__code__.co_varnames:
        pytest.skip("this torch has no BatchNorm bias argument")
    m = GhostBatchNorm2d(C, 8, affine=affine, bias=bias, dtype=torch.float64)
    x = _input((BATCH, C, 3, 3), False, seed=1).requires_grad_()
    y = m(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _reference(x_ref, m.weight, m.bias, 8, m.eps)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_one_fused_batch_norm_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = F.batch_norm

    def counting(*args, **kwargs):
        calls.append((args[0].shape, args[0].data_ptr()))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", counting)
    m = GhostBatchNorm2d(C, 4)
    x = torch.randn(BATCH, C, 3, 3)
    y = m(x)
    assert [shape for shape, _ in calls] == [torch.Size([4, (BATCH // 4) * C, 3, 3])]
    # contiguous input: the ghost layout is a view of it and the output a view of batch norm's (no copies)
    assert calls[0][1] == x.data_ptr() and y.is_contiguous()


def test_ghost_batches_are_strided() -> None:
    """Ghost k is x[k::G]: shifting each strided subset by its own constant changes nothing."""
    g, n = 8, BATCH // 8
    m = GhostBatchNorm2d(C, g, affine=False, dtype=torch.float64)
    x = _input((BATCH, C, 3, 3), False, seed=3)
    ghost = torch.arange(BATCH) % n
    torch.testing.assert_close(m(x + 10.0 * ghost.view(-1, 1, 1, 1)), m(x))
    chunk = torch.arange(BATCH) // g  # contiguous chunks are not the ghost batches
    assert not torch.allclose(m(x + 10.0 * chunk.view(-1, 1, 1, 1)), m(x))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["1d-2D", "1d-3D", "2d", "2d-channels_last"])
def test_running_stats_formula(layout: str, momentum: float | None) -> None:
    cls, _, shape, channels_last = LAYOUTS[layout]
    g = 8
    m = cls(C, g, momentum=momentum, dtype=torch.float64)
    inputs = [_input(shape, channels_last, seed=s) * (s + 1) for s in range(3)]
    for x in inputs:
        m(x)
    mean, var = _hand_running_stats(inputs, g, momentum)
    torch.testing.assert_close(m.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, var, rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 3
    assert m.running_mean.shape == (C,) and m.running_var.shape == (C,)


@pytest.mark.parametrize("ghost_batch", [BATCH, None])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_whole_batch_ghost_is_exactly_batchnorm(layout: str, momentum: float | None, ghost_batch) -> None:
    cls, bn_cls, shape, channels_last = LAYOUTS[layout]
    gbn = cls(C, ghost_batch, momentum=momentum)
    bn = bn_cls(C, momentum=momentum)
    _randomize_affine(gbn)
    bn.load_state_dict(gbn.state_dict())
    for step in range(3):
        x = _input(shape, channels_last, seed=step, dtype=torch.float32)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = gbn(xa), bn(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.equal(ya, yb)
        assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(gbn.weight.grad, bn.weight.grad)
    assert torch.equal(gbn.bias.grad, bn.bias.grad)
    for k, v in bn.state_dict().items():
        assert torch.equal(gbn.state_dict()[k], v), k


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_is_exactly_batchnorm_eval(layout: str) -> None:
    cls, bn_cls, shape, channels_last = LAYOUTS[layout]
    gbn = cls(C, 4)
    _randomize_affine(gbn)
    for s in range(3):
        gbn(_input(shape, channels_last, seed=s, dtype=torch.float32))
    bn = bn_cls(C)
    bn.load_state_dict(gbn.state_dict())
    gbn.eval()
    bn.eval()
    x = _input(shape, channels_last, seed=9, dtype=torch.float32)
    assert torch.equal(gbn(x), bn(x))
    odd = x[:7]  # eval accepts any batch size
    assert torch.equal(gbn(odd), bn(odd))


def test_track_running_stats_false() -> None:
    gbn = GhostBatchNorm2d(C, 8, track_running_stats=False, dtype=torch.float64)
    bn = nn.BatchNorm2d(C, track_running_stats=False, dtype=torch.float64)
    assert gbn.running_mean is None and gbn.num_batches_tracked is None
    x = _input((BATCH, C, 3, 3), False, seed=3)
    # training: still per-ghost normalization, nothing tracked
    torch.testing.assert_close(gbn(x), _reference(x, gbn.weight, gbn.bias, 8, gbn.eps))
    # eval: exactly nn.BatchNorm, i.e. statistics of the whole batch
    gbn.eval()
    bn.eval()
    assert torch.equal(gbn(x), bn(x))


def _small_net(ghost: bool) -> nn.Sequential:
    bn2, bn1 = (GhostBatchNorm2d, GhostBatchNorm1d) if ghost else (nn.BatchNorm2d, nn.BatchNorm1d)
    kw = {"ghost_batch": 4} if ghost else {}
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn2(8, **kw),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), bn2(8, momentum=None, **kw), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        bn1(6, eps=1e-3, **kw),
    )


def test_state_dict_interchanges_strict() -> None:
    torch.manual_seed(0)
    ghost, plain = _small_net(True), _small_net(False)
    for _ in range(2):
        ghost(torch.randn(16, 3, 6, 6))
    sd = ghost.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(sd, strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, sd[k])
    ghost2 = _small_net(True)
    ghost2.load_state_dict(plain.state_dict(), strict=True)
    ghost2.eval()
    ghost.eval()
    x = torch.randn(5, 3, 6, 6)
    assert torch.equal(ghost2(x), ghost(x))


def test_convert_to_ghost_bn_keeps_tensors_and_eval_outputs() -> None:
    torch.manual_seed(0)
    net = _small_net(False)
    for _ in range(2):  # non-trivial running statistics
        net(torch.randn(16, 3, 6, 6))
    net.eval()
    x = torch.randn(5, 3, 6, 6)
    expected = net(x)
    old_bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    old_tensors = [(m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked) for m in old_bns]

    out = convert_to_ghost_bn(net, 4)
    assert out is net
    new_bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in new_bns] == [GhostBatchNorm2d, GhostBatchNorm2d, GhostBatchNorm1d]
    for m, old, tensors in zip(new_bns, old_bns, old_tensors, strict=True):
        assert m.ghost_batch == 4 and not m.training
        assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (
            old.eps,
            old.momentum,
            old.affine,
            old.track_running_stats,
        )
        new_tensors = (m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked)
        assert all(a is b for a, b in zip(new_tensors, tensors, strict=True))
    assert set(dict(net.named_parameters())) == {n for n, _ in _small_net(False).named_parameters()}
    assert torch.equal(net(x), expected)

    # training now uses ghost batches of 4
    net.train()
    feats = torch.randn(16, 6, dtype=torch.float32)
    last = net[-1]
    torch.testing.assert_close(last(feats), _reference(feats, last.weight, last.bias, 4, last.eps))
    assert convert_to_ghost_bn(net, 8) is net and net[1].ghost_batch == 4  # already ghost: untouched


def test_convert_root_and_exact_types_only() -> None:
    bn = nn.BatchNorm2d(4, momentum=0.3).double()
    new = convert_to_ghost_bn(bn, 2)
    assert isinstance(new, GhostBatchNorm2d) and new.weight is bn.weight and new.momentum == 0.3
    assert new.running_mean.dtype == torch.float64

    class MyBN(nn.BatchNorm2d):
        pass

    for m in (MyBN(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4)):
        assert convert_to_ghost_bn(m, 2) is m


def test_set_ghost_batch() -> None:
    net = convert_to_ghost_bn(_small_net(False), 4)
    assert set_ghost_batch(net, 8) == 3
    assert all(m.ghost_batch == 8 for m in net.modules() if isinstance(m, GhostBatchNorm))
    assert set_ghost_batch(net, None) == 3
    with pytest.raises(ValueError):
        set_ghost_batch(net, 0)


def test_non_dividing_batch_raises() -> None:
    m = GhostBatchNorm2d(C, 8)
    with pytest.raises(ValueError, match=r"batch size 30 .*ghost_batch=8"):
        m(torch.randn(30, C, 2, 2))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="ghost_batch"):
            GhostBatchNorm1d(C, bad)
    with pytest.raises(ValueError, match="4D"):
        m(torch.randn(32, C))


def test_extra_repr() -> None:
    assert "ghost_batch=16" in repr(GhostBatchNorm2d(3, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_matches_reference_without_host_sync(momentum: float | None) -> None:
    m = GhostBatchNorm2d(C, 8, momentum=momentum, device="cuda")
    x = torch.randn(BATCH, C, 4, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    m(x)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = m(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(y, _reference(x, m.weight, m.bias, 8, m.eps), rtol=1e-4, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_bench_script_importable() -> None:
    spec = importlib.util.spec_from_file_location("bench_gbn", ROOT / "scripts" / "bench_gbn.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run_gbn_bench("cpu", batch=8, channels=2, size=4, ghosts=2, iters=1)
    for key in ("vectorized_ms", "loop_ms", "plain_ms", "vectorized_over_plain", "loop_over_vectorized"):
        assert res[key] > 0, key


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("parts", [2, 4, 8])  # 8 micro-batches of 4 = one ghost batch each
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_deferred_stats_over_micro_batches_equal_whole_batch(layout: str, parts: int, momentum) -> None:
    """Micro-batches m::parts with deferred running stats: outputs and statistics of the whole batch."""
    cls, _, shape, channels_last = LAYOUTS[layout]
    whole, split = cls(C, 4, momentum=momentum, dtype=torch.float64), cls(C, 4, momentum=momentum, dtype=torch.float64)
    layers = defer_running_stats(split)
    assert layers == [split]
    for step in range(3):
        x = _input(shape, channels_last, seed=step) * (step + 1)
        y = whole(x)
        for part in range(parts):
            torch.testing.assert_close(split(x[part::parts]), y[part::parts], rtol=1e-12, atol=1e-12)
        apply_deferred_stats(layers)
    torch.testing.assert_close(split.running_mean, whole.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.running_var, whole.running_var, rtol=1e-12, atol=1e-12)
    assert split.num_batches_tracked.item() == whole.num_batches_tracked.item() == 3
    assert split.state_dict().keys() == whole.state_dict().keys()  # the collectors are not state


def test_apply_without_forward_changes_nothing() -> None:
    m = GhostBatchNorm1d(C, 4, momentum=None)
    layers = defer_running_stats(m)
    m(torch.randn(BATCH, C))
    apply_deferred_stats(layers)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    apply_deferred_stats(layers)  # nothing collected since the last call
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    defer_running_stats(m, False)  # off again: each forward updates the statistics itself
    m(torch.randn(BATCH, C))
    assert m.num_batches_tracked.item() == 2
