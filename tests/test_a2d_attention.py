"""Attention capture (fairseq_kd.capture, fairseq_kd.attention) against fairseq's own attention outputs."""
import pytest
import torch

from fairseq_kd.attention import (
    attention_layout,
    attention_layout_from_cfg,
    describe_alignment,
    parse_attention_types,
)
from fairseq_kd.capture import CaptureSpec, capture
from fairseq_kd.errors import KDError
from fairseq_kd.inprocess import random_model as inprocess_random_model
from fairseq_kd.inprocess import save_random_checkpoint, transformer_args
from helpers import build_training, first_batch

TYPES = ["enc", "dec", "cross"]


arch = transformer_args


def random_model(tiny_data, layers, heads, seed=0, dim=32, *extra):
    return inprocess_random_model(tiny_data / "bin", layers, heads, seed, dim, *extra)


def save_random_teacher(tiny_data, path, layers, heads, seed=0, dim=32, *extra):
    """A randomly initialised teacher, saved as fairseq's trainer saves checkpoints
    (``extra``: more model options)."""
    return save_random_checkpoint(tiny_data / "bin", path, layers, heads, seed, dim, *extra)


@pytest.fixture(scope="module")
def student(tiny_data):
    _, task, model = random_model(tiny_data, 3, 4)
    return model, first_batch(task)


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("training", [False, True])
def test_capture_leaves_outputs_unchanged_and_removes_hooks(student, training):
    model, sample = student
    model.train(training)  # with dropout too: the random stream must be untouched
    torch.manual_seed(1)
    plain = model(**sample["net_input"])[0]
    assert all_hooks(model) == 0
    torch.manual_seed(1)
    with capture(model, CaptureSpec(attention=tuple(TYPES))) as seen:
        assert all_hooks(model) == 9  # 3 layers x 3 attention types
        captured = model(**sample["net_input"])[0]
    maps = seen.attention
    assert all_hooks(model) == 0
    assert torch.equal(plain, captured)
    B, S = sample["net_input"]["src_tokens"].shape
    T = sample["net_input"]["prev_output_tokens"].size(1)
    shapes = {"enc": (B, 4, S, S), "dec": (B, 4, T, T), "cross": (B, 4, T, S)}
    for t in TYPES:
        assert [tuple(m.shape) for m in maps[t]] == [shapes[t]] * 3
        assert seen.stacked_attention(t).shape == (shapes[t][0], 12) + shapes[t][2:]
    model.eval()


def test_cross_attention_equals_fairseq_head_weights(student):
    """fairseq returns per-head cross-attention of its alignment layer: compare layer by layer."""
    model, sample = student
    net_input = sample["net_input"]
    with torch.no_grad(), capture(model, CaptureSpec(attention=("cross",))) as seen:
        model(**net_input)
    maps = seen.attention
    for layer in range(3):
        seen = {}
        hook = model.decoder.layers[layer].encoder_attn.register_forward_hook(
            lambda m, args, out: seen.update(heads=out[1]))
        with torch.no_grad():
            _, extra = model(**net_input, alignment_layer=layer)
        hook.remove()
        fairseq_heads = seen["heads"].transpose(0, 1)  # H x B x T x S -> B x H x T x S
        assert torch.allclose(maps["cross"][layer], fairseq_heads, atol=1e-6)
        assert torch.allclose(maps["cross"][layer].mean(1), extra["attn"][0], atol=1e-6)


@pytest.mark.parametrize("attn_type", ["enc", "dec"])
def test_self_attention_equals_fairseq_weights(student, attn_type):
    """Self-attention runs fused without weights; asking the module for them returns
    the head average, which must equal the mean of the captured heads."""
    model, sample = student
    calls = []
    from fairseq_kd.attention import attention_modules
    modules = attention_modules(model, attn_type)
    hooks = [m.register_forward_hook(lambda m, a, kw, o: calls.append((m, kw)), with_kwargs=True)
             for m in modules]
    with torch.no_grad(), capture(model, CaptureSpec(attention=(attn_type,))) as seen:
        model(**sample["net_input"])
    maps = seen.attention
    for h in hooks:
        h.remove()
    assert len(calls) == 3
    for layer, (module, kw) in enumerate(calls):
        kw = dict(kw, need_weights=True)
        with torch.no_grad():
            _, avg = module(**kw)
        assert torch.allclose(maps[attn_type][layer].mean(1), avg, atol=1e-6)
    padded_key = sample["net_input"]["src_tokens"].eq(1)
    if attn_type == "enc":
        # left-padded source: padded keys get exactly zero probability
        assert padded_key.any()
        assert (maps["enc"][0].permute(0, 2, 3, 1)[padded_key[:, None, :].expand(
            -1, padded_key.size(1), -1)] == 0).all()
    else:  # causal: no probability on future keys
        T = maps["dec"][0].size(-1)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        assert (maps["dec"][0][..., future] == 0).all()


def test_captured_maps_carry_gradients_to_the_projections(student):
    model, sample = student
    model.zero_grad()
    with capture(model, CaptureSpec(attention=("enc",))) as seen:
        model(**sample["net_input"])
    maps = seen.attention
    (maps["enc"][1][:, :, :, 0].sum()).backward()
    assert model.encoder.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.encoder.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_layouts_from_config_and_modules(tiny_data):
    cfg, _, model = random_model(tiny_data, 2, 2)
    assert attention_layout(model, TYPES) == {"enc": (2, 2), "dec": (2, 2), "cross": (2, 2)}
    assert attention_layout_from_cfg(cfg.model, TYPES) == attention_layout(model, TYPES)


def test_attention_types_are_checked():
    assert parse_attention_types("cross, enc") == ["enc", "cross"]
    for bad in ("", "enc,self", "encoder"):
        with pytest.raises(KDError, match="--attn-types must be a comma-separated subset"):
            parse_attention_types(bad)


def test_describe_alignment_names_layers_and_heads():
    w = torch.tensor([[0.1, 0.0, 0.7, 0.2], [0.25, 0.25, 0.25, 0.25]])
    lines = describe_alignment(w, student_heads=2, teacher_heads=1, top=2)
    assert lines[0] == "teacher L0H0 <- L1H0 0.70, L1H1 0.20"
    assert lines[1].startswith("teacher L1H0 <- ")
