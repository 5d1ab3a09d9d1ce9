"""What a user sees of the CLI itself: one vocabulary across subcommands (dtype spellings, the micro-batch flag, the
row-limit flag, `--data`), old spellings still accepted but not shown, `--help` that keeps the description as
written and prints each default once, required flags shown as required, `--version`. All in-process: parsing only."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import typing

import pytest

from upcycle_ds.cli import COMMANDS, main
from upcycle_ds.cli_args import cli_fields, field_docs, parse_into

DTYPES = {"auto", "bf16", "fp32", "fp16"}
OLD_SPELLINGS = ("--batch-size", "--max-samples", "--max-rows-per-task", "--calib-samples", "--input", "--output",
                 "--seq-len", "--gradient-checkpointing")


def args_class(name: str):
    return importlib.import_module(COMMANDS[name][0]).Args


def help_text(name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([name, "--help"]) == 0
    return out.getvalue()


def option_blocks(text: str) -> dict[str, str]:
    """--help's options section: flag -> its help text (whitespace squashed)."""
    blocks, flag = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"  (--[a-z0-9-]+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = line
        elif flag:
            blocks[flag] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_keeps_the_description_and_prints_each_default_once(name):
    text = help_text(name)
    described = importlib.import_module(COMMANDS[name][0]).__doc__ or COMMANDS[name][1]
    for line in described.strip().splitlines():  # line breaks, indented examples: as written
        assert line.rstrip() in text.splitlines(), (name, line)
    blocks = option_blocks(text)
    docs = field_docs(args_class(name))
    for f in cli_fields(args_class(name)):
        block = blocks["--" + f.name.replace("_", "-")]
        assert "(default: None)" not in block and block.count("(default:") <= 1, (name, block)
        if re.search(r"\(default|\bdefault:", docs.get(f.name, ""), re.IGNORECASE):
            assert block.lower().count("default:") == docs[f.name].lower().count("default:"), (name, block)
    for old in OLD_SPELLINGS + (("--seed-data",) if name == "router-init" else ()):  # accepted (below), not shown
        assert old + " " not in text and old + "\n" not in text, (name, old)


def test_named_defaults_are_printed_once():
    blocks = option_blocks(help_text("train"))
    for flag in ("--capacity-factor", "--wandb-mode", "--max-steps", "--data-cache", "--peak-tflops"):
        assert "(default: None)" not in blocks[flag] and blocks[flag].lower().count("default") == 1, blocks[flag]
    assert blocks["--fused-adam"].endswith("(default: on)")  # a text that mentions a default but not its own


def test_required_flags_show_as_required_in_the_usage_line():
    usage = " ".join(help_text("convert").split("\n\n", 1)[0].split())
    assert "[--verbose] --model MODEL --out OUT --to {hf-moe,hf-dense,ds} [--" in usage, usage
    for name in COMMANDS:
        usage = " ".join(help_text(name).split("\n\n", 1)[0].split())
        for f in cli_fields(args_class(name)):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert f"[--{f.name.replace('_', '-')} " not in usage, (name, f.name)


def test_version(capsys):
    from upcycle_ds import __version__

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"upcycle-ds {re.escape(__version__)} \(torch \S+, deepspeed \S+, transformers \S+, "
                        rf"python 3\.\d+\.\d+\)\n", out), out
    assert main(["-V"]) == 0 and capsys.readouterr().out == out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_one_vocabulary(name):
    """Every dtype flag spells bf16 | fp32 | fp16 | auto; a micro batch is `--micro-batch-size`; a row limit is
    `--max-rows` (or `--calib-max-rows`); `--data` of training data is a source list."""
    cls = args_class(name)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in cli_fields(cls)}
    if name in ("train", "sft", "upit", "seed-data"):
        assert hints["data"] == list[str], (name, hints["data"])
    if name == "router-init":
        assert hints["data"] == list[str] | None  # the seed data; optional with --mode hidden
    for f in cli_fields(cls):
        if f.name.endswith("dtype"):
            assert set(typing.get_args(hints[f.name])) <= DTYPES, (name, f.name, hints[f.name])
    assert not names & {"batch_size", "max_samples", "max_rows_per_task", "calib_samples", "seq_len"}, (name, names)


