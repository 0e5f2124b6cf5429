"""GroupRational, the nn.Module: KAT compatibility, initial shapes, repr."""

import pytest
import torch

import flashkat
from flashkat import reference
from conftest import DEVICE, rel_l2


def test_parameters_match_kat_names_and_shapes():
    layer = flashkat.GroupRational(num_groups=8, mode="swish")
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight_numerator": (1, 6), "weight_denominator": (8, 4)}
    kat_state = {"weight_numerator": torch.randn(1, 6), "weight_denominator": torch.randn(8, 4)}
    layer.load_state_dict(kat_state, strict=True)
    assert torch.equal(layer.weight_denominator, kat_state["weight_denominator"])


def test_other_orders_and_groups():
    layer = flashkat.GroupRational(num_groups=4, mode="gelu", order=(3, 2), numerator_groups=2, dim=1)
    assert layer.weight_numerator.shape == (2, 4) and layer.weight_denominator.shape == (4, 2)
    x = torch.randn(2, 8, 3, 3)
    y = layer(x)
    ref = reference.forward(x.double(), layer.weight_numerator.double(), layer.weight_denominator.double(), 1)
    assert rel_l2(y.detach(), ref) < 2e-6


def test_identity_init_is_the_identity():
    layer = flashkat.GroupRational(num_groups=8, mode="identity").to(DEVICE)
    x = torch.randn(3, 7, 64, device=DEVICE)
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("mode,fn", [("gelu", torch.nn.functional.gelu), ("swish", torch.nn.functional.silu)])
def test_initial_shapes_follow_their_activation(mode, fn):
    layer = flashkat.GroupRational(num_groups=8, mode=mode).to(DEVICE)
    x = torch.linspace(-3, 3, 8 * 128, device=DEVICE).reshape(-1, 8)
    assert (layer(x) - fn(x)).abs().max().item() < 2e-2


def test_extra_repr_names_groups_order_and_mode():
    text = repr(flashkat.GroupRational(num_groups=8, mode="swish", order=(5, 4)))
    assert "num_groups=8" in text and "order=(5, 4)" in text and "mode='swish'" in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_groups=0"):
        flashkat.GroupRational(num_groups=0)
    with pytest.raises(ValueError):
        flashkat.GroupRational(mode="no-such-activation")


def test_follow_autocast_stores_the_autocast_dtype():
    layer = flashkat.GroupRational(num_groups=8, mode="identity", follow_autocast=True).to(DEVICE)
    plain = flashkat.GroupRational(num_groups=8, mode="identity").to(DEVICE)
    x = torch.randn(4, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16 and plain(x).dtype == torch.float32
    assert torch.equal(layer(x), x)  # outside autocast: the input's dtype


def test_follow_autocast_under_compile_takes_its_input_in_the_autocast_dtype():
    """Compiled, the layer computes on the bfloat16 copy of its float32 input (a cast inductor fuses
    into the input's producer), so the input's gradient comes back through that cast: bfloat16 values."""
    layer = flashkat.GroupRational(num_groups=8, mode="swish", follow_autocast=True).to(DEVICE)
    with torch.no_grad():
        layer.weight_denominator.add_(0.1 * torch.randn_like(layer.weight_denominator))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 5, 64, device=DEVICE, requires_grad=True)
    g = torch.randn(4, 5, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = compiled(x)
    y.backward(g.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.equal(x.grad, x.grad.to(torch.bfloat16).float())  # eager: float32 values
    x16 = x.detach().to(torch.bfloat16).double()
    a, b = layer.weight_numerator.detach().double(), layer.weight_denominator.detach().double()
    assert rel_l2(y.detach().double(), reference.forward(x16, a, b)) < 1e-2
    dx, da, db = reference.backward(g.to(torch.bfloat16).double(), x16, a, b)
    for got, want in ((x.grad, dx), (layer.weight_numerator.grad, da), (layer.weight_denominator.grad, db)):
        assert rel_l2(got.double(), want) < 2e-2


def test_a_layer_norm_passed_in_runs_fused_and_others_first():
    """forward(x, norm) equals forward(norm(x)): fused for a LayerNorm over the channels, applied
    first for any other module; under autocast a follow_autocast layer stores the autocast dtype."""
    layer = flashkat.GroupRational(num_groups=8, mode="swish", follow_autocast=True).to(DEVICE)
    norm = torch.nn.LayerNorm(32, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(32))
        norm.bias.copy_(0.1 * torch.randn(32))
    x = torch.randn(3, 7, 32, device=DEVICE, requires_grad=True)
    assert layer._fuses(norm, x) and not layer._fuses(torch.nn.RMSNorm(32).to(DEVICE), x)
    fused, unfused = layer(x, norm), layer(norm(x))
    assert rel_l2(fused.detach(), unfused.detach()) < 2e-6
    g = torch.randn_like(fused)
    fused_grads = torch.autograd.grad(fused, [x, norm.weight, layer.weight_denominator], g)
    unfused_grads = torch.autograd.grad(unfused, [x, norm.weight, layer.weight_denominator], g)
    for a, b in zip(fused_grads, unfused_grads):
        assert rel_l2(a, b) < 1e-5
    rms = torch.nn.RMSNorm(32).to(DEVICE)
    assert torch.equal(layer(x, rms), layer(rms(x)))
    dtype = torch.bfloat16
    with torch.autocast(DEVICE, dtype=dtype):
        y = layer(x, norm)
    assert y.dtype == dtype and rel_l2(y.detach(), unfused.detach()) < 8e-3


def test_jit_trace_records_the_operators():
    """A traced layer recomputes on new inputs: while tracing, calls go through the operators
    (on CUDA a kernel launched directly would be missing from the trace), fused LayerNorm too."""
    layer = flashkat.GroupRational(num_groups=4, mode="swish").to(DEVICE)
    norm = torch.nn.LayerNorm(16).to(DEVICE)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act, self.norm = layer, norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x, self.norm) + self.act(x)

    block = Block()
    with pytest.warns(torch.jit.TracerWarning):  # the argument checks branch on shapes
        traced = torch.jit.trace(block, torch.randn(3, 16, device=DEVICE))
    x = torch.randn(5, 16, device=DEVICE)
    torch.testing.assert_close(traced(x), block(x), rtol=1e-5, atol=1e-6)
