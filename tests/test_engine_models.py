"""train/models.py (+ frozen.py, lm.py, vision.py) and train/kd.py: layered forward == full forward (and == transformers' own forward),
frozen precisions, frozen layers keep no activations for their weights, KD loss values by hand."""

from __future__ import annotations

import math

import pytest
import torch

from snakenode.train import frozen as FZ
from snakenode.train import kd as K
from snakenode.train import models as M
from snakenode.train.layered import LayeredModel, ModelError
from snakenode.train.lm import FAMILIES
from snakenode.train.teacher import build_teacher

IMAGE = {"mlp": (4, 1, 8, 8), "cnn": (4, 1, 28, 28), "vgg11": (2, 3, 32, 32)}
LMS = ["llama-tiny", "opt-tiny", "gpt2", "llama"]


def _build(name: str, args: dict | None = None, frozen: str | None = None, seed: int = 1) -> LayeredModel:
    spec = M.ModelSpec(name, args or {}, seed)
    m = M.build_skeleton(spec)
    for n, t in M.initial_layers(spec, m):
        M.materialize(m, n, t, frozen)
    return m.eval()


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name in IMAGE:
        return torch.randn(*IMAGE[name], generator=g)
    return torch.randint(0, 256, (2, 12), generator=g)


@pytest.mark.parametrize("name", list(IMAGE) + LMS)
def test_slicing_equivalence(name: str) -> None:
    args = {"tie_word_embeddings": False} if name == "llama" else {}
    m = _build(name, args)
    x = m.model_inputs(_input(name))
    with torch.no_grad():
        full = m(x)
        for start in (0, 1, m.num_blocks - 1, m.num_blocks):
            h = m.run("stem", x)
            for i in range(start):
                h = m.run(f"blocks.{i}", h)
            assert torch.equal(m.forward_from(h, start), full), f"start={start}"


@pytest.mark.parametrize("name", LMS)
def test_lm_matches_transformers(name: str) -> None:
    import transformers

    args = {"tie_word_embeddings": False} if name == "llama" else {}
    m = _build(name, args)
    torch.manual_seed(1)
    hf = getattr(transformers, FAMILIES[m.family][1])(m.config).eval()
    x = _input(name)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, m(x), atol=1e-5)


def test_mlp_defaults_and_layers() -> None:
    m = M.build_skeleton(M.ModelSpec("mlp", {}, 0))
    assert m.num_blocks == 4 and m.layer_names() == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert m.layer_tensor_names("blocks.2") == ["blocks.2.fc.bias", "blocks.2.fc.weight"]
    v = M.build_skeleton(M.ModelSpec("vgg11", {}, 0))
    assert v.num_blocks == 8 and "stem" not in v.layer_names()       # identity stem owns no tensors
    assert 9.2e6 < M.param_count(v) < 9.3e6
    t = M.build_skeleton(M.ModelSpec("llama-tiny", {}, 0))
    assert t.tied and not any(n.startswith("head.lm_head") for n in t.layer_tensor_names("head"))
    with pytest.raises(ModelError, match="unknown model"):
        M.build_skeleton(M.ModelSpec("resnet", {}, 0))


@pytest.mark.parametrize("name", ["mlp", "vgg11", "llama-tiny"])
def test_frozen_precisions_close(name: str) -> None:
    x = _input(name)
    ref = _build(name)
    with torch.no_grad():
        r = ref(ref.model_inputs(x))
    tol = {"fp32": 0.0, "bf16": 0.02, "int8": 0.05}
    for mode in FZ.FROZEN_DTYPES:
        m = _build(name, frozen=mode)
        with torch.no_grad():
            out = m(m.model_inputs(x))
        assert (out - r).abs().max().item() <= tol[mode] * max(1.0, r.abs().max().item()), mode


