"""The YAML configs in examples/configs/ through LightningCLI (examples/lenet_mnist_cli.py) on a tiny MNIST."""

import re
from functools import partial
from pathlib import Path

import pytest
import yaml
from torch import nn

pytest.importorskip("jsonargparse")

from helpers import write_tiny_mnist, zero_counts  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402

from examples.custom_methods import EveryOther  # noqa: E402
from examples.lenet_mnist_cli import main  # noqa: E402
from examples.mnist import LitLeNet, MNISTDataModule  # noqa: E402
from lightning_prune import PruningScheduleCallback  # noqa: E402
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("data"))


def run_cli(config: Path, data_dir: Path, out: Path, epochs: int, *extra: str, cli=main):
    """``lenet_mnist_cli.py fit --config <config>`` in quick mode: tiny data, 2 batches an epoch."""
    args = [
        "fit",
        f"--config={config}",
        f"--data.data_dir={data_dir}",
        "--data.quick=true",
        "--data.download=false",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]
    return cli(args)


def pruning_callbacks(cli):
    return [c for c in cli.trainer.callbacks if isinstance(c, PruningScheduleCallback)]


def test_cli_configs_cover_the_documented_uses():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "custom.yaml",
        "global.yaml",
        "gradual.yaml",
        "local.yaml",
    ]


@pytest.mark.parametrize(
    ("name", "epochs", "schedule_cls", "per_tensor"),
    [
        ("local", 2, OneShot, {"model.conv1.weight": 0.2, "model.conv2.weight": 0.2, "model.fc1.weight": 0.4}),
        ("global", 4, AtEpochs, None),
        ("custom", 1, OneShot, {"model.fc3.weight": 0.5}),
        ("gradual", 5, Polynomial, None),
    ],
)
def test_cli_config_builds_callback_with_configured_values(name, epochs, schedule_cls, per_tensor, data_dir, tmp_path):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["pruning"]
    cli = run_cli(CONFIGS / f"{name}.yaml", data_dir, tmp_path, epochs)
    (callback,) = pruning_callbacks(cli)
    assert callback.scope == config.get("scope", "local")
    assert callback.parameters == config.get("parameters")
    schedule = callback.schedule
    assert type(schedule) is schedule_cls
    for key, value in config["schedule"]["init_args"].items():
        assert getattr(schedule, key) == value, key
    if name == "custom":
        assert callback.method.cls is EveryOther and callback.method.kwargs == {"offset": 1}
        assert callback.sparsity is None
    else:
        assert callback.method.name == config["method"]
        assert callback.sparsity == config["sparsity"]
    report = zero_counts(cli.model, callback.parameters)
    if per_tensor is None:
        assert report.sparsity == pytest.approx(config["sparsity"], abs=1 / report.numel)
    else:
        measured = report.per_tensor()
        for tensor, target in per_tensor.items():
            assert measured[tensor] == pytest.approx(target, abs=1 / cli.model.get_parameter(tensor).numel())
    assert not any(n.endswith("_orig") for n, _ in cli.model.named_parameters())  # made permanent


def test_cli_accepts_callback_in_trainer_callbacks(data_dir, tmp_path):
    """A plain ``LightningCLI`` (no ``pruning:`` key) takes the callback as a ``trainer.callbacks`` entry."""
    config = tmp_path / "callbacks.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "lightning_prune.PruningScheduleCallback",
                            "init_args": {
                                "sparsity": {"model.fc*": 0.5},
                                "parameters": ["model.fc*.weight"],
                                "importance": "torch.square",
                            },
                        }
                    ]
                },
            }
        )
    )
    plain_cli = partial(LightningCLI, LitLeNet, MNISTDataModule, save_config_kwargs={"overwrite": True})
    cli = run_cli(config, data_dir, tmp_path, 1, cli=lambda args: plain_cli(args=args))
    (callback,) = pruning_callbacks(cli)
    assert callback.sparsity == {"model.fc*": 0.5}
    assert [t.name for t in callback.targets] == ["model.fc1.weight", "model.fc2.weight", "model.fc3.weight"]
    assert zero_counts(cli.model, ["model.fc*.weight"]).sparsity == pytest.approx(0.5, abs=1e-4)


