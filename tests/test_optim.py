import math

import pytest
import torch

from encoder_train.config import TrainingConfig
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.optim import build_optimizer, build_scheduler, lr_factor


def test_linear_warmup_then_linear_decay_to_zero():
    cfg = TrainingConfig(max_steps=110, warmup_steps=10, learning_rate=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0)


def test_cosine_schedule():
    cfg = TrainingConfig(max_steps=100, warmup_steps=0, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(25, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_no_weight_decay_on_biases_and_layernorm():
    d = ModelDims(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                  max_position_embeddings=20, pad_id=1)
    model = MaskedLM(d)
    opt = build_optimizer(model, TrainingConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    ln = model.encoder.layers[0].attention_norm
    assert any(p is ln.weight for p in plain["params"]) and any(p is model.head.bias for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = TrainingConfig(max_steps=10, warmup_steps=2, learning_rate=0.5)
    opt = torch.optim.AdamW([p], lr=cfg.learning_rate)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.5, 0.4375])


def test_warmup_stable_decay_shapes():
    from encoder_train.config import TrainingConfig
    from encoder_train.optim import lr_factor

    for shape, at_half in [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - 0.5**0.5)]:
        cfg = TrainingConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, decay_shape=shape)
        assert lr_factor(4, cfg) == 0.5  # warmup: (4 + 1) / 10
        assert lr_factor(10, cfg) == lr_factor(79, cfg) == lr_factor(80, cfg) == 1.0  # stable until the last 20
        assert abs(lr_factor(90, cfg) - at_half) < 1e-12
        assert lr_factor(100, cfg) == 0.0
    by_steps = TrainingConfig(max_steps=100, schedule="wsd", decay_steps=50, decay_fraction=0.2)
    assert lr_factor(50, by_steps) == 1.0 and lr_factor(75, by_steps) == 0.5  # decay_steps wins over the fraction
