"""Session-wide test fixtures: the photo corpus and the real services the suite runs on."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Hand over the real photo corpus folder, or skip where this checkout has none.

    The folder is `GALLERY_CORPUS_DIR`, by default `../shared/corpus` beside the repository.
    CI always has it, so there a missing folder fails the test instead of skipping it.
    """
    path = Path(os.environ.get("GALLERY_CORPUS_DIR", REPO_ROOT.parent / "shared" / "corpus"))
    if path.is_dir():
        return path
    message = f"photo corpus not found at {path}; set GALLERY_CORPUS_DIR to its folder"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