def test_cli_with_zero_sparsity_trains_dense(data_dir, tmp_path):
    config = tmp_path / "dense.yaml"
    config.write_text(yaml.safe_dump({"pruning": {"sparsity": 0.0}}))
    cli = run_cli(config, data_dir, tmp_path, 1)
    (callback,) = pruning_callbacks(cli)
    assert callback.sparsity == 0.0
    assert zero_counts(cli.model).zeros == 0


# The same bad value, in YAML (through LightningCLI) and in Python: the same message.
BAD = [
    ({"sparsity": 1.5}, {"sparsity": 1.5}, "`sparsity` must be in [0, 1), got 1.5."),
    (
        {"sparsity": {"Conv2d": 1.5}},
        {"sparsity": {nn.Conv2d: 1.5}},
        "`sparsity['Conv2d']` must be in [0, 1), got 1.5.",
    ),
    (
        {"sparsity": {"Conv3d": 0.5}},
        {"sparsity": {"Conv3d": 0.5}},
        "`sparsity` key 'Conv3d' matches no chosen parameter of the model.",
    ),
    (
        {"sparsity": {"Linear": 0.5}, "scope": "global"},
        {"sparsity": {nn.Linear: 0.5}, "scope": "global"},
        "A per-layer `sparsity` mapping needs `scope='local'`; global scope takes one target.",
    ),
    (
        {"sparsity": 0.5, "parameters": ["model.fc9.weight"]},
        {"sparsity": 0.5, "parameters": ["model.fc9.weight"]},
        "`parameters` entry 'model.fc9.weight' matches no parameter of the model",
    ),
    (
        {"sparsity": 0.5, "method_kwargs": {"n": 1}},
        {"sparsity": 0.5, "method_kwargs": {"n": 1}},
        "`method_kwargs` for 'l1_unstructured' may hold nothing, got ['n'].",
    ),
    (
        {
            "sparsity": 0.5,
            "schedule": {
                "class_path": "lightning_prune.schedules.Polynomial",
                "init_args": {"start_epoch": 5, "end_epoch": 2},
            },
        },
        {"sparsity": 0.5, "schedule": lambda: Polynomial(start_epoch=5, end_epoch=2)},
        "`start_epoch` must be before `end_epoch`, got start_epoch=5, end_epoch=2.",
    ),
    (
        {"sparsity": 0.5, "method": "examples.custom_methods.EveryOther"},
        {"sparsity": 0.5, "method": EveryOther},
        "`sparsity` has no effect with `method=EveryOther`, whose constructor takes no `amount`; leave it out",
    ),
]


@pytest.mark.parametrize(("in_yaml", "in_python", "message"), BAD)
def test_cli_bad_yaml_value_gives_same_error_as_python(in_yaml, in_python, message, data_dir, tmp_path, capsys):
    from helpers import TinyModule, fit

    with pytest.raises(ValueError, match=re.escape(message)):
        kwargs = {k: v() if k == "schedule" else v for k, v in in_python.items()}
        fit(PruningScheduleCallback(verbose=False, **kwargs), max_epochs=1, module=TinyModule())  # same names

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"pruning": in_yaml}))
    try:
        run_cli(config, data_dir, tmp_path, 1)
    except ValueError as err:  # raised by the callback, as in Python
        assert message in str(err)
    except SystemExit as err:  # rejected while parsing: the callback's own message is in the parser's report
        assert err.code != 0
        assert message in capsys.readouterr().err
    else:
        pytest.fail("the bad YAML value was accepted")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("scope", "globl", ["local", "global"]),
        ("method", "l2_unstructured", ["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"]),
    ],
)
def test_cli_bad_choice_names_key_allowed_values_and_given(key, value, allowed, data_dir, tmp_path, capsys):
    """A value outside a ``Literal`` is rejected by the parser, before anything is built, with a message that
    names what the Python error names: the argument, the allowed values and the value given."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"pruning": {"sparsity": 0.5, key: value}}))
    with pytest.raises(SystemExit):
        run_cli(config, data_dir, tmp_path, 1)
    from_yaml = capsys.readouterr().err
    with pytest.raises(ValueError, match=rf"`{key}` must be one of .*got '{value}'") as from_python:
        PruningScheduleCallback(sparsity=0.5, **{key: value})
    assert f'"pruning.{key}"' in from_yaml and value in from_yaml
    for name in allowed:
        assert repr(name) in from_yaml and repr(name) in str(from_python.value)
