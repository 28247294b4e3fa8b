"""Early-exit inference on raw text: the PyTorch reference (early_exit_model) and ONNX Runtime (onnx_runtime)."""

RUNTIMES = ("torch", "onnx")  # PyTorch eager (the reference, and for training); ONNX Runtime, every layer a graph
