"""The serving tier: `pollinate serve` (KServe v2 REST + gRPC, dynamic batching, roll-out).

See docs/serving.md for use and docs/architecture.md for the design. Importing this package
imports neither torch nor flwr; the optional torch backend imports torch when it is chosen.
"""
