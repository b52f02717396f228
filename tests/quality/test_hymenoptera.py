"""Quality bar on the full hymenoptera set: `make quality DATA_DIR=<folder holding hymenoptera/>`.

ants vs bees, all 245 train and 153 val photos (46 MB, too big for the repo), the real EfficientNet-Lite0
weights, no hyperparameter given (the task's defaults and auto values): validation accuracy >= 0.93. The folder comes
from FINETUNE_SERVE_QUALITY_DATA, which `make quality` sets from DATA_DIR; without it the test fails
rather than skips, so a quality run cannot pass by running nothing.
"""

import json
import os
from pathlib import Path

import pytest

from finetune_core.config import config_from_dict
from finetune_core.pipeline import run_training

pytestmark = pytest.mark.slow

DATA_ENV = "FINETUNE_SERVE_QUALITY_DATA"


@pytest.fixture
def hymenoptera() -> Path:
    folder = Path(os.environ.get(DATA_ENV, "")) / "hymenoptera"
    if DATA_ENV not in os.environ or not (folder / "train").is_dir() or not (folder / "val").is_dir():
        pytest.fail(f"the full hymenoptera set is needed at {folder} (train/ and val/); "
                    "run `make quality DATA_DIR=<folder holding hymenoptera/>` (README, \"Quick start\")")
    return folder


def test_hymenoptera_reaches_093_validation_accuracy(hymenoptera, tmp_path):
    """Photos at the model's size: the defaults train the head of the frozen ImageNet network."""
    cfg = config_from_dict({"data": {"train": str(hymenoptera), "task": "image-classification"}})
    metrics = run_training(cfg, tmp_path / "run")
    print("hymenoptera", {k: metrics["validation"][k] for k in ("accuracy", "macro_f1")}, metrics["train"])
    assert metrics["validation"]["n"] == 153 and metrics["test"] is None
    assert metrics["validation"]["accuracy"] >= 0.93, metrics["validation"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows"] == {"train": 245, "validation": 153}
    assert report["auto"]["model.freeze"]["value"] == "all-but-head" and report["auto"]["data.augment"]["value"] is True


def test_the_bundled_weights_name_ants_and_bees_zero_shot(hymenoptera):
    """ImageNet's own "ant" (310) and "bee" (309) as top-1 on all 153 val photos: 128 measured (83.7%)."""
    import torch

    from finetune_core import images as I
    from finetune_core.image_model import build_image_model, bundled_lite0

    model = bundled_lite0().eval()
    spec = build_image_model("default", 2)[1]
    files = {label: sorted((hymenoptera / "val" / folder).iterdir()) for label, folder in ((310, "ants"), (309, "bees"))}
    expected = [label for label, paths in files.items() for _ in paths]
    with torch.no_grad():
        top1 = model(torch.from_numpy(I.pixel_values([str(p) for paths in files.values() for p in paths], spec))).argmax(-1)
    hits = sum(int(t) == e for t, e in zip(top1, expected))
    assert len(expected) == 153 and hits >= 122, hits  # 0.80; a random network would hit about 0
