"""Export the VQ-GAN to two ONNX graphs: image -> codes and codes -> image.

Encoder graph: input ``image`` float32 ``[batch, 3, 256, 256]`` in [-1, 1] (the single
input), output ``codes`` int64 ``[batch, 256]``; encoder, ``quant_conv`` and the
nearest-code ``ArgMin`` all run inside the graph. Decoder graph: input ``codes`` int64
``[batch, 256]``, output ``image`` float32 ``[batch, 3, 256, 256]`` (codebook ``Gather``,
``post_quant_conv``, decoder). The batch axis is dynamic. The VQ-GAN config is stored
in the graphs' metadata (``vqgan_config`` as JSON) so that the runtime can validate
inputs without the PyTorch model.

Uses the TorchScript-based ``torch.onnx.export(dynamo=False)``: it needs no
``onnxscript`` and reproduces the module op for op.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from models.vqgan import VQModel

__all__ = [
    "DECODER_INPUT",
    "DECODER_OUTPUT",
    "ENCODER_INPUT",
    "ENCODER_OUTPUT",
    "ONNX_OPSET",
    "export_decoder",
    "export_encoder",
]

#: ONNX opset the graphs are written with.
ONNX_OPSET = 17
ENCODER_INPUT = "image"
ENCODER_OUTPUT = "codes"
DECODER_INPUT = "codes"
DECODER_OUTPUT = "image"


class _EncoderGraph(nn.Module):
    def __init__(self, model: VQModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        codes = self.model.quantize.indices(self.model.encode_latent(image))
        return codes.reshape(-1, self.model.cfg.codes_per_image)  # static code axis


class _DecoderGraph(nn.Module):
    def __init__(self, model: VQModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: Tensor) -> Tensor:
        return self.model._decode_unchecked(codes)


def _export(
    wrapper: nn.Module,
    example: Tensor,
    path: Path,
    *,
    input_name: str,
    output_name: str,
    role: str,
    model: VQModel,
    opset: int,
    out_dims: tuple[int, ...],
) -> Path:
    if opset < 17:
        raise ValueError(f"ONNX opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation / tracer notes
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    proto = onnx.load(str(path))
    # pin the documented shapes on the graph's interface: ['batch', ...static dims]
    for value, dims in (
        (proto.graph.input[0], tuple(example.shape[1:])),
        (proto.graph.output[0], out_dims),
    ):
        shape = value.type.tensor_type.shape
        shape.dim[0].dim_param = "batch"
        for d, n in zip(shape.dim[1:], dims, strict=True):
            d.dim_value = n
    meta = {
        "vqgan_role": role,
        "vqgan_config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "codes_per_image": str(model.cfg.codes_per_image),
        "n_embed": str(model.cfg.n_embed),
        "resolution": str(model.cfg.resolution),
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "llm-cxr-node models.onnx_export"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_encoder(model: VQModel, path: str | Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write the image -> codes graph (encoder, ``quant_conv``, nearest-code ArgMin).

    Parameters
    ----------
    model : VQModel
        fp32 model on CPU (moved nowhere; exported as is in eval mode).
    path : str or Path
        Destination ``.onnx`` file (parent folders are created).
    opset : int
        ONNX opset, >= 17.

    Returns
    -------
    Path
        ``path``.
    """
    r = model.cfg.resolution
    example = torch.zeros(1, model.cfg.in_channels, r, r, dtype=torch.float32)
    return _export(
        _EncoderGraph(model),
        example,
        Path(path),
        input_name=ENCODER_INPUT,
        output_name=ENCODER_OUTPUT,
        role="encoder",
        model=model,
        opset=opset,
        out_dims=(model.cfg.codes_per_image,),
    )


def export_decoder(model: VQModel, path: str | Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write the codes -> image graph (codebook lookup, ``post_quant_conv``, decoder).

    Parameters
    ----------
    model : VQModel
        fp32 model on CPU.
    path : str or Path
        Destination ``.onnx`` file.
    opset : int
        ONNX opset, >= 17.

    Returns
    -------
    Path
        ``path``.
    """
    example = torch.zeros(1, model.cfg.codes_per_image, dtype=torch.int64)
    return _export(
        _DecoderGraph(model),
        example,
        Path(path),
        input_name=DECODER_INPUT,
        output_name=DECODER_OUTPUT,
        role="decoder",
        model=model,
        opset=opset,
        out_dims=(model.cfg.out_ch, model.cfg.resolution, model.cfg.resolution),
    )
