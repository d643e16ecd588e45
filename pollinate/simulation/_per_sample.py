"""Per-sample gradients by plain autograd, for models built of Linear, Conv2d and GroupNorm
layers.

For the step where every member of a cohort still holds the global model (each client's
first local step, which is every step of a one-step round), the per-sample gradients of all
members' samples are those of one batch through one model. For a Linear or Conv2d layer a
sample's weight gradient is the product of the gradient at the layer's output and the layer's
input (unfolded for a convolution), the way Opacus' grad samplers compute it: one forward and
one backward of the batch, to the layers' outputs only, then one batched product per layer.
A GroupNorm's per-sample gradients are its output gradient summed over positions, times the
normalized input for the weight (Opacus' GroupNorm grad sampler). For DP-SGD the clipped
sums per member come out of the same pass (:meth:`clipped_sums`), and without DP each
member's mean gradient (``weights``), neither forming more per-sample gradients than the
norms need.

No ``torch.func``: its first gradient imports torch's compiler stack (dynamo, sympy; about a
second and 70 MB here), which a model of these layers never needs. On the Opacus MNIST CNN
this also beats ``vmap(grad)`` (21-27 ms for the clipped sums of 400 samples against 33 ms for
``vmap(grad)``'s per-sample gradients alone in its faster layout, 2 cores); on a model
with large unfolded inputs it would not, and a model with any other layer that holds
parameters (other normalizations, embedding, recurrent) keeps the ``vmap`` path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional

__all__ = ["HookedPerSample", "hookable"]

Formed = tuple[torch.Tensor, torch.Tensor]  # per-sample weight and bias gradients
#: what one pass captures: outer-product layers' (layer, output gradients, inputs) rows,
#: GroupNorms' (layer, per-sample weight, per-sample bias) gradients, losses, outputs
Captured = tuple[
    list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
    list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
    torch.Tensor,
    torch.Tensor,
]


def _conv_ok(layer: nn.Conv2d) -> bool:
    return (
        layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    )


def _covered(module: nn.Module) -> bool:
    kind = type(module)
    return (
        kind is nn.Linear
        or (kind is nn.Conv2d and _conv_ok(cast(nn.Conv2d, module)))
        or (kind is nn.GroupNorm and cast(nn.GroupNorm, module).affine)
    )


def hookable(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` belongs to a Linear, a plain Conv2d (zero
    padding given in numbers, one group) or a GroupNorm layer, so :class:`HookedPerSample`
    covers it."""
    owners = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if _covered(module):
            owners += len(own)
            continue
        return False
    return owners == len(list(model.parameters()))


