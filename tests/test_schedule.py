"""The learning-rate schedule: the shape of one TrainingConfig's (schedule.py), and the run's rate at a step
(phases.Plan.learning_rate), which the scheduler, a resume and the records all follow."""

import math

import pytest
import torch

from conftest import make_shards
from encoder_train.config import Config, TrainingConfig
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.optimizers import build_optimizer
from encoder_train.phases import Plan
from encoder_train.schedule import build_scheduler, lr_factor
from encoder_train.stream import scan_sources


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
    from encoder_train.schedule import lr_factor

    for shape, at_half in [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - 0.5**0.5)]:
        cfg = TrainingConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, decay_shape=shape)
        assert lr_factor(4, cfg) == 0.5  # warmup: (4 + 1) / 10
        assert lr_factor(10, cfg) == lr_factor(79, cfg) == lr_factor(80, cfg) == 1.0  # stable until the last 20
        assert abs(lr_factor(90, cfg) - at_half) < 1e-12
        assert lr_factor(100, cfg) == 0.0
    by_steps = TrainingConfig(max_steps=100, schedule="wsd", decay_steps=50, decay_fraction=0.2)
    assert lr_factor(50, by_steps) == 1.0 and lr_factor(75, by_steps) == 0.5  # decay_steps wins over the fraction


# ---- the run's rate at a step: phases.Plan.learning_rate -----------------------------------------------------

PHASES = [
    {"name": "warm", "steps": 6, "training": {"warmup_steps": 3, "schedule": "constant"}},
    {"name": "main", "steps": 8, "training": {"learning_rate": 2e-3, "warmup_steps": 2, "schedule": "cosine"}},
    {"name": "decay", "steps": 5, "training": {"learning_rate": 7e-4, "schedule": "wsd", "decay_fraction": 1.0,
                                              "decay_shape": "1-sqrt"}},
]


def plan(tmp_path, phases: list | None = None, **training) -> Plan:
    data = tmp_path / "data"
    if not data.exists():
        make_shards(data, files=1, rows=16, width=16)
    config = Config.model_validate({"data": {"data_dir": str(data)}, "phases": phases or [],
                                    "training": {"batch_size": 2, "learning_rate": 1e-3, **training}})
    return Plan(config, scan_sources(config.data, 128), 1)


def stepped(plan: Plan, start: int = 0, state: dict | None = None) -> list[float]:
    """The rate of every update from `start` to the plan's end, as the optimizer holds it when it steps: through
    a LambdaLR on the plan (restored from `state` and put in force by `resume_rate` when resuming)."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=plan.config.training.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
    if state is not None:
        sched.load_state_dict(state)
        plan.resume_rate(sched, start)
    seen = []
    for _ in range(start, plan.total_steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("phases", [None, PHASES], ids=["unphased", "phased"])
def test_the_scheduler_gives_the_plans_rate_at_every_step(tmp_path, phases):
    p = plan(tmp_path, phases, max_steps=12, warmup_steps=4, schedule="linear") if phases is None else \
        plan(tmp_path, phases)
    rates = [p.learning_rate(s) for s in range(p.total_steps)]
    assert stepped(p) == rates  # exactly: one computation
    if phases:  # each phase its own peak, warmup and shape
        assert rates[0] == pytest.approx(1e-3 / 3) and rates[5] == 1e-3
        assert max(rates[6:14]) == pytest.approx(2e-3) and rates[14] == pytest.approx(7e-4) and rates[-1] < 7e-4
    else:
        assert rates[3] == 1e-3 and rates[-1] == pytest.approx(1e-3 / 8)


@pytest.mark.parametrize("phases", [None, PHASES], ids=["unphased", "phased"])
def test_a_resume_puts_the_plans_rate_in_force_at_once(tmp_path, phases):
    """A run stopped at step 5 and resumed: with the same plan it continues the uninterrupted rates; with a longer
    one (max_steps, a longer last phase) every update from the resumed step on takes the new plan's rate, the
    first one included (LambdaLR alone would apply the change a step late)."""
    length = {} if phases else {"max_steps": 10, "warmup_steps": 2}
    first = plan(tmp_path, phases, **length)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, first.lr_factor)
    for _ in range(5):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    assert stepped(first, 5, saved) == [first.learning_rate(s) for s in range(5, first.total_steps)]

    longer = [*PHASES[:-1], {**PHASES[-1], "steps": 9}] if phases else None
    second = plan(tmp_path, longer, **({} if phases else {"max_steps": 20, "warmup_steps": 2}))
    resumed = stepped(second, 5, saved)
    assert resumed == [second.learning_rate(s) for s in range(5, second.total_steps)]
    assert resumed[-1] != first.learning_rate(first.total_steps - 1)
    if not phases:
        assert resumed[0] != first.learning_rate(5)  # the new schedule, from the first resumed update
