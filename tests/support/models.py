"""The default CNN trained the same way for every test that needs a real trained model."""

from __future__ import annotations

import numpy as np
import torch


def train_default_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 2) -> torch.nn.Module:
    """The default CNN after plain SGD (lr 0.05, momentum 0.9, batch 32), seeded, in eval mode.

    Shared by the export tests, which need a real trained model (about 95% test accuracy on
    the default data) for parity and accuracy-drop checks to mean something.
    """
    from pollinate.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=tuple(x.shape[1:]), num_classes=10)
    xt = torch.from_numpy(np.array(x))
    yt = torch.from_numpy(np.array(y))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 32):
            idx = order[start : start + 32]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    return model
