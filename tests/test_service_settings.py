"""The FINETUNE_SERVE_* settings: read and validated in service/settings.py only, documented from there."""

from __future__ import annotations

import re

import pytest
from service_helpers import REPO

from service import settings as service_settings
from service.settings import Settings, SettingsError, env_name, markdown_table


@pytest.fixture
def fresh(monkeypatch):
    """settings() read anew from this test's environment, and forgotten after it."""
    service_settings.settings.cache_clear()
    yield monkeypatch
    service_settings.settings.cache_clear()


def test_defaults(fresh):
    for name in Settings.model_fields:
        fresh.delenv(env_name(name), raising=False)
    defaults = service_settings.settings()
    assert (defaults.api_workers, defaults.max_batch, defaults.max_wait_ms, defaults.ort_threads) == (1, 32, 0, 2)
    assert defaults.api_key is None and defaults.ort_spinning is False and defaults.train_nice == 10
    assert defaults.max_upload_bytes == 100 * 2**20


def test_values_come_from_the_environment(fresh):
    fresh.setenv("FINETUNE_SERVE_API_WORKERS", "3")
    fresh.setenv("FINETUNE_SERVE_ORT_SPINNING", "1")
    fresh.setenv("FINETUNE_SERVE_MAX_UPLOAD_MB", "0.5")
    fresh.setenv("FINETUNE_SERVE_API_KEY", "s3cret")
    read = service_settings.settings()
    assert read.api_workers == 3 and read.ort_spinning is True and read.max_upload_bytes == 2**19
    assert read.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(read)


@pytest.mark.parametrize("name, value, says", [
    ("FINETUNE_SERVE_API_WORKERS", "two", "a whole number >= 1 and <= 64"),
    ("FINETUNE_SERVE_API_WORKERS", "0", "a whole number >= 1 and <= 64"),
    ("FINETUNE_SERVE_MAX_WAIT_MS", "-1", "a number >= 0 and <= 10000"),
    ("FINETUNE_SERVE_MAX_UPLOAD_MB", "0", "a number > 0"),
    ("FINETUNE_SERVE_ORT_SPINNING", "sometimes", "0 or 1"),
    ("FINETUNE_SERVE_TRAIN_NICE", "20", "<= 19"),
])
def test_a_bad_value_is_one_error_naming_the_variable_and_what_it_allows(fresh, name, value, says):
    fresh.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        service_settings.settings()
    assert str(err.value).startswith(f"{name}={value!r}: ") and says in str(err.value)


def test_the_readme_table_is_the_rendered_one():
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", readme, re.S)
    assert found, "README.md has no <!-- settings-table --> block"
    assert found.group(1) == markdown_table(), "re-render it: python -c 'from service.settings import *; print(markdown_table())'"


def test_only_settings_reads_the_variables():
    for path in (REPO / "service").rglob("*.py"):
        if path.name != "settings.py":
            assert not re.search(r"""["']FINETUNE_SERVE_""", path.read_text()), path
