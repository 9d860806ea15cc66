"""VQModel: taming key names, strict checkpoint loading, YAML cross-checks, batching."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import yaml

from models.vqgan import (
    CheckpointError,
    VQGANConfig,
    VQGANConfigError,
    VQModel,
    load_taming_checkpoint,
)
from tests.models.conftest import make_vqmodel

# ----------------------------------------------------------------------------- helpers


def _write_yaml(path: Path, cfg: VQGANConfig, **overrides: Any) -> Path:
    doc = cfg.to_yaml_dict()
    doc["model"]["base_learning_rate"] = 4.5e-6
    doc["model"]["params"]["lossconfig"] = {
        "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000},
    }
    doc["model"]["params"]["ddconfig"].update(overrides)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _loss_tensors() -> dict[str, torch.Tensor]:
    # what taming's VQLPIPSWithDiscriminator puts in the state dict (a sample of it)
    return {
        "loss.logvar": torch.zeros(()),
        "loss.perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
        "loss.discriminator.main.2.running_mean": torch.zeros(128),
    }


def _lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], **extra: Any) -> Path:
    sd = dict(state_dict)
    sd.update(_loss_tensors())
    torch.save({"state_dict": sd, "global_step": 123456, "epoch": 7, **extra}, path)
    return path


@pytest.fixture()
def tiny_ckpt(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> tuple[Path, Path, VQModel]:
    src = make_vqmodel(tiny_vqgan_config, seed=7)
    ckpt = _lightning_ckpt(tmp_path / "last.ckpt", src.state_dict())
    cfg_yaml = _write_yaml(tmp_path / "config.yaml", tiny_vqgan_config)
    return ckpt, cfg_yaml, src


# --------------------------------------------------------------------- architecture


def test_published_key_names_and_shapes_follow_taming() -> None:
    with torch.device("meta"):
        sd = VQModel(VQGANConfig()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expect = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (1024, 256),
        "post_quant_conv.weight": (256, 256, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
        "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.norm2.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expect.items():
        assert shapes.get(key) == shape, key
    keys = set(shapes)
    # no time embedding, no conv_shortcut variant, no downsample on the last encoder level,
    # no upsample on decoder level 0, attention only at resolution 16 (level 4)
    assert not any("temb" in k or "conv_shortcut" in k for k in keys)
    assert not any(k.startswith("encoder.down.4.downsample") for k in keys)
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    assert {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down\.(\d)\.attn", k))} == {
        4
    }
    assert {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d)\.attn", k))} == {4}
    enc_blocks = {m.group(1) for k in keys if (m := re.match(r"encoder\.down\.0\.block\.(\d)", k))}
    dec_blocks = {m.group(1) for k in keys if (m := re.match(r"decoder\.up\.0\.block\.(\d)", k))}
    assert enc_blocks == {"0", "1"} and dec_blocks == {"0", "1", "2"}
    assert all(
        k.startswith(("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv."))
        for k in keys
    )


def test_config_derived_from_state_dict_round_trips(tiny_vqgan_config: VQGANConfig) -> None:
    with torch.device("meta"):
        sd = VQModel(VQGANConfig()).state_dict()
    assert VQGANConfig.from_state_dict(sd) == VQGANConfig()
    with torch.device("meta"):
        sd_tiny = VQModel(tiny_vqgan_config).state_dict()
    assert VQGANConfig.from_state_dict(sd_tiny) == tiny_vqgan_config


def test_codes_shape_range_and_grid(tiny_vqmodel: VQModel) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        z = tiny_vqmodel.encode_latent(x)
        codes = tiny_vqmodel.encode_to_codes(x)
    assert tuple(z.shape) == (2, 64, 16, 16)
    assert codes.dtype == torch.int64 and tuple(codes.shape) == (2, 256)
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024
    # row-major: code at grid (r, c) is codes[:, 16 r + c]; check against a brute-force search
    e = tiny_vqmodel.quantize.embedding.weight.double()
    r, c = 3, 11
    vec = z[1, :, r, c].double()
    assert int(codes[1, 16 * r + c]) == int(((e - vec) ** 2).sum(1).argmin())


def test_batch_of_one_and_three_give_identical_codes(
    tiny_vqmodel: VQModel, nih_inputs: npt.NDArray[np.float32]
) -> None:
    x = torch.from_numpy(np.concatenate([nih_inputs, nih_inputs[:1] * 0.5]))
    with torch.no_grad():
        batched = tiny_vqmodel.encode_to_codes(x)
        single = torch.cat([tiny_vqmodel.encode_to_codes(x[i : i + 1]) for i in range(3)])
    assert torch.equal(batched, single)


def test_decode_codes_shape_and_validation(tiny_vqmodel: VQModel) -> None:
    codes = torch.randint(0, 1024, (2, 256))
    with torch.no_grad():
        img = tiny_vqmodel.decode_codes(codes)
    assert tuple(img.shape) == (2, 3, 256, 256) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        tiny_vqmodel.decode_codes(torch.full((1, 256), 1024))
    with pytest.raises(ValueError, match=r"\[batch, 256\]"):
        tiny_vqmodel.decode_codes(torch.zeros(1, 255, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        tiny_vqmodel.decode_codes(torch.zeros(1, 256))
    with pytest.raises(ValueError, match=r"\[batch, 3, 256, 256\]"):
        tiny_vqmodel.encode_to_codes(torch.zeros(3, 256, 256))


def test_config_validation() -> None:
    with pytest.raises(VQGANConfigError, match="GroupNorm"):
        VQGANConfig(ch=48)
    with pytest.raises(VQGANConfigError, match="double_z"):
        VQGANConfig(double_z=True)
    with pytest.raises(VQGANConfigError, match="divisible"):
        VQGANConfig(resolution=250)
    assert VQGANConfig().grid_size == 16 and VQGANConfig().codes_per_image == 256


# ------------------------------------------------------------------------ checkpoints


def test_lightning_ckpt_with_loss_section_loads_strictly(
    tiny_ckpt: tuple[Path, Path, VQModel],
) -> None:
    ckpt, cfg_yaml, src = tiny_ckpt
    model = load_taming_checkpoint(ckpt, cfg_yaml)
    assert not model.training
    got, want = model.state_dict(), src.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode_to_codes(x), src.encode_to_codes(x))


def test_yaml_layout_is_read(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    path = _write_yaml(tmp_path / "c.yaml", tiny_vqgan_config)
    assert VQGANConfig.from_yaml(path) == tiny_vqgan_config
    published = tmp_path / "published.yaml"
    published.write_text(
        "model:\n  base_learning_rate: 4.5e-06\n  target: taming.models.vqgan.VQModel\n"
        "  params:\n    embed_dim: 256\n    n_embed: 1024\n    ddconfig:\n"
        "      double_z: False\n      z_channels: 256\n      resolution: 256\n"
        "      in_channels: 3\n      out_ch: 3\n      ch: 128\n      ch_mult: [1,1,2,2,4]\n"
        "      num_res_blocks: 2\n      attn_resolutions: [16]\n      dropout: 0.0\n"
        "    lossconfig:\n      target: taming.modules.losses.vqperceptual.DummyLoss\n",
        encoding="utf-8",
    )
    assert VQGANConfig.from_yaml(published) == VQGANConfig()


def test_wrong_shape_names_the_key(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    sd = make_vqmodel(tiny_vqgan_config).state_dict()
    sd["decoder.up.2.block.1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    ckpt = _lightning_ckpt(tmp_path / "bad.ckpt", sd)
    cfg_yaml = _write_yaml(tmp_path / "c.yaml", tiny_vqgan_config)
    with pytest.raises(CheckpointError, match=r"decoder\.up\.2\.block\.1\.conv1\.weight has shape"):
        load_taming_checkpoint(ckpt, cfg_yaml)


def test_missing_key_names_the_key(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    sd = make_vqmodel(tiny_vqgan_config).state_dict()
    del sd["encoder.mid.attn_1.proj_out.bias"]
    ckpt = _lightning_ckpt(tmp_path / "bad.ckpt", sd)
    cfg_yaml = _write_yaml(tmp_path / "c.yaml", tiny_vqgan_config)
    with pytest.raises(
        CheckpointError, match=r"missing keys: encoder\.mid\.attn_1\.proj_out\.bias"
    ):
        load_taming_checkpoint(ckpt, cfg_yaml)


def test_unexpected_key_names_the_key(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    sd = make_vqmodel(tiny_vqgan_config).state_dict()
    sd["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(32, 512)
    ckpt = _lightning_ckpt(tmp_path / "bad.ckpt", sd)
    cfg_yaml = _write_yaml(tmp_path / "c.yaml", tiny_vqgan_config)
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*temb_proj\.weight"):
        load_taming_checkpoint(ckpt, cfg_yaml)


def test_yaml_disagreeing_with_shapes_names_key_and_field(
    tiny_ckpt: tuple[Path, Path, VQModel], tmp_path: Path, tiny_vqgan_config: VQGANConfig
) -> None:
    ckpt, _, _ = tiny_ckpt
    wrong = _write_yaml(tmp_path / "wrong.yaml", tiny_vqgan_config, ch=64)
    with pytest.raises(CheckpointError) as info:
        load_taming_checkpoint(ckpt, wrong)
    msg = str(info.value)
    assert "encoder.conv_in.weight has shape [32, 3, 3, 3]" in msg
    assert "ch=64" in msg and "implies [64, 3, 3, 3]" in msg
    assert "'ch': 32" in msg  # what the tensors imply
    fewer_levels = _write_yaml(tmp_path / "levels.yaml", tiny_vqgan_config, ch_mult=[1, 1, 2, 4])
    with pytest.raises(CheckpointError) as info:
        load_taming_checkpoint(ckpt, fewer_levels)
    msg = str(info.value)
    assert "unexpected keys: decoder.up.3.block.0.nin_shortcut.bias" in msg
    assert "the tensors imply {'ch_mult': [1, 1, 2, 2, 4]}" in msg


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"target": "taming.models.vqgan.GumbelVQ"}, "Gumbel"),
        ({"remap": "indices.npy"}, "remap"),
    ],
)
def test_unsupported_yaml_variants(
    tmp_path: Path, tiny_vqgan_config: VQGANConfig, edit: dict[str, str], message: str
) -> None:
    doc = tiny_vqgan_config.to_yaml_dict()
    if "target" in edit:
        doc["model"]["target"] = edit["target"]
    else:
        doc["model"]["params"].update(edit)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(VQGANConfigError, match=message):
        VQGANConfig.from_yaml(path)


def test_yaml_without_ddconfig_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  params:\n    embed_dim: 256\n", encoding="utf-8")
    with pytest.raises(VQGANConfigError, match="ddconfig"):
        VQGANConfig.from_yaml(path)


SIDE_EFFECTS: list[str] = []


def _record_side_effect(tag: str) -> str:
    SIDE_EFFECTS.append(tag)
    return tag


class _LightningHParams:
    """Stands for OmegaConf / Lightning objects that weights_only refuses; its pickle
    asks for a call to a function, which must never run at load time."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_side_effect, ("ran",))