def test_frozen_layers_save_no_weight_activations() -> None:
    """A frozen Linear/Conv saves nothing for backward; a trainable one saves its input."""
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    frozen = FZ.FrozenLinear(lin.weight, lin.bias, "int8")
    from snakenode.train.capacity import _saved_bytes

    _, saved_frozen = _saved_bytes(lambda: frozen(x))
    _, saved_train = _saved_bytes(lambda: lin(x))
    assert saved_frozen == 0 and saved_train >= x.numel() * 4
    y = frozen(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    w = frozen.full().clone()
    assert torch.allclose(g, torch.ones(32, 64) @ w, atol=1e-5)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    xi = torch.randn(2, 3, 8, 8, requires_grad=True)
    fc = FZ.FrozenConv2d(conv, "fp32")
    _, saved = _saved_bytes(lambda: fc(xi))
    assert saved == 0
    (g1,) = torch.autograd.grad(fc(xi).sum(), xi)
    (g2,) = torch.autograd.grad(conv(xi).sum(), xi)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_int8_quantization_roundtrip() -> None:
    w = torch.randn(300, 70)
    q, s = FZ._quantize(w, "int8")
    assert q.dtype == torch.int8 and s is not None and s.shape == (300,)
    deq = q.float() * s[:, None]
    assert (deq - w).abs().max() <= s.max() * 0.5 + 1e-6


def test_kd_loss_hand_checked() -> None:
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    ce = math.log(1 + math.exp(-1))                                   # 0.31326
    assert K.kd_loss(s, None, y, 0.5, 1.0).item() == pytest.approx(ce, abs=1e-6)
    # T=1: KL(t||s) = (p - q) * log(p / q) with p = sigmoid(1), q = sigmoid(-1): = 0.46212 * 1
    kl1 = (1 / (1 + math.exp(-1)) - 1 / (1 + math.exp(1))) * 1.0
    assert K.kd_loss(s, t, y, 0.5, 1.0).item() == pytest.approx(0.5 * ce + 0.5 * kl1, abs=1e-6)
    assert K.kd_loss(s, t, y, 0.5, 1.0).item() == pytest.approx(0.38769, abs=1e-5)
    # T=2: logits halve; KL = (sigmoid(.5) - sigmoid(-.5)) * 0.5 = 0.12246, times T^2 = 4
    kl2 = (1 / (1 + math.exp(-0.5)) - 1 / (1 + math.exp(0.5))) * 0.5
    assert K.kd_loss(s, t, y, 0.5, 2.0).item() == pytest.approx(0.5 * ce + 0.5 * 4 * kl2, abs=1e-6)
    assert K.kd_loss(s, t, y, 0.5, 2.0).item() == pytest.approx(0.40155, abs=1e-5)
    assert K.kd_loss(s, t, y, 1.0, 1.0).item() == pytest.approx(kl1, abs=1e-6)


def test_chunked_lm_loss_equals_full() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 10, 16, generator=g, requires_grad=True)
    tfeats = torch.randn(2, 10, 16, generator=g)
    w = torch.randn(300, 16, generator=g)
    y = torch.randint(0, 300, (2, 10), generator=g)

    def proj(f: torch.Tensor) -> torch.Tensor:
        return f @ w.T

    full = K.kd_loss(proj(feats).reshape(-1, 300), proj(tfeats).reshape(-1, 300), y.reshape(-1), 0.3, 2.0)
    chunked = K.chunked_lm_loss(feats, y, proj, tfeats, proj, 0.3, 2.0, chunk_tokens=3)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    (g1,) = torch.autograd.grad(full, feats)
    (g2,) = torch.autograd.grad(chunked, feats)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_kd_decision() -> None:
    cfg = K.KDConfig(mode="auto", auto_threshold=0.1)
    assert K.kd_decision(cfg, "lm", [], None) == (True, None)
    on, js = K.kd_decision(cfg, "classification", [10] * 10, None)
    assert not on and js == pytest.approx(0.0)
    on, js = K.kd_decision(cfg, "classification", [100, 0, 0, 0, 0, 0, 0, 0, 0, 1], None)
    assert on and js is not None and js > 0.1
    skew = [50, 50, 0, 0]
    on, js = K.kd_decision(K.KDConfig(mode="auto", reference="union"), "classification", skew, [50, 50, 0, 0])
    assert not on and js == pytest.approx(0.0)
    assert K.kd_decision(K.KDConfig(mode="off"), "classification", skew, None)[0] is False
    assert K.kd_decision(K.KDConfig(mode="on"), "classification", [1, 1], None)[0] is True
    with pytest.raises(ValueError, match="kd.mode"):
        K.KDConfig.from_job({"kd": {"mode": "sometimes"}})


def test_teacher_adds_only_window_params() -> None:
    m = _build("mlp", {"hidden": 64, "depth": 6})
    trainable = {"blocks.2", "blocks.3"}
    before = {id(t) for t in m.state_dict(keep_vars=True).values()}
    teacher = build_teacher(m, trainable, "fp32")
    assert set(teacher) == trainable
    added = [t for mod in teacher.values() for t in list(mod.parameters()) + list(mod.buffers())]
    assert all(id(t) not in before for t in added)
    window_bytes = sum(t.numel() * 4 for n in trainable for t in m.get_layer(n).parameters())
    assert sum(t.numel() * t.element_size() for t in added) == window_bytes
    t8 = build_teacher(m, trainable, "int8")
    b8 = sum(t.numel() * t.element_size() for mod in t8.values() for t in mod.buffers())
    assert b8 < window_bytes / 3                   # int8 copy: a quarter plus scales and biases


@pytest.mark.parametrize("mode", ["fp32", "int8"])
@pytest.mark.parametrize("kd", [False, True])
def test_fused_vocab_loss_equals_chunked(mode: str, kd: bool) -> None:
    """The vocabulary-sliced loss (frozen projection) gives the token-chunked loss and its gradient."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 24, generator=g)
    emb = FZ.FrozenEmbedding(w, mode)
    emb_t = FZ.FrozenEmbedding(w + 0.1 * torch.randn(3000, 24, generator=g), mode)
    f = torch.randn(2, 50, 24, generator=g, requires_grad=True)
    tf = torch.randn(2, 50, 24, generator=g) if kd else None
    y = torch.randint(0, 3000, (2, 50), generator=g)
    alpha = 0.4 if kd else 0.0
    a = K.chunked_lm_loss(f, y, emb.as_linear, tf, emb_t.as_linear if kd else None, alpha, 2.0, chunk_tokens=7)
    b = K.fused_lm_loss(f, y, emb, tf, emb_t if kd else None, alpha, 2.0, max_logits=5000)
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    (ga,) = torch.autograd.grad(a, f)
    (gb,) = torch.autograd.grad(b, f)
    assert torch.allclose(ga, gb, atol=1e-6)
