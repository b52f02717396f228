import pytest

from finetune_core.evaluate import classification_metrics, regression_metrics
from finetune_core.plots import plot_confusion, plot_curves


def test_classification_metrics_by_hand():
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # a: P=1, R=2/3, F1=0.8; b: P=1/2, R=1/2, F1=0.5; c: P=1/2, R=1, F1=2/3
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3) / 6)


def test_regression_metrics_by_hand():
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 5])
    assert m["mse"] == pytest.approx(0.25) and m["mae"] == pytest.approx(0.25)
    assert m["r2"] == pytest.approx(1 - 1 / 5)
    assert m["spearman"] == pytest.approx(1.0)
    assert regression_metrics([1, 2, 2, 3], [3, 2, 2, 1])["spearman"] == pytest.approx(-1.0)  # ties share ranks


def test_plots_are_png_files(tmp_path):
    steps = [{"step": s, "loss": 1 / s} for s in range(1, 20)]
    history = [{"step": 10, "loss": 0.3, "accuracy": 0.8}, {"step": 19, "loss": 0.2, "accuracy": 0.9}]
    plot_curves(steps, history, "accuracy", tmp_path / "curves.png")
    plot_confusion([[5, 1], [2, 7]], ["neg", "pos"], tmp_path / "cm.png")
    for name in ("curves.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
