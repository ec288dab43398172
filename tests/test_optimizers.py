"""training.optimizer: adamw, stable_adamw and muon each train through the real `train` command, resume bit-exactly,
skip a non-finite step without touching the weights or their own state, and refuse a checkpoint of another one.

Each run is compared with its own twin (a resumed run, the checkpoint before a skipped step), never with recorded
numbers: the tests pass on any x86-64 CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from encoder_train import checkpoint, devices
from encoder_train.cli import main
from encoder_train.config import Config, TrainingConfig, load_config
from encoder_train.distributed import World
from encoder_train.errors import UserError
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.optimizers import OPTIMIZERS as OPTIMIZER_SPECS
from encoder_train.optimizers import build_optimizer, skips_on_device, sync_hyperparameters
from encoder_train.optimizers.muon import matrices, matrix_parameters
from encoder_train.optimizers.muon_with_adamw import MuonWithAdamW
from encoder_train.schedule import build_scheduler

OPTIMIZERS = ["adamw", "stable_adamw", "muon"]
CONFIG = """
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130}
data: {num_workers: 0}
training: {batch_size: 8, max_steps: STEPS, learning_rate: 3.0e-3, warmup_steps: 2, precision: fp32, log_interval: 1,
           optimizer: OPTIMIZER}
checkpoint: {checkpoint_every: EVERY, max_checkpoints: 9}
"""


def needs(optimizer: str) -> None:
    if optimizer == "stable_adamw":
        pytest.importorskip("optimi", reason="stable_adamw needs torch-optimi: pip install -e '.[dev]' installs it")


def config(tmp_path: Path, optimizer: str, steps: int, every: int) -> Path:
    path = tmp_path / f"{optimizer}-{steps}-{every}.yaml"
    path.write_text(CONFIG.replace("STEPS", str(steps)).replace("OPTIMIZER", optimizer).replace("EVERY", str(every)))
    return path


def train(capsys, cfg: Path, data: Path, tok: Path, ckpt: Path, *extra: str) -> tuple[int, str]:
    rc = main(["train", "--config_file", str(cfg), "--data_dir", str(data), "--tokenizer_filepath", str(tok),
               "--checkpoint_dir", str(ckpt), *extra])
    return rc, capsys.readouterr().err


def saved(ckpt: Path, step: int) -> dict:
    return checkpoint.load(checkpoint.checkpoint_path(ckpt, step))


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, by its path: the optimizer's state and group-level counters alike."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in tensors(value, f"{prefix}/{key}").items()}
    if isinstance(obj, list | tuple):
        return {k: v for i, value in enumerate(obj) for k, v in tensors(value, f"{prefix}/{i}").items()}
    return {}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def settings(groups: list[dict]) -> list[dict]:
    """Each parameter group's settings (lr, betas, momentum, ...), without its tensors (StableAdamW's step count)."""
    return [{k: v for k, v in g.items() if not isinstance(v, torch.Tensor)} for g in groups]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_trains_and_a_resumed_run_is_bit_identical(capsys, tmp_path, shard_dir, tokenizer_file, optimizer):
    needs(optimizer)
    cfg = config(tmp_path, optimizer, steps=8, every=4)
    straight = tmp_path / "straight"
    assert train(capsys, cfg, shard_dir, tokenizer_file, straight)[0] == 0
    losses = [json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    half, end = saved(straight, 4), saved(straight, 8)
    assert end["optimizer_name"] == optimizer and end["config"]["training"]["optimizer"] == optimizer
    assert not same(half["model"], end["model"])

    # 4 steps, then a resume for 4 more: the same weights and optimizer state, bit for bit.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(checkpoint.checkpoint_path(straight, 4), resumed)
    rc, _ = train(capsys, cfg, shard_dir, tokenizer_file, resumed, "--load_checkpoint", "latest")
    assert rc == 0
    twin = saved(resumed, 8)
    assert same(end["model"], twin["model"])
    assert same(tensors(end["optimizer"]), tensors(twin["optimizer"]))
    assert settings(end["optimizer"]["param_groups"]) == settings(twin["optimizer"]["param_groups"])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_nonfinite_step_leaves_weights_and_optimizer_state_alone(capsys, tmp_path, shard_dir, tokenizer_file,
                                                                    monkeypatch, optimizer):
    """Step 3's gradients are NaN (one entry poisons them all through clipping): an update made with them would turn
    every weight and moment NaN. It is skipped, the schedule moves on, and step 4 trains again."""
    needs(optimizer)
    from encoder_train import train as train_module

    real, calls = train_module.forward_backward, []

    def nan_gradient_on_third(model, *args, **kwargs):
        calls.append(1)
        loss = real(model, *args, **kwargs)
        if len(calls) == 3:
            model.embeddings.word_embeddings.weight.grad[5, 0] = float("nan")
        return loss

    monkeypatch.setattr(train_module, "forward_backward", nan_gradient_on_third)
    ckpt = tmp_path / "ck"
    rc, err = train(capsys, config(tmp_path, optimizer, steps=4, every=1), shard_dir, tokenizer_file, ckpt)
    assert rc == 0 and "not finite in 1 of them; update skipped" in err
    before, skipped, after = saved(ckpt, 2), saved(ckpt, 3), saved(ckpt, 4)
    assert same(before["model"], skipped["model"])
    assert same(tensors(before["optimizer"]), tensors(skipped["optimizer"]))  # moments, momenta, step counts
    assert not same(skipped["model"], after["model"])
    assert all(v.isfinite().all() for v in after["model"].values())
    lrs = [g["lr"] for s in (before, skipped) for g in s["optimizer"]["param_groups"][:1]]
    assert lrs[0] != lrs[1]  # the schedule moved on: warmup to step 2, then decay


def test_resuming_with_another_optimizer_is_refused_in_one_sentence(capsys, tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ck"
    assert train(capsys, config(tmp_path, "adamw", steps=2, every=2), shard_dir, tokenizer_file, ckpt)[0] == 0
    path = checkpoint.checkpoint_path(ckpt, 2)
    kept = path.read_bytes()
    rc, err = train(capsys, config(tmp_path, "muon", steps=3, every=3), shard_dir, tokenizer_file, ckpt,
                    "--load_checkpoint", "latest")
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert (f"checkpoint {path} was trained with training.optimizer adamw, not muon" in lines[0]
            and "resume with training.optimizer: adamw, or start muon in a new --checkpoint_dir" in lines[0]), err
    assert path.read_bytes() == kept and [p.name for p in ckpt.glob("*.pt")] == [path.name]


def test_a_checkpoint_from_before_the_choice_is_adamw(capsys, tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ck"
    assert train(capsys, config(tmp_path, "adamw", steps=2, every=2), shard_dir, tokenizer_file, ckpt)[0] == 0
    state = saved(ckpt, 2)
    del state["optimizer_name"], state["config"]["training"]["optimizer"], state["config"]["training"]["muon_momentum"]
    old = tmp_path / "old"
    old.mkdir()
    checkpoint.save(state, old, 2)
    rc, err = train(capsys, config(tmp_path, "muon", steps=3, every=3), shard_dir, tokenizer_file, old,
                    "--load_checkpoint", "latest")
    assert rc == 2 and "trained with training.optimizer adamw, not muon" in err
    rc, err = train(capsys, config(tmp_path, "adamw", steps=3, every=3), shard_dir, tokenizer_file, old,
                    "--load_checkpoint", "latest")
    assert rc == 0, err
    assert saved(old, 3)["optimizer_name"] == "adamw"


DIMS = {
    "roberta": ModelDims(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                         max_position_embeddings=20, pad_id=1),
    "modernbert": ModelDims(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24,
                            max_position_embeddings=20, pad_id=1, position_embedding="rotary", feed_forward="geglu",
                            pre_layer_norm=True, first_attention_norm=False, attention_bias=False,
                            feed_forward_bias=False, norm_bias=False, head_bias=False, token_type_embedding=False,
                            init="modernbert"),
}


@pytest.mark.parametrize("family", DIMS)
def test_muon_takes_the_layer_matrices_and_adamw_the_rest(family):
    dims = DIMS[family]
    model = MaskedLM(dims)
    opt = build_optimizer(model, TrainingConfig(optimizer="muon", weight_decay=0.1), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt, torch.optim.Optimizer)
    (muon,), (decayed, plain) = opt.muon.param_groups, opt.adamw.param_groups
    assert opt.param_groups == [muon, decayed, plain]
    assert muon["weight_decay"] == decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0

    def holds(group, p) -> bool:
        return any(q is p for q in group["params"])

    matrices = [model.head.dense.weight]
    for layer in model.encoder.layers:
        a, f = layer.attention, layer.feed_forward
        matrices += [a.query.weight, a.key.weight, a.value.weight, a.output.weight, f.up.weight, f.down.weight]
    assert len(muon["params"]) == len(matrices) and all(holds(muon, p) for p in matrices)

    # The word embedding, which is also the MLM decoder's weight, is AdamW's; so are the other embeddings.
    words = model.embeddings.word_embeddings.weight
    assert model.head.word_embeddings[0].weight is words and holds(decayed, words)
    embeddings = [e.weight for e in (model.embeddings.position_embeddings, model.embeddings.token_type_embeddings)
                  if e is not None]
    assert all(holds(decayed, p) for p in embeddings) and len(decayed["params"]) == 1 + len(embeddings)
    # Norms and biases: AdamW, not decayed.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    small = [p for m in norms for p in m.parameters()] + [model.head.bias]
    small += [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert all(holds(plain, p) for p in small) and len(plain["params"]) == len(small)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))

    # The memory estimate counts Muon's matrices as the optimizer does: one momentum buffer instead of two moments.
    assert matrix_parameters(dims) == sum(p.numel() for p in muon["params"])
    world = World()
    adamw, with_muon = (devices.training_memory(dims, world, "ddp", o).needed for o in ("adamw", "muon"))
    assert adamw == 16 * model.num_parameters() and adamw - with_muon == 4 * matrix_parameters(dims)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_resume_with_changed_settings_puts_them_in_force(optimizer):
    needs(optimizer)
    torch.manual_seed(0)
    model = MaskedLM(DIMS["roberta"])
    old = TrainingConfig(optimizer=optimizer, max_steps=10)
    opt = build_optimizer(model, old, torch.device("cpu"))
    sched = build_scheduler(opt, old)
    model(torch.randint(5, 64, (2, 8)), labels=torch.randint(5, 64, (2, 8))).loss.backward()
    opt.step()
    sched.step()
    new = old.model_copy(update={"adam_beta1": 0.8, "adam_beta2": 0.9, "adam_eps": 1e-8, "weight_decay": 0.2,
                                 "muon_momentum": 0.9, "learning_rate": 1e-3})
    sync_hyperparameters(opt, new)
    adam_groups = opt.adamw.param_groups if optimizer == "muon" else opt.param_groups
    for i, g in enumerate(adam_groups):
        betas = (g["beta1"], g["beta2"]) if optimizer == "stable_adamw" else g["betas"]
        assert betas == (0.8, 0.9) and g["eps"] == 1e-8 and g["weight_decay"] == (0.2 if i == 0 else 0.0)
    if optimizer == "stable_adamw":
        assert all(float(s["eps_sq"]) == pytest.approx(1e-16) for s in opt.state.values())
    if optimizer == "muon":
        assert opt.muon.param_groups[0]["momentum"] == 0.9 and opt.muon.param_groups[0]["weight_decay"] == 0.2
    # The learning rate is not the optimizer's to set on resume: the plan's (phases.Plan.resume_rate) does.
    assert {g["lr"] for g in opt.param_groups} == {sched.get_last_lr()[0]} and sched.base_lrs[0] == old.learning_rate


def test_muon_with_fsdp_is_refused_at_config_time(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training: {optimizer: muon, data_parallel: fsdp}\n")
    with pytest.raises(UserError, match="training.optimizer muon does not work with training.data_parallel fsdp"):
        load_config(path)
    assert load_config(path, {"training.data_parallel": "ddp"}).training.optimizer == "muon"
    assert Config().training.optimizer == "adamw"


def test_stable_adamw_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimi", None)  # what `import optimi` meets when not installed
    with pytest.raises(UserError, match=r"stable_adamw needs the optimi package.*\[stable-adamw\]"):
        build_optimizer(MaskedLM(DIMS["roberta"]), TrainingConfig(optimizer="stable_adamw"), torch.device("cpu"))


def test_stable_adamw_on_the_cpu_never_picks_triton():
    # Left to optimi, every group gets its Triton kernel wherever triton imports (it checks the group's parameters
    # before it has listed them: all() of an empty list), which fails on a machine without a GPU where PyPI's torch
    # brought triton; the device decides, explicitly.
    needs("stable_adamw")
    torch.manual_seed(0)
    model = MaskedLM(DIMS["roberta"])
    opt = build_optimizer(model, TrainingConfig(optimizer="stable_adamw"), torch.device("cpu"))
    assert [(g["triton"], g["foreach"]) for g in opt.param_groups] == [(False, False)] * 2
    model(torch.randint(5, 64, (2, 8)), labels=torch.randint(5, 64, (2, 8))).loss.backward()
    opt.step()
    assert [g["triton"] for g in opt.param_groups] == [False, False]
    cuda = build_optimizer(model, TrainingConfig(optimizer="stable_adamw"), torch.device("cuda"))
    assert [g["triton"] for g in cuda.param_groups] == [None, None]  # optimi's own choice where its kernels run


# ---- the registry: every optimizer's spec agrees with the optimizer it builds -------------------------------


@pytest.mark.parametrize("family", DIMS)
@pytest.mark.parametrize("name", list(OPTIMIZER_SPECS))
def test_every_registered_optimizer_builds_and_its_memory_estimate_is_what_it_holds(name, family):
    """Built on a tiny model of each family and stepped once: the bytes its spec counts (from the shape alone, for
    the memory check) are the model's fp32 weights and gradients plus every state tensor the size of its
    parameter (moments, momentum buffers), which also checks a split optimizer's share against the real split."""
    needs(name)
    spec, dims = OPTIMIZER_SPECS[name], DIMS[family]
    torch.manual_seed(0)
    model = MaskedLM(dims)
    opt = build_optimizer(model, TrainingConfig(optimizer=name), torch.device("cpu"))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}  # every parameter, once
    model(torch.randint(5, 64, (2, 8)), labels=torch.randint(5, 64, (2, 8))).loss.backward()
    opt.step()
    params = list(model.parameters())
    state = sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values()
                if isinstance(t, torch.Tensor) and t.shape == p.shape)
    real = sum(p.numel() * (p.element_size() + p.grad.element_size()) for p in params) + state
    assert spec.training_bytes(dims, model.num_parameters()) == real
    if spec.own_parameters is not None:
        assert 0 < spec.own_parameters(dims) < model.num_parameters()


