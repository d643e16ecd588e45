"""Models and data loaders by import path: how they are called, every way the path can be
wrong, the checks before training (DP-SGD compatibility, output shape), and the device that
refuses to import code its owner did not allow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.common import MessageType
from opacus.validators import ModuleValidator

from pollinate.clientapp.app import app
from pollinate.config import RunSettings
from pollinate.data import load_dataset
from pollinate.errors import ConfigError, DataError
from pollinate.models import (
    MODELS,
    build_model,
    check_dp_compatible,
    check_output,
    checked_model,
    dp_problems,
    model_label,
    register_model,
)
from pollinate.models.compat import PLAIN_LAYERS
from pollinate.serverapp.calibration import client_config
from tests.support.messages import set_identity

USER_MODELS = '''
import os
import torch
from torch import nn

MARKER = os.environ.get("PLUGIN_MARKER")
if MARKER:  # importing this module is running its code: the test can see whether it ran
    with open(MARKER, "a") as f:
        f.write("imported\\n")


class Net(nn.Module):
    """Flower's template style: no arguments, 8x8 digits, 10 classes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Sized(nn.Module):
    def __init__(self, input_shape, num_outputs, hidden=16):
        super().__init__()
        n = 1
        for d in input_shape:
            n *= d
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_outputs))

    def forward(self, x):
        return self.net(x)


def make(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1] * input_shape[-2], num_classes))


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


class Five(Net):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 5)


class NeedsDepth(nn.Module):
    def __init__(self, depth):
        super().__init__()


def not_a_model():
    return {"weights": 1}


def broken():
    raise RuntimeError("no GPU here")


