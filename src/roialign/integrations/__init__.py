"""Integrations with other frameworks: torchvision patching, ONNX export."""