@pytest.mark.parametrize("name,argv,field,want", [
    ("eval", ["--model", "m", "--data", "d", "--batch-size", "3"], "micro_batch_size", 3),
    ("eval", ["--model", "m", "--data", "d", "--max-rows-per-task=5"], "max_rows", 5),
    ("convert", ["--input", "a", "--output", "b", "--to", "ds", "--calib-samples", "7"], "calib_max_rows", 7),
    ("convert", ["--input=a", "--out", "b", "--to", "ds"], "model", "a"),
    ("plan", ["--model", "m", "--seq-len", "64"], "max_length", 64),
    ("train", ["--model", "m", "--data", "d", "--out", "o", "--gradient-checkpointing"], "activation_checkpointing",
     True),
    ("train", ["--model", "m", "--data", "d", "--out", "o", "--no-gradient-checkpointing"],
     "activation_checkpointing", False),
    ("train", ["--model", "m", "--data", "d", "--out", "o", "--max-samples", "9"], "max_rows", 9),
    ("router-init", ["--model", "m", "--out", "o", "--seed-data", "s.jsonl"], "data", ["s.jsonl"]),
])
def test_old_spellings_are_accepted(name, argv, field, want):
    args = parse_into(args_class(name), argv, prog=f"upcycle-ds {name}", description="")
    assert getattr(args, field) == want


