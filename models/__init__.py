"""LLM-CXR model runtime: VQ-GAN, ONNX image tokenizer, token layout, backends, bundles.

Takes and returns arrays; never imports pydicom and never imports ``node``.
"""