VALUE = 3
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``usermodels`` (the module above) and two broken ones importable from ``tmp_path``."""
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(USER_MODELS))
    (tmp_path / "needs_dep.py").write_text("import surely_not_installed_xyz\n")
    (tmp_path / "raises_on_import.py").write_text("raise ValueError('bad config file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("usermodels", "needs_dep", "raises_on_import"):
        sys.modules.pop(name, None)


def test_a_class_without_arguments_a_sized_class_and_a_factory_all_build(
    user_module: Path,
) -> None:
    net = build_model("usermodels:Net", input_shape=(1, 8, 8), num_classes=10)
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    sized = build_model("usermodels:Sized", input_shape=(13,), num_classes=3)
    assert sized(torch.zeros(4, 13)).shape == (4, 3)  # got input_shape and num_outputs
    made = build_model("usermodels:make", input_shape=(1, 8, 8), num_classes=7)
    assert made(torch.zeros(2, 1, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchmodule:Net", "no module named 'nosuchmodule' on the Python path"),
        ("usermodels.sub:Net", "no module named 'usermodels.sub'"),
        ("needs_dep:Net", "it needs 'surely_not_installed_xyz', which is not installed"),
        ("raises_on_import:Net", "importing 'raises_on_import' failed: ValueError: bad config"),
        ("usermodels:Missing", "'usermodels' has no attribute 'Missing'"),
        ("usermodels:Net.inner", "'usermodels.Net' has no attribute 'inner'"),
        ("usermodels:VALUE", "is a int, not an nn.Module class or a factory"),
        ("usermodels:NeedsDepth", "needs argument 'depth', which pollinate cannot give"),
        ("usermodels:not_a_model", "returned an object of type dict, not a torch.nn.Module"),
        ("usermodels:broken", "building it failed: RuntimeError: no GPU here"),
        ("user models:Net", "is not an import path; write it as 'package.module:Name'"),
        (
            "vgg",
            "unknown model 'vgg'; choose one of: cnn, lstm, mlp, opacus-mnist, resnet, scatnet, or",
        ),
    ],
)
def test_each_way_a_model_spec_is_wrong_has_its_own_message(
    user_module: Path, spec: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(spec, input_shape=(1, 8, 8), num_classes=10)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_built_in_models_register_through_the_same_plug_in_point() -> None:
    assert {"cnn", "mlp", "opacus-mnist"} <= set(MODELS)

    @register_model("tiny-test-model")
    def tiny(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))

    try:
        assert build_model("tiny-test-model", input_shape=(1, 8, 8))(torch.zeros(1, 64)).shape == (
            1,
            10,
        )
        with pytest.raises(ValueError, match="already registered"):
            register_model("tiny-test-model")(lambda: torch.nn.Linear(1, 1))
        with pytest.raises(ValueError, match="without ':'"):
            register_model("pkg:name")
    finally:
        MODELS.pop("tiny-test-model")


def test_a_batchnorm_model_is_refused_by_layer_name_and_fixed_on_request(
    user_module: Path,
) -> None:
    model = build_model("usermodels:WithBatchNorm", input_shape=(1, 8, 8))
    problems = dp_problems(model)
    assert len(problems) == 1 and problems[0].startswith("norm (BatchNorm2d): BatchNorm cannot")
    # Opacus' own validator agrees there is something to fix
    assert ModuleValidator.validate(model, strict=False) != []
    with pytest.raises(ConfigError, match=r"'usermodels:WithBatchNorm'.*norm \(BatchNorm2d\)"):
        check_dp_compatible(model, "usermodels:WithBatchNorm")
    with pytest.raises(ConfigError, match="--fix-model"):
        checked_model("usermodels:WithBatchNorm", (1, 8, 8), 10, fix=False, dp=True)
    # without DP-SGD there is nothing to refuse
    checked_model("usermodels:WithBatchNorm", (1, 8, 8), 10, fix=False, dp=False)
    fixed = checked_model("usermodels:WithBatchNorm", (1, 8, 8), 10, fix=True, dp=True)
    assert isinstance(fixed.norm, torch.nn.GroupNorm)
    assert ModuleValidator.validate(fixed, strict=False) == []
    assert dp_problems(build_model("cnn")) == []


def test_plain_layers_need_no_opacus_validator() -> None:
    """The layers whose check skips importing Opacus are exactly ones Opacus never refuses."""
    assert not PLAIN_LAYERS & set(ModuleValidator.VALIDATORS)


def test_checking_a_plain_model_does_not_import_opacus_but_a_batchnorm_one_still_fails() -> None:
    code = (
        "import sys, torch\n"
        "from pollinate.models import build_model, dp_problems\n"
        "plain = [dp_problems(build_model(m, input_shape=(1, 28, 28)))\n"
        "         for m in ('cnn', 'opacus-mnist', 'mlp')]\n"
        "loaded = any(m.startswith('opacus') for m in sys.modules)\n"
        "bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))\n"
        "print(plain, loaded, dp_problems(bn))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("[[], [], []] False ['1 (BatchNorm2d): BatchNorm cannot"), last


class Seq(torch.nn.Module):
    """Rows of an 8x8 image as a sequence of 8 steps, through an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], 8, 8))
        return self.head(out[:, -1])  # type: ignore[no-any-return]


def test_an_lstm_is_refused_and_fixed_into_opacus_dp_lstm() -> None:
    assert dp_problems(Seq())[0].startswith("rnn (LSTM):")
    fixed = ModuleValidator.fix(Seq())
    assert dp_problems(fixed) == []
    check_output(fixed, "seq", (1, 8, 8), 10)


def test_a_model_whose_outputs_do_not_fit_the_task_is_refused(user_module: Path) -> None:
    five = build_model("usermodels:Five", input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"returns shape \(2, 5\) for a batch of 2; .*\(2, 10\)"):
        check_output(five, "usermodels:Five", (1, 8, 8), 10)
    net = build_model("usermodels:Net")
    with pytest.raises(ConfigError, match=r"fails on a batch of shape \(2, 13\)"):
        check_output(net, "usermodels:Net", (13,), 10)


def test_model_label_is_a_safe_file_name() -> None:
    assert model_label("cnn") == "cnn"
    assert model_label("my_pkg.models:TinyNet") == "tinynet"
    assert model_label("pkg:Outer.Inner") == "inner"


def test_run_settings_accept_an_import_path_and_say_how_when_a_name_is_unknown() -> None:
    assert RunSettings.from_run_config({"model": "pkg.mod:Net"}).model == "pkg.mod:Net"
    with pytest.raises(ConfigError, match="or give an import path"):
        RunSettings.from_run_config({"model": "vgg"})


# ------------------------------------------------------------------ the device's side
NODE = 91


