"""`evaluate` on a fresh machine. The benchmark's shipped real data
(wadi_distill/embedded/reference_features.safetensors): fresh (equal to what the dataset and the embedded
classifier give now), serving every per_class up to the shipped one with the dataset gone, and falling
back to the dataset, or refusing, beyond that; the command's progress bar and KID subset."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wadi_analysis.errors import UserError
from wadi_distill import embedded
from wadi_distill.cli import app
from wadi_distill.embedded import datasets
from wadi_distill.evaluation import reference
from wadi_distill.evaluation.benchmark import Benchmark, score
from wadi_distill.evaluation.classifier import Classifier, embed, load_classifier


@pytest.fixture
def no_dataset(tmp_path, monkeypatch):
    """Fashion-MNIST made unavailable: its reader looks only at WADI_FASHION_MNIST (else /usr/share/...)."""
    empty = tmp_path / "no-fashion-mnist"
    empty.mkdir()
    monkeypatch.setenv("WADI_FASHION_MNIST", str(empty))
    with pytest.raises(FileNotFoundError):
        datasets.load("fashion-mnist", "test")
    return empty


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(embedded.classifier_path())


def test_the_shipped_file_equals_a_fresh_computation(tmp_path, classifier, capsys):
    """Fails when the embedded classifier (or the draw) changed and the file was not regenerated with
    `python -m wadi_distill.evaluation.reference` (run here with --out)."""
    fresh_file = tmp_path / "fresh.safetensors"
    reference.main(["--out", str(fresh_file)])
    assert str(fresh_file) in capsys.readouterr().out
    shipped, fresh = load_file(str(reference.SHIPPED_FILE)), load_file(str(fresh_file))
    provenance = reference.read_shipped(fresh_file)[1]
    assert reference.read_shipped()[1] == provenance
    assert provenance["classifier_digest"] == reference.classifier_digest(classifier)
    assert provenance["count"] == 10 * reference.SHIPPED_PER_CLASS and provenance["feature_dim"] == 128
    assert shipped.keys() == fresh.keys()
    for name in shipped:
        if shipped[name].is_floating_point():
            torch.testing.assert_close(shipped[name], fresh[name], rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(shipped[name], fresh[name]), name


def test_without_the_dataset_the_benchmark_is_the_datasets(classifier, monkeypatch, tmp_path):
    """The default per_class and a smaller one (a prefix of each class's draw): the same reference
    features, real images and real-vs-real scores as from the dataset, which is then made unavailable."""
    test = datasets.load("fashion-mnist", "test", classifier.image_size)
    train = datasets.load("fashion-mnist", "train", classifier.image_size)
    expected = {}
    for per_class in (reference.SHIPPED_PER_CLASS, 7):
        real = train.balanced(per_class, seed=1)
        reference_features, _ = embed(classifier, test.balanced(per_class, seed=0).images)
        expected[per_class] = (reference_features, real, score(classifier, real.images, real.labels, reference_features))
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setenv("WADI_FASHION_MNIST", str(empty))
    for per_class, (reference_features, real, real_scores) in expected.items():
        benchmark = Benchmark(classifier, per_class=per_class)
        assert benchmark.reference.dtype == torch.float64 and len(benchmark.reference) == 10 * per_class
        torch.testing.assert_close(benchmark.reference, reference_features, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(benchmark.real.images, real.images, rtol=0, atol=1e-6)
        assert torch.equal(benchmark.real.labels, real.labels) and benchmark.real.classes == real.classes
        for key, value in vars(real_scores).items():
            assert benchmark.real_vs_real[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_beyond_the_shipped_draw_the_dataset_is_named(no_dataset, classifier):
    with pytest.raises(UserError, match=rf"covers --per-class up to {reference.SHIPPED_PER_CLASS}, not 101.*"
                                        "Fashion-MNIST not found.*apt-get install dataset-fashion-mnist"):
        Benchmark(classifier, per_class=reference.SHIPPED_PER_CLASS + 1)
    other = Classifier(image_size=32).eval()  # random weights: another digest
    with pytest.raises(UserError, match=r"features are those of the classifier with digest .*not this one's.*"
                                        "python -m wadi_distill.evaluation.reference.*test split is needed"):
        Benchmark(other, per_class=4)


def test_another_classifier_takes_the_reference_from_the_dataset_and_the_images_from_the_file():
    other = Classifier(image_size=16).eval()
    benchmark = Benchmark(other, per_class=3)
    test = datasets.load("fashion-mnist", "test", 16)
    torch.testing.assert_close(benchmark.reference, embed(other, test.balanced(3, seed=0).images)[0])
    real = datasets.load("fashion-mnist", "train", 16).balanced(3, seed=1)  # what the file's pixels stand for
    torch.testing.assert_close(benchmark.real.images, real.images, rtol=0, atol=1e-6)
    assert torch.equal(benchmark.real.labels, real.labels)


def test_a_damaged_file_falls_back_to_the_dataset(tmp_path, monkeypatch, classifier):
    damaged = tmp_path / "reference_features.safetensors"
    damaged.write_bytes(b"not safetensors")
    monkeypatch.setattr(reference, "SHIPPED_FILE", damaged)
    assert reference.read_shipped() is None
    data = reference.real_data(classifier, 2)
    test = datasets.load("fashion-mnist", "test", classifier.image_size)
    torch.testing.assert_close(data.reference, embed(classifier, test.balanced(2, seed=0).images)[0])
    monkeypatch.setenv("WADI_FASHION_MNIST", str(tmp_path))
    with pytest.raises(UserError, match="missing or damaged.*Fashion-MNIST not found"):
        reference.real_data(classifier, 2)


def test_evaluate_on_a_fresh_machine(no_dataset, tmp_path):
    """The command as a new user runs it, with no dataset installed: a bar on stderr (silenced by
    --quiet), the scores, the KID subset recorded; a subset as large as the sample count refused."""
    out = tmp_path / "scores.json"
    args = ["evaluate", "--per-class", "4", "--steps", "1", "--kid-subset", "10", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sampling" in result.stderr and "40/40" in result.stderr
    assert "KID" in result.stdout and "±" in result.stdout and "40 samples" in result.stdout
    scores = json.loads(out.read_text())
    assert scores["kid_subset"] == 10 and scores["scores"]["kid_std"] > 0 and scores["real_vs_real"]["kid_std"] > 0
    quiet = CliRunner().invoke(app, ["evaluate", "-q", "--per-class", "4", "--steps", "1"])
    assert quiet.exit_code == 0 and "sampling" not in quiet.stderr
    refused = CliRunner().invoke(app, ["evaluate", "--per-class", "4", "--kid-subset", "40"])
    assert refused.exit_code == 2
    assert "error: the KID subset size (40) must be below the sample count (40)" in " ".join(refused.stderr.split())


def test_the_progress_bar_gives_way_to_an_error(capsys):
    """Off a terminal the bar prints its final state once; when sampling fails it prints nothing, so the
    CLI's error stays one line."""
    from wadi_distill.evaluation.benchmark import sampling_progress

    with pytest.raises(RuntimeError):
        with sampling_progress(10) as advance:
            advance(3)
            raise RuntimeError("sampling failed")
    assert capsys.readouterr().err == ""
    with sampling_progress(10) as advance:
        advance(10)
    assert "sampling" in capsys.readouterr().err
    with sampling_progress(10, enabled=False) as advance:
        advance(10)
    assert capsys.readouterr().err == ""
