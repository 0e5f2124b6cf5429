"""KAT models in timm: registration, sizes, KAT's state-dict layout, checkpoint loading, inits."""

import math
import re
from functools import partial

import pytest
import timm
import torch
from torch import nn

import flashkat.models  # noqa: F401 - registers the models
from flashkat.layers import GroupRational, KANMlp
from flashkat.models import checkpoint_filter_fn

KAT_PARAMETERS = {"kat_tiny_patch16_224": 5_718_328, "kat_small_patch16_224": 22_051_576,
                  "kat_base_patch16_224": 86_568_568}  # fmt: skip
KAT_WEIGHTS = "https://huggingface.co/adamdad/kat_pretained/resolve/main/"


def small_kat(**kwargs) -> nn.Module:
    """KAT-T's layout at 2 blocks and 32 px: the same key names and per-block shapes, built fast."""
    return timm.create_model("kat_tiny_patch16_224", depth=2, img_size=32, **kwargs)


def test_models_are_registered_with_timm():
    names = set(timm.list_models("kat_*"))
    assert {"kat_tiny_patch16_224", "kat_small_patch16_224", "kat_base_patch16_224", "kat_tiny_patch4_32",
            "kat_micro_patch4_16"} <= names  # fmt: skip


@pytest.mark.parametrize("name", sorted(KAT_PARAMETERS))
def test_parameter_counts_match_kat(name):
    model = timm.create_model(name, weight_init="skip")  # the init does not change the count
    assert sum(p.numel() for p in model.parameters()) == KAT_PARAMETERS[name]


def test_state_dict_is_timm_vit_plus_kat_rationals():
    """Every key of timm's ViT-Ti with the same shape, plus act1/act2 (1, 6) and (8, 4) per block."""
    kat = timm.create_model("kat_tiny_patch16_224", weight_init="skip").state_dict()
    vit = timm.create_model("vit_tiny_patch16_224", weight_init="skip").state_dict()
    rational_keys = {f"blocks.{i}.mlp.{act}.weight_{part}" for i in range(12) for act in ("act1", "act2")
                     for part in ("numerator", "denominator")}  # fmt: skip
    assert set(kat) == set(vit) | rational_keys
    assert all(kat[key].shape == vit[key].shape for key in vit)
    for key in rational_keys:
        assert kat[key].shape == ((1, 6) if key.endswith("numerator") else (8, 4))


def test_architecture_facts():
    model = small_kat()
    assert model.norm.eps == 1e-6 and model.cls_token is not None and model.global_pool == "token"
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, KANMlp) and (mlp.fc1.in_features, mlp.fc1.out_features) == (192, 768)
    assert (mlp.act1.mode, mlp.act2.mode) == ("identity", "swish")
    assert model.pretrained_cfg["url"].startswith(KAT_WEIGHTS + "kat_tiny_patch16_224_1f3ad3b2")
    for name in ("kat_small_patch16_224", "kat_base_patch16_224"):
        assert timm.models.get_pretrained_cfg(name).url.startswith(KAT_WEIGHTS + name)


def test_kan_mlp_computes_act1_fc1_act2_fc2():
    mlp = KANMlp(16, 32, act_modes=("identity", "swish"))
    with torch.no_grad():  # make act1 a visible non-identity so the order matters
        mlp.act1.weight_numerator.copy_(torch.tensor([[0.1, 0.5, 0.3, 0.0, 0.0, 0.0]]))
    x = torch.randn(2, 5, 16)
    expected = mlp.fc2(mlp.act2(mlp.fc1(mlp.act1(x))))
    torch.testing.assert_close(mlp(x), expected)
    assert sum(p.numel() for n, p in mlp.named_parameters() if ".weight_" in n) == 2 * (6 + 32)


