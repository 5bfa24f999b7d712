"""The SD-scale protocol (FID with a local Inception, CLIP score with a local CLIP) through torchmetrics,
verified with a stand-in feature extractor and a tiny CLIP model written to disk."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.support.pipelines import tiny_clip_tokenizer, tiny_sd_pipeline
from wadi_distill.evaluation.benchmark import generate_batches
from wadi_distill.evaluation.sd_protocol import evaluate_sd, image_folder_batches, reference_statistics


class StandIn(torch.nn.Module):
    """A fixed extractor in Inception's place: uint8 images -> 4×4 average-pooled RGB (48 features)."""

    num_features = 48

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)


def random_images(count, seed, size=32):
    return torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "teacher")


def test_fid_from_reference_statistics_equals_torchmetrics(tmp_path, teacher):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = [random_images(40, 0), random_images(40, 1)]
    info = reference_statistics(real, tmp_path / "stats.npz", feature_extractor=StandIn())
    assert info == {"count": 80, "features": 48}
    prompts = ["a red cube", "a blue ball"] * 20
    batches = list(generate_batches(teacher, prompts, seed=0, steps=2, guidance_scale=3.0, batch=16, decoded=True))
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape[1] == 3 and len(batches) == 3
    ours = evaluate_sd(batches, reference=tmp_path / "stats.npz", feature_extractor=StandIn())
    direct = FrechetInceptionDistance(feature=StandIn(), normalize=False)
    direct.set_dtype(torch.float64)
    for images in real:
        direct.update(images, real=True)
    for images, _ in batches:
        direct.update(images, real=False)
    assert ours["samples"] == 40 and ours["fid"] == pytest.approx(direct.compute().item(), rel=1e-6)


def test_samples_do_not_depend_on_the_batch_size(teacher):
    prompts = ["a red cube", "a blue ball", "a cat"]
    one = torch.cat([s for s, _ in generate_batches(teacher, prompts, steps=2, batch=1)])
    three = torch.cat([s for s, _ in generate_batches(teacher, prompts, steps=2, batch=3)])
    torch.testing.assert_close(one, three, rtol=1e-3, atol=1e-4)  # batched float sums differ in the last bits


def test_clip_score_from_a_local_model(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                     "pad_token_id": tokenizer.pad_token_id},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    images, prompts = random_images(6, 2), ["a cat", "a dog", "a car", "a red cube", "a tree", "a boat"]
    result = evaluate_sd([(images[:3], prompts[:3]), (images[3:], prompts[3:])], clip=tmp_path / "clip")
    with torch.no_grad():
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        image_features = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text_features = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                               attention_mask=inputs["attention_mask"]).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features).clamp(min=0).mean()
    assert result["clip_score"] == pytest.approx(cosine.item(), rel=1e-4, abs=1e-6)


def test_image_folder_batches_crop_and_resize(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((30, 20, 3), 255, np.uint8)).save(tmp_path / "b.jpg")
    (batch,) = list(image_folder_batches(tmp_path, size=16))
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.uint8
    assert batch[0].max() == 0 and batch[1].min() >= 250


@pytest.mark.parametrize("extra", [
    lambda tmp: ["--prompts", tmp / "p.txt"],
    lambda tmp: ["--prompts", tmp / "p.txt", "--reference-stats", tmp / "s.npz"],
    lambda tmp: ["--prompts", tmp / "p.txt", "--clip", tmp / "noclip"],
], ids=["prompts-only", "missing-reference-stats", "missing-clip"])
def test_cli_refuses_incomplete_protocol(tmp_path, teacher, extra):
    (tmp_path / "p.txt").write_text("a cat\n")
    result = subprocess.run([sys.executable, "-m", "wadi_distill.cli", "evaluate", str(teacher),
                             *map(str, extra(tmp_path))], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