def _train_message(tmp: Path, model: str) -> Message:
    settings = RunSettings.from_run_config({"dataset": "digits", "model": model, "dp": "sample"})
    data = load_dataset("digits", seed=settings.seed)
    net = build_model(model, input_shape=data.input_shape, num_classes=data.num_classes)
    arrays = ArrayRecord(
        OrderedDict((k, Array(v.detach().numpy().copy())) for k, v in net.state_dict().items())
    )
    cfg = client_config(settings, data, population=4, noise=1.0, run_dir=tmp)
    cfg["server-round"] = 1
    set_identity()
    msg = Message(
        RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=NODE,
        message_type=MessageType.TRAIN,
    )  # fmt: skip
    set_identity(NODE)
    return msg


def test_a_device_never_imports_a_model_its_owner_did_not_allow(
    user_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The curious server asks a device to build ``usermodels:Net``: a module on the device's
    path whose import runs code. The device refuses before importing anything; only with the
    owner's ``--allow-import`` does it import the module and train."""
    rng = np.random.default_rng(0)
    data = user_module / "mine.npz"
    np.savez(data, x=rng.integers(0, 16, size=(20, 8, 8)), y=np.arange(20) % 10)
    msg = _train_message(user_module, "usermodels:Net")  # the server side builds it here
    sys.modules.pop("usermodels", None)  # ... and the device is another process
    marker = user_module / "imported.txt"
    monkeypatch.setenv("PLUGIN_MARKER", str(marker))

    def context(**node: str) -> Context:
        return Context(
            run_id=1, node_id=NODE, node_config={"data-path": str(data), **node},
            state=RecordDict(), run_config={},
        )  # fmt: skip

    refused = app(msg, context())
    metrics = refused.content.metric_records["metrics"]
    reason = str(refused.content.config_records["info"]["refused"])
    assert metrics["refused"] == 1 and "arrays" not in refused.content.array_records
    assert "usermodels:Net" in reason and "--allow-import usermodels:Net" in reason
    assert not marker.exists() and "usermodels" not in sys.modules, "the module was imported"
    other = app(msg, context(**{"allowed-imports": "usermodels:Sized"}))
    assert other.content.metric_records["metrics"]["refused"] == 1 and not marker.exists()

    allowed = app(msg, context(**{"allowed-imports": "usermodels:Sized,usermodels:Net"}))
    assert not allowed.has_error()
    assert allowed.content.metric_records["metrics"]["declined"] == 0
    assert "arrays" in allowed.content.array_records and marker.exists()


# ------------------------------------------------------------------ data loaders
USER_DATA = """
import numpy as np
import torch
from torch.utils.data import TensorDataset

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 6)).astype(np.float64)
Y = np.arange(40) % 4


def pair():
    return X, Y


def mapping():
    return {"x": torch.from_numpy(X), "y": torch.from_numpy(Y)}


def dataset():
    return TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))


CALLS = []


def per_partition(partition_id, num_partitions):
    CALLS.append(partition_id)
    rows = np.arange(40)[partition_id::num_partitions]  # a client's own slice
    return X[rows], Y[rows]


def many(partition_id, num_partitions):
    # a population of any size: 4 samples a client, one of each class, made from its id
    CALLS.append(partition_id)
    rng = np.random.default_rng(partition_id)
    return rng.normal(size=(4, 6)), np.arange(4)


def flower_template(partition_id, num_partitions):
    # as `flwr new` writes it: (trainloader, testloader) of the partition
    from torch.utils.data import DataLoader

    x, y = per_partition(partition_id, num_partitions)
    half = len(y) // 2
    def make(a, b):
        return DataLoader(TensorDataset(torch.from_numpy(a), torch.from_numpy(b)))

    return make(x[:half], y[:half]), make(x[half:], y[half:])


def regression():
    return X, X[:, 0] * 3.5


def with_nan():
    x = X.copy()
    x[3, 2] = np.nan
    return x, Y


def mismatched():
    return X, Y[:10]


def fails():
    raise OSError("the share is not mounted")


def scalar():
    return 3
"""


@pytest.fixture
def user_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "userdata.py").write_text(textwrap.dedent(USER_DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("userdata", None)


@pytest.mark.parametrize("loader", ["pair", "mapping", "dataset"])
def test_a_loader_returning_arrays_a_mapping_or_a_dataset_is_split_like_a_built_in(
    user_data: Path, loader: str
) -> None:
    split = load_dataset(f"userdata:{loader}", test_fraction=0.25, seed=3)
    assert split.input_shape == (6,) and split.num_classes == 4
    assert len(split.train) == 30 and len(split.test) == 10
    assert split.train.x.dtype == np.float32 and split.train.y.dtype == np.int64
    # stratified as a built-in is: every class in the test part
    assert sorted(set(split.test.y.tolist())) == [0, 1, 2, 3]
    # the samples are the loader's, unchanged but for the dtype
    from userdata import X  # type: ignore[import-not-found]

    rows = {tuple(np.round(r, 5)) for r in X.astype(np.float32)}
    assert all(tuple(np.round(r, 5)) in rows for r in split.train.x)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("userdata:per_partition", ConfigError, "needs the number of clients"),
        ("userdata:with_nan", DataError, "NaN or infinite"),
        ("userdata:mismatched", DataError, "40 samples but 10 labels"),
        ("userdata:fails", DataError, "the loader failed: OSError: the share is not mounted"),
        ("userdata:scalar", DataError, "returned a int; return (x, y) arrays"),
        ("userdata:X", ConfigError, "is a ndarray, not a loader function"),
        ("nodata:load", ConfigError, "no module named 'nodata'"),
    ],
)
def test_each_way_a_loader_is_wrong_has_its_own_message(
    user_data: Path, spec: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        load_dataset(spec, seed=0)
    assert message in str(info.value) and spec in str(info.value)


def test_a_device_never_imports_a_data_loader_its_owner_did_not_allow(
    user_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for models: the task names ``userdata:pair`` for a device training on a partition."""
    msg = _train_message(user_data, "cnn")
    cfg = msg.content.config_records["config"]
    cfg["dataset"] = "userdata:pair"
    sys.modules.pop("userdata", None)
    node = {"state-dir": str(user_data / "device"), "partition-id": 0, "num-partitions": 4}
    ctx = Context(run_id=1, node_id=NODE, node_config=node, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    reason = str(reply.content.config_records["info"]["refused"])
    assert "data 'userdata:pair'" in reason and "--allow-import userdata:pair" in reason
    assert "userdata" not in sys.modules
    # a device training on its own data never uses the task's loader: nothing to refuse
    rng = np.random.default_rng(1)
    own = user_data / "own.npz"
    np.savez(own, x=rng.integers(0, 16, size=(20, 8, 8)), y=np.arange(20) % 10)
    ctx = Context(run_id=1, node_id=NODE, node_config={"data-path": str(own)},
                  state=RecordDict(), run_config={})  # fmt: skip
    trained = app(msg, ctx)
    assert trained.content.metric_records["metrics"]["declined"] == 0
    assert "arrays" in trained.content.array_records and "userdata" not in sys.modules


@pytest.mark.parametrize("loader", ["per_partition", "flower_template"])
def test_a_per_partition_loader_gives_each_client_its_own_share(
    user_data: Path, loader: str
) -> None:
    """The server loads every share and evaluates on their test parts; a client loads only its
    own share and trains on exactly the part the server counts as its train part."""
    from pollinate.data import load_partition

    spec = f"userdata:{loader}"
    split = load_dataset(spec, test_fraction=0.25, seed=3, num_partitions=4)
    assert split.partitions is not None and len(split.partitions) == 4
    assert len(split.train) + len(split.test) == 40 and len(split.test) == 4 * 2  # 10 each: 2
    import userdata  # type: ignore[import-not-found]

    for p in range(4):
        userdata.CALLS.clear()
        own = load_partition(spec, p, 4, "iid", seed=3, test_fraction=0.25, task="auto")
        assert [p] == userdata.CALLS  # its own share only
        server_view = split.train.subset(split.partitions[p])
        assert np.array_equal(own.x, server_view.x) and np.array_equal(own.y, server_view.y)
        # every sample of the share is from the client's own slice of X
        own_rows = {tuple(r) for r in userdata.X[p::4].astype(np.float32)}
        assert all(tuple(r) in own_rows for r in own.x)
    # no test sample is anybody's training sample
    train_rows = {tuple(r) for r in split.train.x}
    assert not any(tuple(r) in train_rows for r in split.test.x)


def test_a_million_client_loader_costs_the_server_a_sample_of_shares(user_data: Path) -> None:
    """Past SERVER_SHARES clients the server reads a seeded sample of the shares (its test
    set is theirs, split as each client splits its own); a client still loads its own."""
    import userdata  # type: ignore[import-not-found]

    from pollinate.data import load_partition
    from pollinate.data._datasets import SERVER_SHARES

    userdata.CALLS.clear()
    n = 1_000_000
    split = load_dataset("userdata:many", test_fraction=0.25, seed=3, num_partitions=n)
    ids = split.partition_ids
    assert ids is not None and len(ids) == SERVER_SHARES == len(userdata.CALLS)
    assert sorted(userdata.CALLS) == list(ids) and len(set(ids)) == len(ids)
    assert max(ids) > n // 2  # drawn from the whole population, not its first ids
    again = load_dataset("userdata:many", test_fraction=0.25, seed=4, num_partitions=n)
    assert again.partition_ids != ids  # the seed picks the sample
    # the server's parts are exactly the sampled clients' own train and test parts
    assert split.partitions is not None and len(split.partitions) == SERVER_SHARES
    test_rows = []
    for i in (0, 1, SERVER_SHARES - 1):
        userdata.CALLS.clear()
        own = load_partition("userdata:many", ids[i], n, "iid", seed=3, test_fraction=0.25,
                             task="auto")  # fmt: skip
        assert [ids[i]] == userdata.CALLS
        server_view = split.train.subset(split.partitions[i])
        assert np.array_equal(own.x, server_view.x) and np.array_equal(own.y, server_view.y)
        x, _ = userdata.many(ids[i], n)
        own_rows = {tuple(r) for r in own.x}
        test_rows += [r for r in x.astype(np.float32) if tuple(r) not in own_rows]
    held = {tuple(r) for r in split.test.x}
    assert len(split.test) == SERVER_SHARES and all(tuple(r) in held for r in test_rows)
    small = load_dataset("userdata:many", test_fraction=0.25, seed=3, num_partitions=SERVER_SHARES)
    assert small.partition_ids is None and len(small.partitions or ()) == SERVER_SHARES


def test_a_device_never_imports_a_loss_hook_its_owner_did_not_allow(
    user_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss runs inside the device's training: a server naming ``userloss:evil`` (a module
    whose import writes a file) is refused before the import, and the device's data stay put."""
    (user_module / "userloss.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['LOSS_MARKER']).write_text('ran')\n"
        "def evil(outputs, targets):\n"
        "    return (outputs[:, 0] * 0).abs()\n"
    )
    marker = user_module / "loss-imported.txt"
    monkeypatch.setenv("LOSS_MARKER", str(marker))
    rng = np.random.default_rng(0)
    data = user_module / "mine.npz"
    np.savez(data, x=rng.integers(0, 16, size=(20, 8, 8)), y=np.arange(20) % 10)
    msg = _train_message(user_module, "cnn")
    msg.content.config_records["config"]["loss"] = "userloss:evil"
    context = Context(
        run_id=1, node_id=NODE, node_config={"data-path": str(data)}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    refused = app(msg, context)
    reason = str(refused.content.config_records["info"]["refused"])
    assert refused.content.metric_records["metrics"]["refused"] == 1
    assert "loss 'userloss:evil'" in reason and "--allow-import userloss:evil" in reason
    assert not marker.exists() and "userloss" not in sys.modules, "the hook was imported"
    sys.modules.pop("userloss", None)


def test_federated_evaluation_of_a_regression_under_dp_sgd_is_refused_up_front(
    user_data: Path,
) -> None:
    data = load_dataset("userdata:regression", seed=0)
    assert data.task.kind.value == "regression"
    private = RunSettings.from_run_config({"fraction-evaluate": 0.5, "dp": "sample"})
    with pytest.raises(ConfigError, match="no bound to noise it by; set fraction-evaluate = 0"):
        private.learning_task(data)
    plain = RunSettings.from_run_config({"fraction-evaluate": 0.5, "dp": "none"})
    assert plain.learning_task(data).num_outputs == 1
