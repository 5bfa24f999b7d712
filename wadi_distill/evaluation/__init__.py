"""Evaluation: the benchmark in the evaluation classifier's feature space (:mod:`.benchmark`), its
metrics (:mod:`.metrics`), the classifier (:mod:`.classifier`) and the SD-scale protocol with
torchmetrics (:mod:`.sd_protocol`). :func:`evaluate_source` chooses between the two protocols.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from wadi_analysis.errors import UserError


def evaluate_source(source: str | os.PathLike | None = None, *, per_class: int = 100, steps: int = 25,
                    guidance: float = 1.5, seed: int = 0, classifier: str | os.PathLike | None = None,
                    prompts: str | os.PathLike | None = None, reference_stats: str | os.PathLike | None = None,
                    inception: str | os.PathLike | None = None, clip: str | os.PathLike | None = None,
                    batch: int = 16, json_out: str | os.PathLike | None = None, kid_subset: int | None = None,
                    progress: bool = False) -> tuple[dict, str]:
    """Score a teacher folder, run or export (default: the embedded teacher); returns (result, line)
    and, with ``json_out``, writes the result there as JSON. ``progress``: a bar over the samples on
    stderr; ``kid_subset``: KID's subset size (:class:`.benchmark.Benchmark`).

    Without ``prompts``/``reference_stats``/``inception``/``clip``: FD, KID, precision/recall and
    prompt accuracy in the evaluation classifier's features, each beside its real-vs-real value
    (:func:`.benchmark.evaluate`). With them, the SD protocol: FID (``reference_stats`` with
    ``inception``) and/or CLIP score (``clip``) over ``prompts`` (:func:`.sd_protocol.evaluate_sd`)."""
    from .. import embedded

    source = Path(source) if source is not None else embedded.teacher_path()
    if not source.exists():
        raise UserError(f"{source} does not exist")
    if json_out is not None:  # checked before minutes of sampling, not after
        from ..runs import check_output_for

        inputs = tuple(p for p in (classifier, prompts, reference_stats, inception, clip) if p)
        check_output_for(source, json_out, folder=False, inputs=inputs)
    if prompts is None and reference_stats is None and inception is None and clip is None:
        from .benchmark import evaluate, summary_line

        result = evaluate(source, classifier, per_class=per_class, seed=seed, steps=steps, guidance_scale=guidance,
                          kid_subset=kid_subset, progress=progress)
        line = summary_line(result)
    else:
        from ..training.prompts import read_prompts
        from .benchmark import counted, generate_batches, sampling_progress
        from .sd_protocol import evaluate_sd

        if prompts is None or (reference_stats is None) != (inception is None):
            raise UserError("the SD protocol needs --prompts, and --reference-stats with --inception (FID) "
                            "and/or --clip")
        if kid_subset is not None:
            raise UserError("--kid-subset is the embedded benchmark's; the SD protocol reports FID and CLIP score")
        prompt_list = read_prompts(prompts)
        with sampling_progress(len(prompt_list), progress) as advance:
            batches = generate_batches(source, prompt_list, seed, steps, guidance, batch, decoded=True)
            batches = counted(batches, advance)
            result = {"source": str(source), "seed": seed, "prompts": str(prompts),
                      **evaluate_sd(batches, reference=reference_stats, inception=inception, clip=clip)}
        line = " · ".join(f"{k} {v:.4f}" for k, v in result.items() if k in ("fid", "clip_score"))
    if json_out is not None:
        from wadi_analysis.atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
    return result, f"{source} ({result.get('sampler', 'SD protocol')}, {result['samples']} samples): {line}"
