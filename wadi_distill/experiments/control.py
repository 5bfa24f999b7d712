"""``wadi-distill control-report``: ControlNet with the one-step student against the teacher, measured.

The control maps are edge maps (:func:`wadi_distill.evaluation.control.edge_map`) of ``per_class``
test images of every class, disjoint from the evaluation's real reference (the next ``per_class`` of
the same seeded draw); each is paired with its class's evaluation prompt. Rows, each scored with the
evaluation classifier against the real reference (FD, KID, precision/recall, prompt accuracy) and for
control fidelity against the control maps (edge precision/recall/F1 within one pixel, IoU):

- ``real, VAE round trip``: the control images themselves encoded and decoded — the ceiling of control
  fidelity in this latent space (and near the FD floor);
- ``real, another image of the class``: chance fidelity for an image of the right class;
- the teacher at ``steps`` DDIM steps and the student at one step, each with and without the ControlNet.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from wadi_analysis.outputs import staged_folder

from ..embedded import datasets

SETTINGS = "settings.json"
KIND = "controlnet-report"


def control_set(per_class: int, size: int):
    """(images, labels, prompts) whose edge maps are the controls: test images disjoint from the reference."""
    test = datasets.load("fashion-mnist", "test", size)
    drawn = test.balanced(2 * per_class, seed=0)  # the first per_class of each class are the reference's
    keep = torch.cat([torch.arange(c * 2 * per_class + per_class, (c + 1) * 2 * per_class) for c in range(len(test.classes))])
    chosen = drawn.subset(keep)
    prompts, labels = datasets.evaluation_prompts(test.classes, per_class)
    assert torch.equal(labels, chosen.labels)
    return chosen.images, chosen.labels, prompts


@torch.no_grad()
def sample_images(teacher, denoiser, controlnet, controls, prompts, seed, steps, guidance, vsd, batch=250):
    """Float images in [-1, 1]: ``steps``-step DDIM of the teacher (``vsd`` None) or one step of the student,
    steered by ``controlnet`` when given."""
    from ..controlnet import ControlledDenoiser
    from ..evaluation.benchmark import sample_noise
    from ..sampling import ddim, one_step_sample, to_pixels

    null, out = teacher.encode([""]), []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        model = denoiser if controlnet is None else ControlledDenoiser(denoiser, controlnet, controls[start: start + batch])
        conditioning, noise = teacher.encode(chunk), sample_noise(teacher, len(chunk), seed, start)
        x0 = ddim(teacher, model, noise, conditioning, null, steps, guidance) if vsd is None else \
            one_step_sample(teacher, model, noise, conditioning, vsd, guidance)
        out.append(to_pixels(teacher, x0))
    return torch.cat(out)


def control_report(student: str | os.PathLike, controlnet: str | os.PathLike, out: str | os.PathLike,
                   per_class: int = 100, seed: int = 0, steps: int = 25, teacher_guidance: float = 1.5,
                   student_guidance: float = 1.0, overwrite: bool = False, log=print) -> list[dict]:
    """Write ``table.csv``, ``table.md``, ``samples.png`` and ``settings.json`` to ``out``; returns the rows."""
    import pandas as pd

    from ..controlnet import load_controlnet, output_size
    from ..evaluation.benchmark import Benchmark, score
    from ..evaluation.control import edge_map, edge_scores
    from ..runs import check_output_for, load_one_step
    from ..sampling import check_guidance

    teacher_guidance, student_guidance = check_guidance(teacher_guidance), check_guidance(student_guidance)
    out = check_output_for(student, out, inputs=(controlnet,), overwrite=overwrite, ours=_is_report)
    model = load_one_step(student)
    teacher, generator = model.teacher, model.generator.eval()
    net = load_controlnet(controlnet, teacher.denoiser)
    benchmark = Benchmark(per_class=per_class)
    images, labels, prompts = control_set(per_class, output_size(teacher))
    edges = edge_map(images)
    controls = edges.expand(-1, 3, -1, -1)
    vae = teacher.pipeline.vae
    from ..embedded.vae_training import reconstruct

    other = torch.cat([torch.nonzero(labels == c).flatten().roll(1) for c in range(int(labels.max()) + 1)])
    rows, shown = [], {}
    cases = [("real, VAE round trip", lambda: reconstruct(vae, images).float()),
             ("real, another image of the class", lambda: images[other]),
             (f"teacher, {steps} steps, ControlNet", lambda: sample_images(
                 teacher, teacher.denoiser, net, controls, prompts, seed, steps, teacher_guidance, None)),
             (f"teacher, {steps} steps, no control", lambda: sample_images(
                 teacher, teacher.denoiser, None, controls, prompts, seed, steps, teacher_guidance, None)),
             ("student, 1 step, ControlNet", lambda: sample_images(
                 teacher, generator, net, controls, prompts, seed, 1, student_guidance, model.vsd)),
             ("student, 1 step, no control", lambda: sample_images(
                 teacher, generator, None, controls, prompts, seed, 1, student_guidance, model.vsd))]
    for name, make in cases:
        started = time.perf_counter()
        generated = make()
        row = {"row": name, **edge_scores(edges, edge_map(generated)),
               **vars(score(benchmark.classifier, generated, labels, benchmark.reference)),
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        shown[name] = generated
        log(f"{name}: edge F1 {row['edge_f1']:.3f}, FD {row['frechet_distance']:.3f}")
    settings = {"kind": KIND, "student": str(student), "controlnet": str(controlnet), "per_class": per_class,
                "samples": len(prompts), "seed": seed, "teacher_steps": steps, "teacher_guidance": teacher_guidance,
                "student_guidance": student_guidance, "real_vs_real": benchmark.real_vs_real,
                "command": f"wadi-distill control-report {student} --controlnet {controlnet} --out {out} "
                           f"--per-class {per_class} --seed {seed}"}
    table = pd.DataFrame(rows)
    with staged_folder(out) as stage:
        table.to_csv(stage / "table.csv", index=False)
        (stage / "table.md").write_text(_markdown(table))
        _figure(edges, shown, per_class).save(stage / "samples.png")
        (stage / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return rows


def _is_report(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / SETTINGS).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _markdown(table) -> str:
    columns = [("row", "", "{}"), ("edge_f1", "edge F1 (±1 px)", "{:.3f}"), ("edge_iou", "edge IoU", "{:.3f}"),
               ("frechet_distance", "FD", "{:.3f}"), ("prompt_accuracy", "prompt accuracy", "{:.3f}"),
               ("recall", "recall", "{:.3f}")]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def _figure(edges, shown: dict, per_class: int, columns: int = 10):
    """One row per source (control maps first), one image of every class per row."""
    from ..evaluation.control import edge_image
    from ..sampling import image_grid

    pick = torch.arange(columns) * per_class
    rows = [torch.from_numpy(edge_image(edges[pick]))]
    for name in ("real, VAE round trip", *[n for n in shown if n.startswith(("teacher", "student"))]):
        pixels = ((shown[name][pick].expand(-1, 3, -1, -1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        rows.append(pixels.permute(0, 2, 3, 1))
    return image_grid(torch.cat(rows).numpy(), columns)