class HookedPerSample:
    """``(x, y) -> (per-sample grads by parameter name, losses, outputs)`` for ``model``'s
    current parameters, ``loss`` giving one loss per sample."""

    def __init__(
        self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        self._model = model
        self._loss = loss
        self._layers = [m for m in model.modules() if _covered(m)]
        names = {id(p): k for k, p in model.named_parameters()}
        self._names = {
            id(m): (names[id(m.weight)], names[id(m.bias)] if m.bias is not None else None)
            for m in self._layers
        }

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> Captured:
        """One forward and one backward (to the layers' outputs): per Linear or Conv2d layer
        its (samples, positions, out) output gradients and (samples, positions, in) inputs,
        unfolded for a convolution; per GroupNorm its per-sample weight and bias gradients,
        (samples, channels) each; the per-sample losses and the outputs."""
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}

        def keep(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if id(module) in outputs:
                raise RuntimeError(f"layer {type(module).__name__} is called twice per sample")
            inputs[id(module)] = args[0].detach()
            outputs[id(module)] = out

        handles = [layer.register_forward_hook(keep) for layer in self._layers]
        try:
            out = self._model(x)
        finally:
            for handle in handles:
                handle.remove()
        losses = self._loss(out, y)
        used = [layer for layer in self._layers if id(layer) in outputs]
        if len(used) != len(self._layers):
            raise RuntimeError("a layer with parameters is not called in the forward pass")
        grads_out = torch.autograd.grad(losses.sum(), [outputs[id(m)] for m in used])
        n = len(x)
        rows: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        normed: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        for layer, g in zip(used, grads_out, strict=True):
            a = inputs[id(layer)]
            if isinstance(layer, nn.GroupNorm):  # Opacus' GroupNorm grad sampler
                unit = functional.group_norm(a, layer.num_groups, eps=layer.eps)
                channels = a.shape[1]
                weight = (unit * g).reshape(n, channels, -1).sum(2)
                normed.append((layer, weight, g.reshape(n, channels, -1).sum(2)))
            elif isinstance(layer, nn.Conv2d):
                # (n, positions, out) and (n, positions, in * kh * kw): channels-last views
                rows.append((layer, g.permute(0, 2, 3, 1).flatten(1, 2), _patches(a, layer)))
            else:  # Linear, on (n, in) or (n, ..., in)
                rows.append((layer, g.reshape(n, -1, g.shape[-1]), a.reshape(n, -1, a.shape[-1])))
        return rows, normed, losses.detach(), cast(torch.Tensor, out).detach()

    def _put(
        self, grads: dict[str, torch.Tensor], layer: nn.Module, weight: torch.Tensor,
        bias: torch.Tensor,
    ) -> None:  # fmt: skip
        weight_name, bias_name = self._names[id(layer)]
        grads[weight_name] = weight.reshape(len(weight), *cast(nn.Linear, layer).weight.shape)
        if bias_name is not None:
            grads[bias_name] = bias

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-sample gradients of samples ``x`` (targets ``y``), their losses and outputs.

        With ``weights`` of shape (groups, per group), the samples taken as consecutive groups:
        each group's weighted sum of its samples' gradients instead (leading dim: groups),
        made without the per-sample gradients."""
        rows, normed, losses, out = self._capture(x, y)
        n = len(x)
        groups = n if weights is None else weights.shape[0]
        grads: dict[str, torch.Tensor] = {}
        for layer, weight, bias in normed:
            if weights is not None:
                weight, bias = (
                    (t * weights.reshape(n, 1)).reshape(groups, -1, t.shape[1]).sum(1)
                    for t in (weight, bias)
                )
            self._put(grads, layer, weight, bias)
        for layer, g_rows, a_rows in rows:
            if weights is not None:
                g_rows = g_rows * weights.reshape(n, 1, 1)
            # one group's rows (its samples' positions) side by side: (groups, rows, features)
            g_group = g_rows.reshape(groups, -1, g_rows.shape[-1])
            a_group = a_rows.reshape(groups, -1, a_rows.shape[-1])
            self._put(grads, layer, torch.bmm(g_group.transpose(1, 2), a_group), g_group.sum(1))
        return grads, losses, out

    def clipped_sums(
        self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, max_norm: float
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """DP-SGD's clipped sums: samples ``x`` taken as consecutive groups of ``valid``'s
        shape (groups, per group; False: a padded slot, left out), each sample's gradient
        clipped to ``max_norm`` with Opacus' factor ``min(1, C / (norm + 1e-6))``, summed per
        group. A layer whose per-sample gradient would be larger than its positions squared
        never forms it: the norm of ``sum_p g_p a_p^T`` is ``sum_pq (g_p.g_q)(a_p.a_q)``,
        two position-by-position Gram matrices ("ghost clipping", Li et al. 2022; for a
        Linear on flat inputs, one position: the product of two norms), and the clipped sum
        is one batched product per group; the other layers form their per-sample gradients."""
        rows, normed, losses, out = self._capture(x, y)
        n = len(x)
        squares = torch.zeros(n, dtype=torch.float32)
        parts: list[tuple[nn.Module, torch.Tensor, torch.Tensor, Formed | None]] = []
        for layer, weight, bias in normed:
            squares += weight.square().sum(1) + bias.square().sum(1)
            parts.append((layer, weight, bias, (weight, bias)))
        for layer, g_rows, a_rows in rows:
            has_bias = self._names[id(layer)][1] is not None
            positions = g_rows.shape[1]
            if positions == 1:  # one position: an outer product per sample
                g_sq = g_rows.square().sum((1, 2))
                squares += g_sq * a_rows.square().sum((1, 2)) + (g_sq if has_bias else 0.0)
                parts.append((layer, g_rows, a_rows, None))
                continue
            if positions * positions <= g_rows.shape[2] * a_rows.shape[2]:  # ghost norm
                gram = torch.bmm(g_rows, g_rows.transpose(1, 2))
                gram *= torch.bmm(a_rows, a_rows.transpose(1, 2))
                squares += gram.sum((1, 2)).clamp(min=0.0)  # PSD: >= 0 but for rounding
                if has_bias:
                    squares += g_rows.sum(1).square().sum(1)
                parts.append((layer, g_rows, a_rows, None))
                continue
            weight = torch.bmm(g_rows.transpose(1, 2), a_rows)  # (n, out, in)
            bias = g_rows.sum(1)
            squares += weight.flatten(1).square().sum(1)
            if has_bias:
                squares += bias.square().sum(1)
            parts.append((layer, g_rows, a_rows, (weight, bias)))
        factor = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0) * valid.flatten()
        groups = valid.shape[0]
        per_group = factor.reshape(valid.shape)
        grads: dict[str, torch.Tensor] = {}
        for layer, g_rows, a_rows, formed in parts:
            if formed is None:
                g_group = (g_rows * factor.reshape(n, 1, 1)).reshape(groups, -1, g_rows.shape[-1])
                a_group = a_rows.reshape(groups, -1, a_rows.shape[-1])
                summed_weight = torch.bmm(g_group.transpose(1, 2), a_group)
                summed_bias = g_group.sum(1)
            else:
                weight, bias = formed
                summed_weight = torch.einsum("cb,cb...->c...", per_group, _by_group(weight, valid))
                summed_bias = torch.einsum("cb,cb...->c...", per_group, _by_group(bias, valid))
            self._put(grads, layer, summed_weight, summed_bias)
        return grads, losses, out


def _patches(a: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """``layer``'s input patches, (samples, positions, in * kh * kw) in the weight's order:
    ``functional.unfold(a, ...).transpose(1, 2)``, but in one strided copy (unfold's im2col
    took 8.4 ms, this 1.7 ms, for the Opacus MNIST CNN's first layer on 400 samples)."""
    ph, pw = cast(tuple[int, int], layer.padding)  # numbers: see hookable
    if ph or pw:
        a = functional.pad(a, (pw, pw, ph, ph))
    windows = a.permute(0, 2, 3, 1)  # (n, H, W, in), a view of a channels-last input
    for dim, (k, step, gap) in enumerate(
        zip(layer.kernel_size, layer.stride, layer.dilation, strict=True), start=1
    ):
        windows = windows.unfold(dim, (k - 1) * gap + 1, step)[..., ::gap]
    # (n, oh, ow, in, kh, kw): positions row by row, then the weight's (in, kh, kw) order
    return windows.reshape(len(a), -1, windows.shape[3] * windows.shape[4] * windows.shape[5])


def _by_group(flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return flat.reshape(*valid.shape, *flat.shape[1:])
