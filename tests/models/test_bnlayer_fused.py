"""BnLayer on torch's fused F.batch_norm gives what the course's written-out batch norm gave:
outputs, gradients (input and every parameter) and running statistics, in training and in eval,
for NCHW and channels_last inputs and for a single channel; and old checkpoints still load."""

import copy
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainer import storage
from trainer.models.course import bnresnet
from trainer.models.layers import BnLayer, ResnetLayer

# float32: within 1e-5 of the reference, in units of the tensor's largest value where that is over
# 1 (a gradient summed over a batch reaches 100s, where 1e-5 is below float32's resolution);
# float64: within 1e-10, which no rounding of float32 would meet: the same arithmetic, not a near one
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
FIXTURE = Path(__file__).parents[1] / "run" / "fixtures" / "v1_run"


def written_out(layer: BnLayer, x: torch.Tensor) -> torch.Tensor:
    """The reference: the course's norm step by step. In training, normalise by the batch's
    per-channel mean and biased variance (over N, H, W) and move the running averages a
    `momentum` of the way towards them; in eval, normalise by the running averages. Then scale
    by `m` and shift by `a`, all (C, 1, 1)."""
    h = torch.relu(layer.conv(x))
    if layer.training:
        mu = h.mean(dim=(0, 2, 3)).view(-1, 1, 1)
        sigma2 = ((h - mu) ** 2).mean(dim=(0, 2, 3)).view(-1, 1, 1)
        with torch.no_grad():
            k = layer.momentum
            layer.running_mean.copy_((1 - k) * layer.running_mean + k * mu)
            layer.running_var.copy_((1 - k) * layer.running_var + k * sigma2)
    else:
        mu, sigma2 = layer.running_mean, layer.running_var
    y = (h - mu) / torch.sqrt(sigma2 + 1e-5) * layer.m + layer.a
    return x + y if isinstance(layer, ResnetLayer) else y


def as_reference(model: nn.Module) -> nn.Module:
    """A copy of `model` whose BnLayers compute the written-out way."""
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if isinstance(mod, BnLayer):
            mod.forward = types.MethodType(written_out, mod)
    return ref


