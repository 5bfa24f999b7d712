"""`wadi-distill diagnose` and the regression probe: the denoising error by timestep on the embedded teacher."""

import subprocess
import sys

import pytest

from wadi_distill.experiments.diagnose import TIMESTEPS, diagnose_runs, regression_probe


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from wadi_distill.config import load_config
    from wadi_distill.training.loop import train

    base = tmp_path_factory.mktemp("diagnose")
    train(load_config(out=str(base / "run"), steps=3, batch_size=2, checkpoint_every=3, validate_every=3,
                      cache_dir=str(base / "cache")))
    return base / "run"


def test_the_teachers_single_step_lies_off_its_data_at_fine_scales(short_run, tmp_path):
    """The undistilled teacher's one step is far from its data where t resolves detail (t = 50), not at
    t = 950, and its 25 steps are not; the run's rows come from its fake score (loaded: it differs from the teacher) and its generator."""
    table = diagnose_runs([short_run], tmp_path / "gap.csv", per_class=2)
    assert list(table.index.get_level_values("t")) == list(TIMESTEPS)
    real, single = table["real / teacher"], table["teacher 1 step / teacher"]
    assert single.loc[50].item() > 3 * real.loc[50].item()
    assert table["teacher 25 steps / teacher"].loc[50].item() < 1.5 * real.loc[50].item()  # many steps: on its data
    assert single.loc[950].item() < 1.5 * real.loc[950].item()
    assert (table["run / fake"] != table["run / teacher"]).all()
    assert (tmp_path / "gap.csv").read_text().startswith("t,1-a_t,real / teacher")


def test_diagnose_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "wadi_distill.cli", "diagnose", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_regression_probe_fits_its_targets():
    result = regression_probe(steps=30, batch_size=8, targets=32, per_class=4, teacher_steps=2)
    assert result["last_loss"] < result["first_loss"]
    assert set(result["denoising_error"]) == set(TIMESTEPS) and 0 < result["scores"]["prompt_accuracy"] <= 1
