"""A pytest plugin for llama-cpp-python's own test suite, run offline (``-p lcp_suite_plugin``).

Loaded by tests/test_llama_cpp_python_suite.py into a pytest process that runs
the sdist's ``tests/`` against the installed (patched) llama-cpp-python.

- ``huggingface_hub.hf_hub_download(repo_id, filename)`` is replaced before the
  suite's modules import it: a download named in ``$LOOPCPP_SUITE_MODELS`` (JSON,
  ``{"repo_id/filename": "/path/to/local.gguf"}``) gives that local file; any
  other skips the test that asked for it, naming the model.
- ``$LOOPCPP_SUITE_SKIP`` (JSON, ``{"test name": "reason"}``) skips tests whose
  assertions belong to the original model and not to its substitute.
"""

from __future__ import annotations

import json
import os
from typing import Any

import huggingface_hub
import pytest

SUBSTITUTES: dict[str, str] = json.loads(os.environ.get("LOOPCPP_SUITE_MODELS", "{}"))
SKIPS: dict[str, str] = json.loads(os.environ.get("LOOPCPP_SUITE_SKIP", "{}"))


def offline_hub_download(repo_id: str, filename: str, *args: Any, **kwargs: Any) -> str:
    key = f"{repo_id}/{filename}"
    if key in SUBSTITUTES:
        return SUBSTITUTES[key]
    pytest.skip(f"needs the hub model {key}, which is not available offline here "
                "(no bundled substitute)")


huggingface_hub.hf_hub_download = offline_hub_download


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = SKIPS.get(item.originalname if hasattr(item, "originalname") else item.name)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