def test_the_parameters_muon_takes_are_counted_from_the_shape_as_the_builder_picks_them():
    for dims in DIMS.values():
        assert matrix_parameters(dims) == sum(p.numel() for p in matrices(MaskedLM(dims)))


@pytest.mark.parametrize("name", list(OPTIMIZER_SPECS))
def test_fsdp_is_refused_for_the_optimizers_whose_spec_says_so(tmp_path, name):
    spec = OPTIMIZER_SPECS[name]
    path = tmp_path / "run.yaml"
    path.write_text(f"training: {{optimizer: {name}, data_parallel: fsdp}}\n")
    if spec.not_with_fsdp is None:
        assert load_config(path).training.data_parallel == "fsdp"
        return
    others = " or ".join(n for n, s in OPTIMIZER_SPECS.items() if s.not_with_fsdp is None)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: training.optimizer {name} does not work with training.data_parallel fsdp "
                            f"({spec.not_with_fsdp}); set training.data_parallel: ddp, or choose training.optimizer "
                            f"{others}.")


def test_the_optimizers_are_the_configs_choices_and_only_fused_adamw_skips_on_the_device():
    assert TrainingConfig.model_fields["optimizer"].annotation.__args__ == tuple(OPTIMIZER_SPECS)
    assert OPTIMIZER_SPECS["muon"].not_with_fsdp and not OPTIMIZER_SPECS["adamw"].not_with_fsdp
    model = MaskedLM(DIMS["roberta"])
    for name in OPTIMIZER_SPECS:
        needs(name)
        opt = build_optimizer(model, TrainingConfig(optimizer=name), torch.device("cpu"))
        assert skips_on_device(opt) == (name == "adamw")  # fused on the CPU: found_inf is read on the device
    foreach = torch.optim.AdamW(model.parameters(), foreach=True)
    assert not skips_on_device(foreach)


