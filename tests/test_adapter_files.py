"""`adapter-info` and `merge` read the generator file of every adapter method, not only LoRaD's."""

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import build_unet
from wadi_distill import adapters, lorad
from wadi_distill.cli import app

TARGETS = {"down_blocks.0.attentions.0.proj_in": 2, "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 2}


def run_unet(model):
    torch.manual_seed(3)
    sample = torch.randn(1, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    hidden = torch.randn(1, 5, model.config.cross_attention_dim)
    with torch.no_grad():
        return model(sample, torch.tensor([500]), hidden).sample


@pytest.mark.parametrize("method", ["lorad", "lora", "dora"])
def test_adapter_info_and_merge_for_every_method(tmp_path, method):
    model = build_unet()
    model.save_pretrained(tmp_path / "base")
    count = adapters.attach(model, method, TARGETS, "generator", seed=1)
    with torch.no_grad():  # move away from the identity start, or merging would prove nothing
        for parameter in adapters.adapter_parameters(model, "generator"):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    adapters.activate(model, "generator")
    expected = run_unet(model.eval())
    adapters.save_adapter(model, "generator", tmp_path / "generator.safetensors")
    runner = CliRunner()

    info = runner.invoke(app, ["adapter-info", str(tmp_path / "generator.safetensors")])
    assert info.exit_code == 0, info.output
    assert f"'generator' ({method})" in info.output and f"{len(TARGETS)} modules" in info.output
    assert f"{count:,} parameters" in info.output and "base_fingerprint" in info.output

    merged = runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "generator.safetensors"),
                                 "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name or "lorad" in name for name in plain.state_dict())
    torch.testing.assert_close(run_unet(plain), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(run_unet(plain), run_unet(build_unet().eval()))


def test_merge_refuses_a_non_empty_output_and_keeps_it(tmp_path):
    model = build_unet()
    model.save_pretrained(tmp_path / "base")
    lorad.add_adapter(model, "generator", TARGETS)
    lorad.save_adapter(model, "generator", tmp_path / "generator.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "generator.safetensors"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "not empty" in result.stderr
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
