"""refapp: the ClientApp (Flower's `opacus_fl/client_app.py`, Message API)."""

from __future__ import annotations

import logging
import warnings

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus import PrivacyEngine
from torch import nn

from refapp.task import config_value, load_data, make_model, train

warnings.filterwarnings("ignore", category=UserWarning)
# Opacus logs a warning for every empty Poisson batch; expected with 4 samples per client.
logging.getLogger("opacus").setLevel(logging.ERROR)

app = ClientApp()


def _device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _unwrap_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # The plain state_dict, even if Opacus wrapped the model (no `_module.` prefix).
    inner = getattr(model, "_module", model)
    assert isinstance(inner, nn.Module)
    return inner.state_dict()


@app.train()
def train_message(msg: Message, context: Context) -> Message:
    """Train a fresh copy of the received model with DP-SGD for one local epoch."""
    pid = int(context.node_config["partition-id"])
    train_loader = load_data(pid, int(context.node_config["num-partitions"]), context)
    device = _device()

    target_delta = float(config_value(context, "target-delta"))
    noise_multiplier = float(config_value(context, "noise-multiplier"))
    max_grad_norm = float(config_value(context, "max-grad-norm"))

    model = make_model(context).to(device)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict(), strict=True)

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=float(config_value(context, "learning-rate")),
        momentum=float(config_value(context, "momentum")),
    )

    privacy_engine = PrivacyEngine(secure_mode=False)
    private_model, optimizer, private_train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )

    train_loss, epsilon = train(
        private_model,
        private_train_loader,
        privacy_engine,
        optimizer,
        target_delta,
        device=device,
        epochs=1,
    )

    out_arrays = ArrayRecord(_unwrap_state_dict(private_model))
    out_metrics = MetricRecord(
        {
            "num-examples": len(train_loader.dataset),  # type: ignore[arg-type]
            "train-loss": train_loss,
            "epsilon": epsilon,
            "noise-multiplier": noise_multiplier,
        }
    )
    return Message(content=RecordDict({"arrays": out_arrays, "metrics": out_metrics}), reply_to=msg)
