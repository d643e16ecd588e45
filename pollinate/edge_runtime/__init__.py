"""pollinate's edge runtime: load a bundle, verify it, run it. numpy and one runtime only.

This package never imports torch or flwr, nor anything else of pollinate. The inference
runtime (onnxruntime, openvino or ai-edge-litert) is imported when a bundle is loaded, and
``cryptography`` only when a signature is checked.

Example::

    from pollinate.edge_runtime import load_bundle

    model = load_bundle("mnist-3.tar.gz", public_key="export.pub")
    model.predict_labels(image)  # image: uint8 H x W
"""

from __future__ import annotations

from pollinate.edge_runtime._backends import available_runtimes
from pollinate.edge_runtime._bundle import verify_bundle
from pollinate.edge_runtime._model import EdgeModel, load_bundle
from pollinate.edge_runtime.errors import BundleError, InputError, RuntimeMissingError
from pollinate.edge_runtime.manifest import Artifact, Manifest

__all__ = [
    "Artifact",
    "BundleError",
    "EdgeModel",
    "InputError",
    "Manifest",
    "RuntimeMissingError",
    "available_runtimes",
    "load_bundle",
    "verify_bundle",
]
