"""The reproduction's runs at tiny size on the embedded teacher: early stopping where the validation curve
flattens (convergence.csv's criterion), the step cap otherwise, and concurrent workers (``--jobs``) that
give what sequential runs of the same arm and seed give; ``--device cuda`` refused without a GPU."""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from wadi_analysis.errors import UserError
from wadi_distill.experiments.pool import _benchmark, student_task, worker_threads
from wadi_distill.experiments.reproduce import Settings, reproduce, student_overrides, train_student

LORA = {"adapter": "lora", "generator_preset": "sd-unet-generator", "generator_rank": 16}
TINY = dict(batch_size=2, curve_per_class=2, final_per_class=2)


def _train(tmp_path, **settings):
    settings = Settings(**TINY, **settings)
    row, points = train_student("lora", LORA, 0, tmp_path, settings, _benchmark(2), _benchmark(2), lambda line: None)
    return row, points, tmp_path / "runs" / "lora-seed0"


def test_training_stops_where_the_curve_flattens(tmp_path):
    # window 1 and a threshold no improvement reaches: flattened at the second evaluation point (step 4)
    row, points, run = _train(tmp_path, steps=8, validate_every=2, flat_window=1, flat_threshold=10.0)
    assert [p["step"] for p in points] == [2, 4]
    assert row["trained_steps"] == 4 and row["stopped_early"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004"]  # saved as at the end
    assert (run / "generator_adapter.safetensors").is_file() and (run / "export").is_dir()
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["step"].max() == 4


def test_a_curve_that_does_not_flatten_runs_to_the_cap(tmp_path):
    # three points cannot fill a window of 10: never flattened, so all 6 steps run
    row, points, run = _train(tmp_path, steps=6, validate_every=2, flat_window=10, flat_threshold=10.0)
    assert [p["step"] for p in points] == [2, 4, 6]
    assert row["trained_steps"] == 6 and not row["stopped_early"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006"]


def test_early_stop_off_runs_to_the_cap(tmp_path):
    row, points, _ = _train(tmp_path, steps=4, validate_every=2, flat_window=1, flat_threshold=10.0, early_stop=False)
    assert row["trained_steps"] == 4 and not row["stopped_early"] and len(points) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: cuda is accepted")
def test_cuda_is_refused_without_a_gpu(tmp_path):
    with pytest.raises(UserError, match="no CUDA GPU"):
        reproduce(tmp_path / "r", Settings(), device="cuda")
    assert not (tmp_path / "r").exists()
    from wadi_distill.cli import app

    result = CliRunner().invoke(app, ["reproduce", "--out", str(tmp_path / "c"), "--device", "cuda"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --device cuda"), result.output
    assert result.stderr.count("\n") == 1 and not (tmp_path / "c").exists()
    for jobs, device in ((0, "cpu"), (1, "tpu")):
        with pytest.raises(UserError):
            reproduce(tmp_path / "r", Settings(), jobs=jobs, device=device)


@pytest.mark.slow
def test_two_workers_give_what_sequential_runs_give(tmp_path):
    settings = Settings(steps=2, validate_every=2, seeds=(0,), ranks=(16,), teacher_steps=(1,), swap_students=("lora",),
                        **TINY)
    out = reproduce(tmp_path / "jobs2", settings, log=lambda line: None, jobs=2)
    results = pd.read_csv(out / "results.csv").set_index("model")
    students = results[results["experiment"] == "students"]
    assert {"dora-frozen", "lorad-plan", "lora", "full"} <= set(students.index)
    # each (arm, seed) run again in this process, one after another, with a worker's threads: bit-identical
    overrides = {**student_overrides(settings), "lorad-plan": {"adapter": "lorad", "plan": str(out / "plan.json")}}
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(2))
    try:
        for name in students.index:
            row = student_task(name, overrides[name], 0, tmp_path / "sequential", settings)["row"]
            for metric in ("frechet_distance", "kid", "precision", "recall", "prompt_accuracy", "trainable"):
                assert row[metric] == students.loc[name, metric], (name, metric)
    finally:
        torch.set_num_threads(threads)
    # one worker (all the cores as threads): the same up to float rounding of another thread count
    sequential = pd.read_csv(reproduce(tmp_path / "jobs1", settings, log=lambda line: None, jobs=1) / "results.csv")
    parallel = pd.read_csv(out / "results.csv")
    assert list(sequential["model"]) == list(parallel["model"])
    for metric in ("frechet_distance", "kid", "precision", "recall", "prompt_accuracy"):
        assert sequential[metric].to_numpy() == pytest.approx(parallel[metric].to_numpy(), rel=1e-4), metric


STOPPING_RUN = """
import json, sys
from wadi_distill.config import load_config
from wadi_distill.training.loop import train

summary = train(load_config(**json.loads(sys.argv[1])), on_validate=lambda step, *rest: step >= 2)
print(f"stopped at {summary['steps']}", flush=True)
"""


def test_an_early_stop_ends_every_process_together(tmp_path):
    """Two processes (gloo): on_validate runs on the main one only; its stop reaches the other."""
    import json
    import os
    import subprocess
    import sys

    from tests.support.runs import sd_teacher_with_prompts

    folder, prompts = sd_teacher_with_prompts(tmp_path)
    script = tmp_path / "stopping_run.py"
    script.write_text(STOPPING_RUN)
    options = {"teacher": str(folder), "prompts": str(prompts), "out": str(tmp_path / "run"), "steps": 6,
               "batch_size": 1, "generator_rank": 2, "fake_rank": 2, "validate_every": 1, "checkpoint_every": 4,
               "cache_dir": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2", str(script),
                           json.dumps(options)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stopped at 2") == 2, done.stdout
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert (run / "generator_adapter.safetensors").is_file()
