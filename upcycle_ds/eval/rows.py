"""Evaluation rows: what each row asks for, checked before any model is loaded.

A row is a JSON object (a line of a .jsonl file, or a row of any file `upcycle-ds train` reads) with an optional
`task` name (rows are reported per task and overall) and one of:

- **choice** (`choices` + `answer`): the prompt is `messages` (chat turns; the model answers next) or `prompt`;
  `choices` is a list of strings, `answer` the index of the right one or its text. Each choice is scored by the
  log-likelihood of the full assistant answer (its tokens and the end-of-turn text the chat template puts after it,
  as `upcycle-ds train` labels a response); the prediction is the most likely choice.
- **generate** (`ideal`: a string or a list of accepted strings): greedy decoding after the prompt, exact match after
  normalisation (surrounding whitespace, quotes and one trailing period stripped, case-insensitive). The
  log-likelihood of the (first) ideal answer is reported too, as a per-token NLL (a continuous score that a paired
  test can compare).
- **loss** (no `choices` / `ideal`): a training row — `text`, `messages` with assistant turns, or
  `prompt` + `response` — scored by its LM loss on exactly the tokens `upcycle-ds train` would put the loss on.

A row with both `choices` and `ideal` gets both scores. Inputs are built by `upcycle_ds.data` (the renderer,
tokenizer and packing of training), so the loss of a training-format row is the trainer's eval loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from .. import checks

Mode = Literal["auto", "loss", "choice", "generate"]


@dataclass(kw_only=True)
class EvalRow:
    index: int
    task: str
    kinds: list[str] = field(default_factory=list)  # subset of ["loss", "choice", "generate"]
    prompt_messages: list[dict] | None = None
    prompt: str | None = None
    choices: list[str] | None = None
    answer: int | None = None
    ideals: list[str] | None = None
    train_row: dict | None = None  # loss rows: the row as `upcycle-ds train` reads it

    def completion_row(self, answer: str) -> dict:
        """The prompt + `answer` as a training-format row (the loss then falls on the answer only)."""
        if self.prompt_messages is not None:
            return {"messages": self.prompt_messages + [{"role": "assistant", "content": answer}]}
        return {"prompt": self.prompt, "response": answer}


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_row(row: dict, index: int, mode: Mode, source: str) -> EvalRow:
    where = f"{source} row {index}"
    task = row.get("task")
    r = EvalRow(index=index, task=str(task) if task is not None else "all")
    has_task_fields = row.get("choices") is not None or row.get("ideal") is not None
    if has_task_fields:
        if row.get("messages") is not None:
            r.prompt_messages = _messages(row["messages"], where)
            if r.prompt_messages[-1]["role"] == "assistant":
                raise UserError(f"{where}: with 'choices'/'ideal' the 'messages' are the prompt; the last turn must "
                                f"not be the assistant's")
        elif isinstance(row.get("prompt"), str):
            r.prompt = row["prompt"]
        else:
            raise UserError(f"{where}: a 'choices'/'ideal' row needs its prompt in 'messages' or 'prompt'")
    if row.get("choices") is not None:
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: 'choices' must be a list of at least 2 strings")
        ans = row.get("answer")
        if isinstance(ans, bool) or not (isinstance(ans, int) and 0 <= ans < len(choices) or ans in choices):
            raise UserError(f"{where}: 'answer' must be an index into 'choices' or one of them (got {ans!r})")
        r.choices, r.answer = choices, ans if isinstance(ans, int) else choices.index(ans)
        r.kinds.append("choice")
    if row.get("ideal") is not None:
        ideal = row["ideal"]
        ideals = ideal if isinstance(ideal, list) else [ideal]
        if not ideals or not all(isinstance(i, (str, int, float)) and not isinstance(i, bool) for i in ideals):
            raise UserError(f"{where}: 'ideal' must be a string or a list of strings")
        r.ideals = [str(i) for i in ideals]
        r.kinds.append("generate")
    if not has_task_fields:
        if not any(row.get(k) is not None for k in ("text", "messages", "prompt")):
            raise UserError(f"{where}: needs 'choices'+'answer', 'ideal', or a training row ('text', 'messages', "
                            f"'prompt'+'response')")
        r.train_row = {k: row[k] for k in ("text", "messages", "prompt", "response", "completion")
                       if row.get(k) is not None}
        r.kinds.append("loss")
    if mode != "auto":
        if mode not in r.kinds:
            raise UserError(f"{where}: --mode {mode} needs {_NEEDS[mode]}; this row has {sorted(row)}")
        r.kinds = [mode]
    return r


_NEEDS = {"loss": "a training row without 'choices'/'ideal'", "choice": "'choices' + 'answer'", "generate": "'ideal'"}


def load_rows(path: str, mode: Mode = "auto", max_rows: int | None = None) -> list[EvalRow]:
    """Every row of `path` (any format `upcycle-ds train` reads), checked; the first `max_rows` of each task if
    asked."""
    out, per_task = [], {}
    for i, row in enumerate(read_any(path)):
        r = parse_row(row, i, mode, path)
        if max_rows is not None:
            per_task[r.task] = per_task.get(r.task, 0) + 1
            if per_task[r.task] > max_rows:
                continue
        out.append(r)
    return out


def read_any(path: str) -> list[dict]:
    """A .jsonl file is read line by line (rows may differ in type: `ideal` a string here, a list there); any other
    format through `upcycle_ds.data.read_rows` (json, parquet, arrow, save_to_disk dirs)."""
    import json
    from pathlib import Path

    from ..data import read_rows

    p = Path(path)
    if p.suffix.lower() != ".jsonl":
        return read_rows(path).to_list()
    if not p.is_file():
        raise checks.data_file_missing_error(path)
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n}: expected a JSON object")
            rows.append(row)
    if not rows:
        raise checks.no_rows_error(path)
    return rows


def normalise(s: str) -> str:
    """Exact-match normalisation: strip whitespace, surrounding quotes/backticks and one trailing period; lower-case."""
    s = s.strip().strip("\"'`").strip()
    if s.endswith("."):
        s = s[:-1]
    return s.strip().lower()
