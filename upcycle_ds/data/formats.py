"""The one table of row formats. Every stage (train, sft, seed-data, router-init, eval) reads rows through it.

A row format is a set of columns that must all be present (non-null) in a row, plus a function turning such a row
into one of four canonical samples:

- `Chat(messages)`: rendered with the tokenizer's chat template; loss on the assistant turns.
- `Pair(prompt, response)`: one user/assistant exchange; a chat when the tokenizer has a template
  (`prompt_format="auto"`), else plain ``prompt + response`` text + EOS; loss on the response.
- `Text(text)`: plain language modelling, loss on every token, EOS appended.
- `Tokens(input_ids, labels)`: pre-tokenised; used as given (labels: -100 = no loss, else equal to the input id;
  no labels = loss on every token).

A row is read with the first format of `FORMATS` whose columns it has. The column check (`check_columns`) and every
"which columns?" error text are derived from the table, so a new format is one `RowFormat(...)` line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Chat:
    messages: list[dict]


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Tokens:
    input_ids: list[int]
    labels: list[int] | None


Sample = Chat | Pair | Text | Tokens


class RowError(ValueError):
    """A row has a format's columns but bad values (wrong types, empty chat, ...)."""


def _str(row: dict, col: str) -> str:
    v = row[col]
    if not isinstance(v, str):
        raise RowError(f"'{col}' must be a string (got {type(v).__name__})")
    return v


def _content(x, where: str) -> str:
    """A message content: a string, or a list of parts [{"type": "text", "text": ...}] (joined)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in x):
        return "".join(p["text"] for p in x)
    raise RowError(f"{where}: content must be a string or a list of {{'type': 'text', 'text': str}} parts")


def _chat_list(v, col: str) -> list[dict]:
    if not isinstance(v, list) or not v or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   for m in v):
        raise RowError(f"'{col}' must be a non-empty list of {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": _content(m.get("content"), f"'{col}'[{i}]")} for i, m in enumerate(v)]


def _messages(row: dict) -> Sample:
    return Chat(_chat_list(row["messages"], "messages"))


def _prompt_with(response_col: str) -> Callable[[dict], Sample]:
    return lambda row: Pair(_str(row, "prompt"), _str(row, response_col))


def _alpaca(row: dict) -> Sample:
    prompt, extra = _str(row, "instruction"), row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError("'input' of an instruction/output row must be a string")
    if extra and extra.strip():
        prompt += "\n\n" + extra
    return Pair(prompt, _str(row, "output"))


def _evals(row: dict) -> Sample:
    ideal = row["ideal"]
    if isinstance(ideal, list):  # several acceptable answers: the first is the target
        ideal = ideal[0] if ideal else None
    if not isinstance(ideal, str):
        raise RowError("'ideal' must be a string or a non-empty list of strings")
    if isinstance(row["input"], str):
        return Pair(row["input"], ideal)
    return Chat(_chat_list(row["input"], "input") + [{"role": "assistant", "content": ideal}])


def _text(row: dict) -> Sample:
    return Text(_str(row, "text"))


def _int_list(v, col: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise RowError(f"'{col}' must be a non-empty list of ints")
    return v


def _tokens(row: dict) -> Sample:
    ids = _int_list(row["input_ids"], "input_ids")
    labels = row.get("labels")
    if labels is not None:
        labels = _int_list(labels, "labels")
        if len(labels) != len(ids):
            raise RowError(f"'labels' has {len(labels)} entries, 'input_ids' {len(ids)}")
    return Tokens(ids, labels)


@dataclass(frozen=True)
class RowFormat:
    name: str
    columns: tuple[str, ...]
    """Required: all present and non-null in the row."""
    optional: tuple[str, ...]
    """Read when present."""
    doc: str
    parse: Callable[[dict], Sample]

    def describe(self) -> str:
        cols = "+".join(f"'{c}'" for c in self.columns)
        return cols + (f" (+{'/'.join(repr(c) for c in self.optional)})" if self.optional else "")


FORMATS: tuple[RowFormat, ...] = (
    RowFormat("messages", ("messages",), (), "chat list of {role, content}; loss on every assistant turn",
              _messages),
    RowFormat("prompt_response", ("prompt", "response"), (), "one exchange; loss on the response",
              _prompt_with("response")),
    RowFormat("prompt_completion", ("prompt", "completion"), (), "as prompt/response", _prompt_with("completion")),
    RowFormat("alpaca", ("instruction", "output"), ("input",),
              "Alpaca: prompt = instruction (+ blank line + input); loss on the output", _alpaca),
    RowFormat("evals", ("input", "ideal"), (),
              "OpenAI evals: input = chat list (or prompt string), ideal = the answer (first if a list)", _evals),
    RowFormat("text", ("text",), (), "plain text; loss on every token", _text),
    RowFormat("tokens", ("input_ids",), ("labels",),
              "pre-tokenised ids (labels: -100 = no loss, else the input id; none = loss everywhere)", _tokens),
)



def formats_help() -> str:
    """One line naming every accepted column set, for error messages and --help."""
    return "; ".join(f.describe() for f in FORMATS)


def format_of(row: dict) -> RowFormat | None:
    """The first format whose required columns are all non-null in `row`."""
    for f in FORMATS:
        if all(row.get(c) is not None for c in f.columns):
            return f
    return None


def parse_row(row: dict, where: str) -> Sample:
    """The canonical sample of a row; UserError naming `where` (e.g. "data.jsonl row 3") on a bad row."""
    f = format_of(row)
    if f is None:
        found = sorted(k for k, v in row.items() if v is not None)
        raise UserError(f"{where}: fits no row format (needs {formats_help()}); found columns {found}")
    try:
        return f.parse(row)
    except RowError as e:
        raise UserError(f"{where}: {e}") from None


def usable_formats(columns) -> list[RowFormat]:
    cols = set(columns)
    return [f for f in FORMATS if set(f.columns) <= cols]


def read_columns(columns) -> list[str]:
    """The columns the table can read, in a stable order (everything else in a row is ignored)."""
    cols = set(columns)
    out: list[str] = []
    for f in FORMATS:
        out += [c for c in f.columns + f.optional if c in cols and c not in out]
    return out


def check_columns(ds, source: str, *, row_ids=None, batch_size: int = 65536) -> None:
    """Fail fast (UserError naming the first bad row) unless every row of `ds` (a datasets.Dataset) fits a format.
    `row_ids[i]`: the source row number of ds's row i, for the message (ds = a selection of the source's rows).

    Vectorised over Arrow record batches (no Python row objects), so it is cheap on millions of rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    usable = usable_formats(ds.column_names)
    if not usable:
        raise UserError(f"{source}: rows fit no row format (needs {formats_help()}); found columns "
                        f"{sorted(ds.column_names)}")
    needed = sorted({c for f in usable for c in f.columns})
    base = 0
    for table in ds.select_columns(needed).with_format("arrow").iter(batch_size=batch_size):
        ok = None
        for f in usable:
            fits = None
            for c in f.columns:
                v = pc.is_valid(table[c])
                fits = v if fits is None else pc.and_(fits, v)
            ok = fits if ok is None else pc.or_(ok, fits)
        if not pc.all(ok).as_py():
            i = pc.index(ok, pa.scalar(False)).as_py()
            row = ds[base + i]
            found = sorted(k for k, v in row.items() if v is not None)
            rid = base + i if row_ids is None else int(row_ids[base + i])
            raise UserError(f"{source} row {rid}: fits no row format (needs {formats_help()}); found columns "
                            f"{found}")
        base += table.num_rows
