"""Tests of library/training/optim.py and library/config/optim.py: every optimizer steps, schedules take exact values,
state round-trips for resume, and config mistakes are ConfigErrors that name the key."""

import math
import sys

import pytest
import torch

from library.config.optim import OptimizerConfig, SchedulerConfig
from library.errors import ConfigError
from library.training.optim import LRFactor, build_optimizer, build_scheduler

OPTIMIZERS = {
    # type: (learning rate that makes visible progress in 20 steps, expected class name)
    "AdamW": (0.05, "AdamW"),
    "AdamW8bit": (0.05, "AdamW8bit"),
    "Lion8bit": (0.01, "Lion8bit"),
    "PagedAdamW8bit": (0.05, "PagedAdamW8bit"),
    "Adafactor": (0.05, "Adafactor"),
    "CAME": (0.005, "CAME"),  # update RMS ~ lr per element: larger overshoots these ~0.1 weights
    "Prodigy": (1.0, "Prodigy"),
    "Lion": (0.01, "Lion"),
    "SGD": (0.1, "SGD"),
    "torch.optim.RAdam": (0.05, "RAdam"),
}


def tiny_model():
    torch.manual_seed(0)
    # 80 x 64 = 5120 weights: above bitsandbytes' 4096-element threshold, so the 8-bit state is really used.
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Linear(80, 8))


def groups_of(model, lr, te_lr=None):
    return [
        {"params": model[0].parameters(), "lr": lr, "name": "unet"},
        {"params": model[1].parameters(), "lr": te_lr if te_lr is not None else lr, "name": "text_encoder"},
    ]


def quadratic(model):
    return sum((p**2).sum() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optimizer_type", list(OPTIMIZERS))
def test_every_optimizer_lowers_a_quadratic(optimizer_type):
    lr, class_name = OPTIMIZERS[optimizer_type]
    model = tiny_model()
    cfg = OptimizerConfig(optimizer_type=optimizer_type, learning_rate=lr, weight_decay=0.0)
    cfg.validate()
    opt = build_optimizer(groups_of(model, lr), cfg)
    assert type(opt).__name__ == class_name
    assert [g["name"] for g in opt.param_groups] == ["unet", "text_encoder"]
    start = quadratic(model).item()
    for _ in range(20):
        opt.zero_grad()
        loss = quadratic(model)
        loss.backward()
        opt.step()
    assert quadratic(model).item() < 0.9 * start


def test_adamw_fused_where_supported_and_8bit_state():
    model = tiny_model()
    opt = build_optimizer(groups_of(model, 1e-3), OptimizerConfig(optimizer_type="AdamW"))
    assert opt.defaults["fused"] is True  # torch 2.13 has a fused AdamW kernel for CPU tensors
    opt = build_optimizer(groups_of(model, 1e-3), OptimizerConfig(optimizer_type="AdamW", optimizer_args={"fused": False}))
    assert not opt.defaults["fused"]
    opt = build_optimizer(groups_of(model, 1e-3), OptimizerConfig(optimizer_type="AdamW8bit"))
    quadratic(model).backward()
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.uint8


def test_separate_learning_rates():
    cfg = OptimizerConfig(learning_rate=1e-4, unet_lr=2e-4, text_encoder_lr=None)
    assert cfg.lr_for("unet") == 2e-4 and cfg.lr_for("text_encoder") == 1e-4 and cfg.lr_for("text_encoder_2") == 1e-4
    cfg = OptimizerConfig(learning_rate=1e-4, text_encoder_lr=5e-5)
    assert cfg.lr_for("unet") == 1e-4 and cfg.lr_for("text_encoder_2") == 5e-5
    model = tiny_model()
    opt = build_optimizer(groups_of(model, cfg.lr_for("unet"), cfg.lr_for("text_encoder")), cfg)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]
    opt = build_optimizer([{"params": model.parameters()}], cfg)
    assert opt.param_groups[0]["lr"] == 1e-4


def test_optimizer_args_and_adafactor_relative_step():
    model = tiny_model()
    opt = build_optimizer(groups_of(model, 0.1), OptimizerConfig(optimizer_type="SGD", optimizer_args={"momentum": 0.9}))
    assert opt.defaults["momentum"] == 0.9
    opt = build_optimizer(groups_of(model, 0.1), OptimizerConfig(optimizer_type="Adafactor"))
    assert opt.defaults["relative_step"] is False and opt.defaults["lr"] == 1e-4  # cfg.learning_rate
    assert opt.param_groups[0]["lr"] == 0.1  # the group's own lr wins
    opt = build_optimizer(
        groups_of(model, 0.1), OptimizerConfig(optimizer_type="Adafactor", optimizer_args={"relative_step": True})
    )
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    opt = build_optimizer(groups_of(model, 0.1), OptimizerConfig(optimizer_type="CAME", betas=[0.8, 0.9, 0.99]))
    assert opt.defaults["betas"] == (0.8, 0.9, 0.99)
    opt = build_optimizer(groups_of(model, 0.1), OptimizerConfig(optimizer_type="CAME"))
    assert opt.defaults["betas"] == (0.9, 0.999, 0.9999)
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer(groups_of(model, 0.1), OptimizerConfig(optimizer_type="SGD", optimizer_args={"bogus": 1}))


@pytest.mark.parametrize(
    "module, optimizer_type, package",
    [("bitsandbytes", "AdamW8bit", "bitsandbytes"), ("prodigyopt", "Prodigy", "prodigyopt"),
     ("came_pytorch", "CAME", "came-pytorch")],
)
def test_missing_package_names_pip_command(monkeypatch, module, optimizer_type, package):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError) as e:
        build_optimizer(groups_of(tiny_model(), 1e-3), OptimizerConfig(optimizer_type=optimizer_type))
    assert f"pip install {package}" in str(e.value) and f"'{optimizer_type}'" in str(e.value)