def test_lightning_metadata_is_read_inertly(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    src = make_vqmodel(tiny_vqgan_config, seed=3)
    ckpt = _lightning_ckpt(
        tmp_path / "meta.ckpt",
        src.state_dict(),
        hyper_parameters={"ddconfig": _LightningHParams()},
        callbacks={"ModelCheckpoint": {"best_model_path": "x"}},
    )
    with pytest.raises(Exception):  # noqa: B017 - the safe loader must refuse this file
        torch.load(ckpt, weights_only=True)
    SIDE_EFFECTS.clear()
    model = load_taming_checkpoint(ckpt, _write_yaml(tmp_path / "c.yaml", tiny_vqgan_config))
    assert SIDE_EFFECTS == []
    assert torch.equal(
        model.state_dict()["quantize.embedding.weight"],
        src.state_dict()["quantize.embedding.weight"],
    )


def test_not_a_checkpoint(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    cfg_yaml = _write_yaml(tmp_path / "c.yaml", tiny_vqgan_config)
    junk = tmp_path / "junk.ckpt"
    torch.save({"weights": {"a": torch.zeros(1)}}, junk)
    with pytest.raises(CheckpointError, match="not a taming checkpoint"):
        load_taming_checkpoint(junk, cfg_yaml)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_taming_checkpoint(tmp_path / "absent.ckpt", cfg_yaml)