CHECKPOINT_KEYS = {"model", "optimizer", "optimizer_name", "sharded_optimizer", "scheduler", "step", "tokens_seen",
                   "data", "plan", "rng", "dims", "tokenizer", "config", "wandb_run_id"}
SYNCED = {"adam_beta1": 0.8, "adam_beta2": 0.9, "adam_eps": 1e-8, "weight_decay": 0.2, "muon_momentum": 0.9,
          "learning_rate": 1e-3}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_run_resumed_with_changed_settings_trains_with_them(capsys, tmp_path, shard_dir, tokenizer_file,
                                                             optimizer):
    """Through the real command: 2 steps, then a resume with every synced setting changed and a longer run. The
    checkpoint after the resumed step holds the new settings in each of the spec's groups, and the rate the plan
    gives (the new peak on the new schedule)."""
    needs(optimizer)
    ckpt = tmp_path / "ck"
    assert train(capsys, config(tmp_path, optimizer, steps=2, every=2), shard_dir, tokenizer_file, ckpt)[0] == 0
    flags = [x for k, v in SYNCED.items() for x in ("--set", f"training.{k}={v}")]
    rc, err = train(capsys, config(tmp_path, optimizer, steps=6, every=1), shard_dir, tokenizer_file, ckpt,
                    "--load_checkpoint", "latest", "--set", "training.stop_at=3", *flags)
    assert rc == 0, err
    state = saved(ckpt, 3)
    assert set(state) == CHECKPOINT_KEYS  # the keys checkpoints have always had, written by TrainState's parts
    groups = state["optimizer"]["param_groups"]
    adam = groups[1:] if optimizer == "muon" else groups
    for i, g in enumerate(adam):
        betas = (g["beta1"], g["beta2"]) if optimizer == "stable_adamw" else g["betas"]
        assert tuple(betas) == (0.8, 0.9) and g["eps"] == 1e-8 and g["weight_decay"] == (0.2 if i == 0 else 0.0)
    if optimizer == "muon":
        assert groups[0]["momentum"] == 0.9 and groups[0]["weight_decay"] == 0.2
    # the rate of step 4's update (0-based 3) on the new schedule: warmup 2, then linear to 0 at step 6
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * (1 - (3 - 2) / (6 - 2))] * len(groups))
    assert {g["initial_lr"] for g in groups} == {1e-3}