def shaken(layer: BnLayer, seed: int = 1) -> BnLayer:
    """Parameters and running statistics away from their initial ones, so none of them is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.a.copy_(torch.randn(layer.a.shape, generator=g) * 0.5)
        layer.m.copy_(1 + torch.randn(layer.m.shape, generator=g) * 0.5)
        layer.running_mean.copy_(torch.rand(layer.running_mean.shape, generator=g))
        layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=g))
    return layer


def outputs_and_grads(model: nn.Module, x: torch.Tensor, upstream_seed: int = 2):
    """The output, and the gradients of a random projection of it w.r.t. the input and every
    parameter (a plain sum would leave the norm's input gradient at zero, up to rounding)."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed))
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_near(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    tol = TOL[want.dtype] * max(1.0, want.abs().max().item())
    worst = (got - want).abs().max().item()
    assert worst <= tol, f"{what}: off by {worst:.3g} (allowed {tol:.3g}, largest value {want.abs().max().item():.3g})"


def assert_match(fused: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Output, input gradient, every parameter's gradient, then every buffer."""
    out, gx, gp = outputs_and_grads(fused, x)
    rout, rgx, rgp = outputs_and_grads(ref, x)
    assert out.dtype == rout.dtype == x.dtype
    assert_near(out, rout, "output")
    assert_near(gx, rgx, "input gradient")
    assert gp.keys() == rgp.keys() and all(g is not None for g in gp.values())
    for name in gp:
        assert_near(gp[name], rgp[name], f"gradient of {name}")
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fused.named_buffers():
        assert_near(buf, ref_buffers[name], name)


def batch(n=8, c=3, size=12, channels_last=False, seed=0, dtype=torch.float32):
    x = torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 0.5
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


CASES = {
    "nchw": dict(ni=3, nf=6, stride=2, channels_last=False),
    "channels_last": dict(ni=3, nf=6, stride=2, channels_last=True),
    "1-channel-in": dict(ni=1, nf=4, stride=2, channels_last=False),
    "1-channel-out": dict(ni=3, nf=1, stride=1, channels_last=False),
    "1-channel-channels_last": dict(ni=1, nf=1, stride=1, channels_last=True),
}


@DTYPES
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_outputs_and_gradients_match_the_written_out_norm(case, mode, dtype):
    torch.manual_seed(0)
    layer = shaken(BnLayer(case["ni"], case["nf"], stride=case["stride"])).to(dtype).train(mode == "train")
    if case["channels_last"]:
        layer.to(memory_format=torch.channels_last)
    x = batch(c=case["ni"], channels_last=case["channels_last"], dtype=dtype)
    assert_match(layer, as_reference(layer), x)


@DTYPES
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_residual_layer_matches_too(mode, dtype):
    torch.manual_seed(0)
    layer = shaken(ResnetLayer(5, 5, 1)).to(dtype).train(mode == "train")
    assert_match(layer, as_reference(layer), batch(c=5, dtype=dtype))


def test_one_value_a_channel_still_trains():
    """A batch of one 1x1 map: F.batch_norm refuses to train on it; the layer normalises as the
    course did (the variance is zero: every output is `a`)."""
    layer = shaken(BnLayer(3, 4, stride=2)).train()
    assert_match(layer, as_reference(layer), batch(n=1, size=1))


@DTYPES
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_running_statistics_and_parameters_evolve_identically(channels_last, dtype):
    """A few SGD steps on both, in training mode, then eval: the running averages (biased variance,
    momentum 0.1) and the parameters stay together step by step."""
    torch.manual_seed(0)
    fused = nn.Sequential(BnLayer(3, 8), ResnetLayer(8, 8, 1), BnLayer(8, 4, stride=1)).to(dtype).train()
    if channels_last:
        fused.to(memory_format=torch.channels_last)
    ref = as_reference(fused)
    start = {n: b.clone() for n, b in fused.named_buffers()}
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fused, ref)]
    for step in range(5):
        x = batch(n=6, size=10, channels_last=channels_last, seed=10 + step, dtype=dtype)
        assert_match(fused, ref, x)  # outputs, gradients and running statistics after this step
        for opt in opts:
            opt.step()
        for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
            assert_near(p.detach(), q.detach(), f"step {step}: {name}")
    for name, b in fused.named_buffers():
        assert not torch.allclose(b, start[name]), name  # they did move
    fused.eval(), ref.eval()
    assert_match(fused, ref, batch(n=3, size=10, channels_last=channels_last, seed=99, dtype=dtype))


@DTYPES
def test_a_whole_bnresnet_step_matches(dtype):
    torch.manual_seed(0)
    model = bnresnet(10, 3, layers=(8, 16, 32)).model.to(dtype).train()
    assert_match(model, as_reference(model), batch(n=4, size=16, dtype=dtype))


def test_parameters_and_buffers_keep_their_names_and_shapes():
    """As the checkpoints of earlier runs have them (and in the same order, which optimizer
    state follows)."""
    layer = BnLayer(3, 7)
    assert [(k, tuple(v.shape)) for k, v in layer.state_dict().items()] == [
        ("a", (7, 1, 1)),
        ("m", (7, 1, 1)),
        ("running_mean", (7, 1, 1)),
        ("running_var", (7, 1, 1)),
        ("conv.weight", (7, 3, 3, 3)),
    ]
    assert [n for n, _ in layer.named_parameters()] == ["a", "m", "conv.weight"]


def test_an_old_run_checkpoint_loads_and_predicts_as_before():
    """tests/run/fixtures/v1_run is a bnresnet [8, 16] run of the written-out code: its weights
    load strictly and give the same predictions (eval) and the same training step."""
    state = storage.load(FIXTURE / "checkpoints" / "last.pt")["model"]
    model = bnresnet(3, 3, layers=(8, 16), ps=0.25).model
    model.load_state_dict(state, strict=True)
    model.out[1].p = 0.0  # dropout off, so that both take the same training step
    x = batch(n=4, size=16)
    assert_match(model.eval(), as_reference(model).eval(), x)
    assert_match(model.train(), as_reference(model).train(), x)