def test_kan_mlp_accepts_timm_block_arguments():
    from timm.models.vision_transformer import Block

    block = Block(dim=32, num_heads=2, mlp_layer=partial(KANMlp, act_modes=("identity", "gelu")), proj_drop=0.1)
    assert block.mlp.act2.mode == "gelu" and block.mlp.drop1.p == 0.1
    assert block(torch.randn(2, 3, 32)).shape == (2, 3, 32)


def test_small_models_by_name_and_kwargs():
    micro = timm.create_model("kat_micro_patch4_16")
    assert micro(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    cifar = timm.create_model("kat_tiny_patch4_32", depth=2, num_classes=100)
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    eight = timm.create_model("kat_micro_patch4_16", img_size=8, patch_size=2)
    assert eight(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def _randomised(model: nn.Module) -> dict:
    """The model's state dict with every tensor replaced by fresh random values (a 'trained' checkpoint)."""
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


def _assert_loaded(model: nn.Module, state: dict):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_kat_state_dict_loads_strictly():
    model = small_kat()
    state = _randomised(model)
    model.load_state_dict(state, strict=True)
    _assert_loaded(model, state)


def test_pretrained_file_overlay_loads_kat_checkpoint_offline(tmp_path):
    """pretrained=True with pretrained_cfg_overlay=dict(file=...) reads a KAT-style file, no network."""
    state = _randomised(small_kat())
    path = tmp_path / "kat_tiny.pth"
    torch.save({"model": state}, path)  # KAT's files wrap the weights in 'model'
    model = small_kat(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_loaded(model, state)


def test_flashkat_checkpoint_loads_through_filter(tmp_path):
    """FlashKAT names the rationals numerator_v / denominator_v; DDP adds 'module.'."""
    state = _randomised(small_kat())
    flashkat_names = {"weight_numerator": "numerator_v", "weight_denominator": "denominator_v"}
    renamed = {"module." + re.sub("weight_numerator|weight_denominator", lambda m: flashkat_names[m[0]], k): v
               for k, v in state.items()}
    assert any(k.endswith("numerator_v") for k in renamed)
    target = small_kat()
    filtered = checkpoint_filter_fn({"state_dict": renamed}, target)
    target.load_state_dict(filtered, strict=True)
    _assert_loaded(target, state)
    path = tmp_path / "flashkat.pth"
    torch.save({"state_dict": renamed}, path)
    _assert_loaded(small_kat(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), state)


def test_filter_resamples_position_embedding_for_another_size():
    state = _randomised(small_kat())  # 32 px: 2x2 patches + class token
    bigger = timm.create_model("kat_tiny_patch16_224", depth=2, img_size=64)  # 4x4 patches
    bigger.load_state_dict(checkpoint_filter_fn(state, bigger), strict=True)
    assert bigger.pos_embed.shape == (1, 17, 192)


def test_incompatible_checkpoint_fails_loudly(tmp_path):
    state = _randomised(timm.create_model("kat_small_patch16_224", depth=2, img_size=32))
    path = tmp_path / "small.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        small_kat(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _qkv(model: nn.Module, block: int = 0):
    attn = model.blocks[block].attn
    dim, head_dim = attn.qkv.in_features, attn.head_dim
    q, k, v = attn.qkv.weight.detach().double().chunk(3)
    return attn, dim, head_dim, q, k, v


def test_mimetic_init_matches_kat():
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny_patch16_224", depth=2)  # default weight_init="kan_mimetic"
    attn, dim, head_dim, q, k, v = _qkv(model)
    for head in range(attn.num_heads):  # W_q^T W_k: rank head_dim, close to 0.7 Z + 0.7 I
        rows = slice(head * head_dim, (head + 1) * head_dim)
        product = q[rows].T @ k[rows]
        assert torch.linalg.matrix_rank(product) == head_dim
        assert product.diagonal().mean() > 0.15  # a random init gives ~0
    # W_v W_proj (as stored) is exactly 0.4 Z - 0.4 I with Z uniform of variance 1/dim
    noise = v @ attn.proj.weight.detach().double() + 0.4 * torch.eye(dim, dtype=torch.float64)
    assert abs(noise.std().item() - 0.4 / math.sqrt(dim)) < 0.05 * 0.4 / math.sqrt(dim)
    assert noise.abs().max() <= 0.4 * math.sqrt(3 / dim) * (1 + 1e-4)
    # everything else: timm's trunc-normal 0.02, zero biases, tiny class token; rationals at their shape
    fc1 = model.blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.002 and fc1.bias.abs().max() == 0
    assert attn.qkv.bias.abs().max() == 0 and model.cls_token.abs().max() < 1e-4
    assert torch.equal(model.blocks[0].mlp.act1.weight_numerator, torch.tensor([[0.0, 1, 0, 0, 0, 0]]))


def test_variance_preserving_init_uses_rational_gain():
    model = timm.create_model("kat_tiny_patch16_224", depth=2, weight_init="kan_variance")
    mlp = model.blocks[0].mlp
    assert mlp.act2.gain > 1.5  # swish: gain ~ 1.68
    assert abs(mlp.fc1.weight.std().item() * math.sqrt(192) - mlp.act1.gain) < 0.05
    assert abs(mlp.fc2.weight.std().item() * math.sqrt(768) - mlp.act2.gain) < 0.05
    _, dim, _, _, _, v = _qkv(model)  # attention still mimetic
    assert (v @ model.blocks[0].attn.proj.weight.detach().double()).diagonal().mean() < -0.3


def test_timm_inits_still_available():
    model = timm.create_model("kat_tiny_patch16_224", depth=2, weight_init="jax")
    assert model.head.weight.abs().max() == 0  # jax zero-initialises the head
    assert all(isinstance(m, GroupRational) for m in (model.blocks[0].mlp.act1, model.blocks[0].mlp.act2))


def test_kat_trains_one_step():
    model = timm.create_model("kat_micro_patch4_16")
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    for name, parameter in model.named_parameters():
        if "weight_denominator" in name and ".act1." in name:  # identity init: B = 0, must still train
            assert parameter.grad.abs().sum() > 0, name


def test_fused_norm_blocks_compute_the_same_function():
    """fuse_norm=True (the default): the same state dict, outputs and gradients as timm's blocks."""
    from timm.models.vision_transformer import Block

    from flashkat.models.kat import FusedNormBlock

    class OwnBlock(Block):
        pass

    plain, fused = small_kat(fuse_norm=False), small_kat()
    assert isinstance(fused.blocks[0], FusedNormBlock) and plain.state_dict().keys() == fused.state_dict().keys()
    state = {k: v * 0.5 if v.dim() > 1 else v for k, v in _randomised(plain).items()}
    plain.load_state_dict(state)
    fused.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    out_plain, out_fused = plain(x), fused(x)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-4, atol=1e-4)
    out_plain.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):  # float32 against float64 arithmetic
        assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm(), name
    with pytest.raises(ValueError, match="fuse_norm=True.*block_fn"):
        small_kat(block_fn=OwnBlock)
    assert type(small_kat(fuse_norm=False, block_fn=OwnBlock).blocks[0]) is OwnBlock


def test_fused_norm_model_compiles_without_graph_breaks():
    """Compiled, the blocks leave LayerNorm to inductor: the graph calls act1's op, not the fused one."""
    model = small_kat()
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    targets = set()

    def record(graph_module, example_inputs):
        for module in graph_module.modules():  # the autograd.Functions' bodies are subgraphs
            if isinstance(module, torch.fx.GraphModule):
                targets.update(node.target for node in module.graph.nodes if node.op == "call_function")
        return graph_module

    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), eager, rtol=1e-5, atol=1e-5)
    torch.compile(model, fullgraph=True, backend=record)(x)
    names = {str(target) for target in targets}
    assert "flashkat.group_rational" in names, names
    assert not any("layer_norm_group_rational" in name for name in names), names