def test_old_spellings_in_a_config_file(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: [m]\ndata: d\nbatch_size: 4\nmax_rows_per_task: 2\n")
    args = parse_into(args_class("eval"), ["--config", str(cfg)], prog="upcycle-ds eval", description="")
    assert (args.micro_batch_size, args.max_rows) == (4, 2)


@pytest.mark.parametrize("name,argv,field,want", [
    ("seed-data", ["--experts", "e", "--data", "d", "--out", "o", "--dtype", "bfloat16"], "dtype", "bf16"),
    ("seed-data", ["--experts", "e", "--data", "d", "--out", "o", "--dtype=float16"], "dtype", "fp16"),
])
def test_old_values_are_accepted(name, argv, field, want, capsys):
    assert getattr(parse_into(args_class(name), argv, prog=name, description=""), field) == want
    with pytest.raises(SystemExit):
        parse_into(args_class(name), argv[:6] + ["--dtype", "float64"], prog=name, description="")
    assert "invalid choice: 'float64' (choose from 'fp32', 'bf16', 'fp16', 'auto')" in capsys.readouterr().err


def test_old_spellings_in_an_upit_recipe_and_its_done_stages(tmp_path):
    """A recipe section may use old spellings; a stage DONE with old spellings (or with --data a string, before it
    became a source list) is not redone for them, only for a real change of value."""
    from upcycle_ds.errors import UserError
    from upcycle_ds.upit.recipe import Recipe, _compare, canonical_settings

    recipe = Recipe(args_class("upit")(model="m", data=["d"], out=str(tmp_path / "r"),
                                       seed_data={"batch_size": 4, "dtype": "float32"}))
    now = recipe.config("seed_data")
    assert (now["micro_batch_size"], now["dtype"], now["data"]) == (4, "fp32", ["d"]) and "batch_size" not in now
    done = {"data": "d", "seed": 0, "batch_size": 16, "dtype": "float32"}  # recorded before the renames
    _compare("seed_data", canonical_settings(done, recipe.classes["seed_data"]), now)  # batch size: speed only
    with pytest.raises(UserError, match="DONE with dtype='bf16', the recipe now says 'fp32'"):
        _compare("seed_data", canonical_settings({**done, "dtype": "bfloat16"}, recipe.classes["seed_data"]), now)


def test_a_required_flag_given_nowhere_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_into(args_class("convert"), ["--input", "a", "--to", "ds"], prog="upcycle-ds convert", description="")
    assert e.value.code == 2
    assert capsys.readouterr().err == ("upcycle-ds convert: error: the following arguments are required: --out "
                                       "(see upcycle-ds convert --help)\n")


def test_verbose_reaches_the_processes_a_command_starts(monkeypatch):
    """--verbose (any subcommand) is handed on in the environment: the launcher then runs without --quiet, and the
    ranks it starts let the libraries' messages through (shown end to end by tests/test_train.py's logs test)."""
    from upcycle_ds.library_logs import VERBOSE_ENV, launcher_flags

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert launcher_flags() == ["--quiet"]
    parse_into(args_class("eval"), ["--model", "m", "--data", "d", "--verbose"], prog="upcycle-ds eval",
               description="")
    assert os.environ[VERBOSE_ENV] == "1" and launcher_flags() == []


def test_sft_offers_no_moe_flags(capsys):
    """sft trains a dense model: none of train's MoE-only flags (they keep their defaults)."""
    from upcycle_ds.upit.sft import SFTConfig

    text = help_text("sft")
    for flag in ("--ep-size", "--num-experts", "--top-k", "--layers", "--capacity-factor", "--expert-impl",
                 "--aux-loss-coef", "--aux-loss-scope", "--z-loss-coef", "--heatmap-every", "--collapse-factor",
                 "--collapse-steps", "--wandb-expert-shares-max"):
        assert flag + " " not in text and flag + "\n" not in text, flag
        assert flag in help_text("train")
    assert {"--lr", "--micro-batch-size", "--max-rows", "--save-every-epochs"} <= set(option_blocks(text))
    args = parse_into(SFTConfig, ["--model", "m", "--data", "d", "--out", "o"], prog="upcycle-ds sft", description="")
    assert (args.ep_size, args.aux_loss_coef) == (1, 0.01)


def test_a_subclass_can_withhold_inherited_flags(tmp_path, capsys):
    """`NOT_FLAGS`: not offered (not in --help, refused as a flag), default kept, still settable by --config (the
    launcher hands every setting to its ranks that way). `sft` uses it for the MoE-only training flags."""
    @dataclasses.dataclass(kw_only=True)
    class Base:
        out: str
        """Where."""
        ep_size: int = 1
        """MoE only."""

    @dataclasses.dataclass(kw_only=True)
    class Dense(Base):
        NOT_FLAGS: typing.ClassVar[frozenset[str]] = frozenset({"ep_size"})

    with pytest.raises(SystemExit):
        parse_into(Dense, ["--help"], prog="dense", description="")
    assert "--ep-size" not in capsys.readouterr().out
    assert parse_into(Dense, ["--out", "o"], prog="dense", description="").ep_size == 1
    with pytest.raises(SystemExit):
        parse_into(Dense, ["--out", "o", "--ep-size", "2"], prog="dense", description="")
    assert "unrecognized arguments: --ep-size 2" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: o\nep_size: 1\n")
    assert parse_into(Dense, ["--config", str(cfg)], prog="dense", description="").ep_size == 1


def test_a_run_recorded_with_old_spellings_resumes_with_new_ones(tmp_path):
    """OUT/train_args.yaml written before the renames: read back under today's names (so --resume compares
    --max-rows with the recorded --max-samples instead of refusing or ignoring it)."""
    from upcycle_ds.train.config import TrainArgs
    from upcycle_ds.train.resume import read_record

    record = tmp_path / "train_args.yaml"
    record.write_text("data: [d.jsonl]\nmax_samples: 5\ngradient_checkpointing: true\n")
    assert read_record(record, TrainArgs) == {"data": ["d.jsonl"], "max_rows": 5, "activation_checkpointing": True}
