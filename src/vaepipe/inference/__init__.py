"""The inference layer: onnxruntime sessions, the served model, the `vaepipe` commands that run
the exported graphs, and the browser page. Never imports torch (tests/unit/test_layers.py)."""
