"""pollinate.export: turn a trained global model into validated, quantized bundles."""
