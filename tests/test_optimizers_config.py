"""The optimizer registry and the config object."""
import pytest
import torch

from hf_ame import AMEConfig, ConfigError, ame_merge, build_optimizer, get_optimizer, list_optimizers, register_optimizer
from hf_ame.optimizers import OptimizerArgumentError, UnknownOptimizerError, _REGISTRY


class Lion(torch.optim.Optimizer):
    """A small Lion (Chen et al. 2023): sign of an interpolated momentum."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def test_builtins_are_torch_optimizers():
    names = {e.name for e in list_optimizers()}
    assert {"sgd", "adam", "adamw", "adagrad", "adadelta", "rmsprop", "adamax", "nadam", "radam"} <= names
    assert get_optimizer("GD").cls is torch.optim.SGD
    assert get_optimizer("adamw").cls is torch.optim.AdamW
    assert get_optimizer("adam").defaults()["betas"] == (0.9, 0.999)


def test_register_a_user_optimizer_and_merge_with_it():
    try:
        register_optimizer("lion", Lion)
        assert get_optimizer("Lion").cls is Lion
        xs = [torch.full((3,), float(i)) for i in range(4)]
        out = ame_merge(xs, AMEConfig(optimizer="lion", lr=0.01, lr_schedule="constant", shuffle=False, pivot="first"))
        # sign updates: the first step (x_1 = w_0) has g = 0; the next three move w up by lr each
        assert torch.allclose(out, torch.full((3,), 0.03))
        with pytest.raises(ValueError, match="already registered"):
            register_optimizer("lion", Lion)
        with pytest.raises(ConfigError, match=r"optimizer_kwargs.betas: lion rejected"):
            AMEConfig(optimizer="lion", optimizer_kwargs={"betas": (1.5, 0.9)}).validate()
    finally:
        _REGISTRY.pop("lion", None)
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        register_optimizer("notopt", dict)


def test_unknown_optimizer_lists_the_available_ones():
    with pytest.raises(UnknownOptimizerError) as info:
        get_optimizer("adamz")
    msg = str(info.value)
    assert "adamz" in msg and "adamw" in msg and "sgd" in msg and "radam" in msg
    with pytest.raises(ConfigError, match="^optimizer: unknown optimizer 'adamz'"):
        AMEConfig(optimizer="adamz").validate()


@pytest.mark.parametrize(
    "kwargs,field",
    [({"betas": (0.9, 1.5)}, "betas"), ({"eps": -1.0}, "eps"), ({"weight_decay": -0.1}, "weight_decay"),
     ({"nonsense": 1}, "nonsense")],
)
def test_bad_optimizer_kwargs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^optimizer_kwargs\.{field}:"):
        AMEConfig(optimizer="adamw", optimizer_kwargs=kwargs).validate()
    with pytest.raises(OptimizerArgumentError, match=rf"optimizer_kwargs\.{field}"):
        build_optimizer("adamw", [torch.zeros(1)], lr=0.1, kwargs=kwargs)


@pytest.mark.parametrize(
    "field,value,message",
    [("lr", "fast", r"^lr: expected a positive number, got 'fast'"), ("lr", 0, "^lr:"), ("lr", float("nan"), "^lr:"),
     ("epochs", 0, "^epochs: expected an integer >= 1"), ("epochs", 1.5, "^epochs:"), ("batch_size", 0, "^batch_size:"),
     ("lr_schedule", "cosine", "^lr_schedule: expected one of constant, harmonic, power"),
     ("shuffle", "yes", "^shuffle:"), ("seed", "x", "^seed:"), ("pivot", 1.5, "^pivot:"),
     ("amplification", "quadratic", "^amplification:"), ("compute_dtype", "int8", "^compute_dtype:")],
)
def test_bad_hyperparameters_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        AMEConfig(**{field: value}).validate()


def amp_fn(t: int) -> float:
    return 0.5 * t


def test_config_round_trips_through_a_plain_dict():
    import yaml

    cfg = AMEConfig(optimizer="adagrad", lr=0.02, lr_schedule="power", lr_power=-0.7, epochs=5, batch_size=3,
                    shuffle=False, seed=9, pivot=2, adaptive_pivot=False, amplification=amp_fn,
                    optimizer_kwargs={"eps": 1e-8, "lr_decay": 0.0}, compute_dtype="float64")
    d = cfg.to_dict()
    assert d["amplification"] == f"{__name__}:amp_fn"
    again = AMEConfig.from_dict(yaml.safe_load(yaml.safe_dump(d)))
    assert again.to_dict() == d
    assert again.amplification is amp_fn
    betas = AMEConfig(optimizer_kwargs={"betas": (0.8, 0.9)})
    assert AMEConfig.from_dict(yaml.safe_load(yaml.safe_dump(betas.to_dict()))).optimizer_arguments()["betas"] == (0.8, 0.9)
    with pytest.raises(ConfigError, match="^merge.learning_rate: unknown field"):
        AMEConfig.from_dict({"learning_rate": 1}, prefix="merge.")
    with pytest.raises(ConfigError, match="lambda"):
        AMEConfig(amplification=lambda t: 1.0).to_dict()


def test_soup_preset():
    cfg = AMEConfig.soup()
    assert (cfg.optimizer, cfg.lr, cfg.lr_schedule, cfg.adaptive_pivot) == ("sgd", 1.0, "constant", False)