def test_dotted_path_errors_and_unknown_type():
    model = tiny_model()
    with pytest.raises(ConfigError, match="cannot import module 'nowhere_pkg'"):
        build_optimizer(groups_of(model, 1e-3), OptimizerConfig(optimizer_type="nowhere_pkg.Opt"))
    with pytest.raises(ConfigError, match="no optimizer class 'Linear'"):
        build_optimizer(groups_of(model, 1e-3), OptimizerConfig(optimizer_type="torch.nn.Linear"))
    with pytest.raises(ConfigError, match="optimizer.optimizer_type"):
        OptimizerConfig(optimizer_type="Adam8").validate()


@pytest.mark.parametrize(
    "cfg, key",
    [
        (OptimizerConfig(learning_rate=-1), "optimizer.learning_rate"),
        (OptimizerConfig(betas=[0.9]), "optimizer.betas"),
        (OptimizerConfig(max_grad_norm=-1), "optimizer.max_grad_norm"),
        (SchedulerConfig(scheduler_type="constant", warmup_steps=10), "constant_with_warmup"),
        (SchedulerConfig(scheduler_type="linear", warmup_steps=10, warmup_ratio=0.1), "scheduler.warmup_ratio"),
        (SchedulerConfig(scheduler_type="cosine", min_lr_ratio=0.1), "scheduler.min_lr_ratio"),
        (SchedulerConfig(scheduler_type="cosine_restarts"), "scheduler.scheduler_type"),
    ],
)
def test_config_validation_names_the_key(cfg, key):
    OptimizerConfig().validate()
    SchedulerConfig().validate()
    with pytest.raises(ConfigError, match=key):
        cfg.validate()


def lr_after(cfg, total, steps):
    """The lr the optimizer uses for step `s` (0-based), for each s in steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_scheduler(opt, cfg, total)
    out, done = [], 0
    for s in sorted(steps):
        while done < s:
            opt.step()
            sched.step()
            done += 1
        out.append(opt.param_groups[0]["lr"] / 2.0)
    return out


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (SchedulerConfig(scheduler_type="constant"), [1, 1, 1, 1, 1]),
        (SchedulerConfig(scheduler_type="constant_with_warmup", warmup_steps=10), [0, 0.5, 1, 1, 1]),
        (SchedulerConfig(scheduler_type="linear", warmup_steps=10), [0, 0.5, 1, 1 - 45 / 90, 0]),
        (SchedulerConfig(scheduler_type="linear", warmup_ratio=0.1), [0, 0.5, 1, 0.5, 0]),
        (SchedulerConfig(scheduler_type="cosine", warmup_steps=10), [0, 0.5, 1, 0.5, 0]),
        (SchedulerConfig(scheduler_type="cosine_with_min_lr", warmup_steps=10, min_lr_ratio=0.1),
         [0, 0.5, 1, 0.1 + 0.9 * 0.5, 0.1]),
        (SchedulerConfig(scheduler_type="polynomial", warmup_steps=10, power=2.0, min_lr_ratio=0.2),
         [0, 0.5, 1, 0.2 + 0.8 * 0.25, 0.2]),
    ],
)
def test_schedule_values(cfg, expected):
    cfg.validate()
    got = lr_after(cfg, 100, [0, 5, 10, 55, 100])
    assert got == pytest.approx(expected, abs=1e-12)


def test_cosine_with_restarts_values():
    cfg = SchedulerConfig(scheduler_type="cosine_with_restarts", num_cycles=2)
    # no warmup, 100 steps, two cycles of 50: restart to 1 at step 50
    got = lr_after(cfg, 100, [0, 25, 49, 50, 75, 100])
    expected = [1, 0.5, 0.5 * (1 + math.cos(math.pi * 0.98)), 1, 0.5, 0]
    assert got == pytest.approx(expected, abs=1e-12)
    assert LRFactor("cosine", warmup=0, total=10)(20) == 0.0  # past the end it stays at the floor


def test_scheduler_rejects_warmup_longer_than_run():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="warmup"):
        build_scheduler(opt, SchedulerConfig(scheduler_type="linear", warmup_steps=100), 100)


def run(model, opt, sched, steps):
    for _ in range(steps):
        opt.zero_grad()
        quadratic(model).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("optimizer_type", ["AdamW", "AdamW8bit", "Prodigy"])
def test_state_round_trip_resumes_exactly(optimizer_type):
    ocfg = OptimizerConfig(optimizer_type=optimizer_type, learning_rate=0.5 if optimizer_type == "Prodigy" else 0.01)
    scfg = SchedulerConfig(scheduler_type="cosine_with_restarts", warmup_steps=2, num_cycles=2)
    straight = tiny_model()
    opt = build_optimizer(groups_of(straight, ocfg.learning_rate), ocfg)
    sched = build_scheduler(opt, scfg, 10)
    run(straight, opt, sched, 10)

    first = tiny_model()
    opt = build_optimizer(groups_of(first, ocfg.learning_rate), ocfg)
    sched = build_scheduler(opt, scfg, 10)
    run(first, opt, sched, 5)
    saved = {"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    assert saved["sched"]["lr_lambdas"][0]["kind"] == "cosine_with_restarts"

    resumed = tiny_model()
    resumed.load_state_dict(saved["model"])
    opt = build_optimizer(groups_of(resumed, ocfg.learning_rate), ocfg)
    sched = build_scheduler(opt, scfg, 10)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert sched.last_epoch == 5
    run(resumed, opt, sched, 5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
