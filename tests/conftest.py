"""Shared pytest fixtures: the location of ../shared and its reference fixtures."""

import os
import pathlib

import pytest

# Keep tests on the CPU and deterministic, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
FIXTURES_DIR = SHARED_DIR / "fixtures"


def shared_fixture(name: str) -> pathlib.Path:
    """Path of a reference fixture in ../shared/fixtures, or skips the test if it is absent."""
    path = FIXTURES_DIR / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found: clone the repo next to shared/ "
                    "(the team's ../shared folder) to run the parity tests")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"{FIXTURES_DIR} not found: the parity tests need ../shared/fixtures")
    return FIXTURES_DIR
