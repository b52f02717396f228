"""Rebuild tests/assets from the full data sets: `python tests/assets/make_assets.py DATA_DIR`.

hymenoptera: the first PER_CLASS photos of each class (sorted by file name) in train/ and val/,
downscaled to a longest side of 256 px and saved as JPEG quality 85. mnist_png_small and digits:
copied byte for byte.

DATA_DIR is the folder holding hymenoptera/, mnist_png_small/ and digits/ (README.md beside this file).
"""

import shutil
import sys
from pathlib import Path

from PIL import Image

PER_CLASS = 30
LONGEST_SIDE = 256
HERE = Path(__file__).resolve().parent


def main(source: Path) -> None:
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            target = HERE / "hymenoptera" / split / label
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for file in sorted((source / "hymenoptera" / split / label).iterdir())[:PER_CLASS]:
                with Image.open(file) as image:
                    image = image.convert("RGB")
                    image.thumbnail((LONGEST_SIDE, LONGEST_SIDE), Image.Resampling.LANCZOS)
                    image.save(target / f"{file.stem}.jpg", quality=85)
    for name in ("mnist_png_small", "digits"):
        shutil.rmtree(HERE / name, ignore_errors=True)
        shutil.copytree(source / name, HERE / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
