"""`upcycle-ds eval` against independent references: transformers' own models run one row at a time, unpacked and
unbatched (loss, choice log-likelihoods, greedy generation), for a dense Llama and a Mixtral MoE; the statistics
against textbook values; bad input as one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny import make_dense, make_moe, make_tokenizer

from upcycle_ds.cli import main
from upcycle_ds.eval import stats

TEXTS = ["def f(x):\n    return x + 1\n", "import os", "print('hello, world')\n" * 3, "a = [1, 2, 3]"]
PROMPTS = [[{"role": "user", "content": "Is 7 odd? Answer Yes or No"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}],
           [{"role": "user", "content": "Capital of France?"}]]
CHOICES = [["Yes", "No"], ["4", "5", "22"], ["Paris", "Lyon"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    out = {"dense": make_dense("llama", root / "dense", seed=1), "moe": make_moe("mixtral", root / "moe", seed=2)}
    for p in out.values():
        make_tokenizer(p)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    rows = [{"task": "lm", "text": t} for t in TEXTS]
    rows += [{"task": "lm", "messages": p + [{"role": "assistant", "content": c[0]}]} for p, c in zip(PROMPTS, CHOICES)]
    rows += [{"task": "mc", "messages": p, "choices": c, "answer": i % len(c)} for i, (p, c) in
             enumerate(zip(PROMPTS, CHOICES))]
    rows += [{"task": "mc", "prompt": "Say hi:", "choices": ["hi", "bye"], "answer": "bye"}]
    path = d / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def run_eval(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def reference(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


@torch.no_grad()
def logprob_of(model, prefix: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prefix + answer])
    logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(answer))


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_loss_and_choices_match_unpacked_transformers(capsys, models, data, tmp_path, which):
    path, rows = data
    out = tmp_path / "r.json"
    rc, stdout, err = run_eval(capsys, "--model", f"m={models[which]}", "--data", path, "--out", out,
                               "--max-length", 128, "--micro-batch-size", 2)
    assert rc == 0, err
    res = json.loads(out.read_text())["models"]["m"]
    ex = res["examples"]
    model, tok = reference(models[which])
    # text rows: BOS + text + EOS, loss on every token after the first
    for e, text in zip(ex, TEXTS):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        assert e["tokens"] == len(ids) - 1
        assert e["nll"] == pytest.approx(-logprob_of(model, ids[:1], ids[1:]), abs=2e-4)
    # chat rows with an assistant turn: the loss is on the answer + the template's end of turn (</s>)
    for e, p, c in zip(ex[len(TEXTS):], PROMPTS, CHOICES):
        prefix = tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        answer = tok(c[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert e["tokens"] == len(answer)
        assert e["nll"] == pytest.approx(-logprob_of(model, prefix, answer), abs=2e-4)
    lm = [e for e in ex if "nll" in e]
    assert res["metrics"]["tasks"]["lm"]["loss"]["value"] == pytest.approx(
        sum(e["nll"] for e in lm) / sum(e["tokens"] for e in lm), rel=1e-12)
    # choices: every choice's log-likelihood, the prediction is the most likely one
    mc = [e for e in ex if "choice_logprobs" in e]
    assert len(mc) == 4
    for e, p, c in zip(mc, PROMPTS, CHOICES):
        prefix = tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        want = [logprob_of(model, prefix, tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for x in c]
        assert e["choice_logprobs"] == pytest.approx(want, abs=2e-4)
        assert e["choice_pred"] == max(range(len(want)), key=want.__getitem__)
    assert mc[-1]["answer"] == 1  # "answer": "bye" -> index into choices
    acc = sum(e["choice_ok"] for e in mc) / 4
    assert res["metrics"]["tasks"]["mc"]["choice_acc"] == {"value": acc, "se": math.sqrt(acc * (1 - acc) / 4), "n": 4}
    assert "| loss | all |" in stdout and "| choice_acc | mc |" in stdout


def test_generation_matches_transformers_generate_and_paired_tests(capsys, models, tmp_path):
    model, tok = reference(models["dense"])
    want = []
    for p in PROMPTS:  # the reference: each prompt alone, no padding
        ids = tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        want.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    rows = [{"task": "t", "messages": p, "ideal": [w.upper() + ".", "x"] if i == 0 else "no such answer"}
            for i, (p, w) in enumerate(zip(PROMPTS, want))]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g.json"
    rc, stdout, err = run_eval(capsys, "--model", f"dense={models['dense']}", f"moe={models['moe']}", "--data", path,
                               "--out", out, "--max-new-tokens", 6, "--micro-batch-size", 3)
    assert rc == 0, err
    res = json.loads(out.read_text())
    ex = res["models"]["dense"]["examples"]
    assert [e["generation"] for e in ex] == want  # batched with left padding == one prompt at a time
    assert [e["exact_match"] for e in ex] == [True, want[1].strip().lower() == "no such answer", False]
    tests = {t["metric"]: t for t in res["comparisons"]["moe"] if t["task"] == "all"}
    assert set(tests) == {"exact_match", "answer_nll"}
    d = [m - a for a, m in zip((e["answer_nll"] for e in ex),
                               (e["answer_nll"] for e in res["models"]["moe"]["examples"]))]
    assert tests["answer_nll"]["diff"] == pytest.approx(sum(d) / 3, rel=1e-9)
    assert "moe - dense" in stdout


def test_statistics_against_textbook_values():
    assert stats.t_two_sided_p(2.0, 10) == pytest.approx(0.0733880, abs=1e-6)  # t table
    assert stats.t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=1e-4)
    assert stats.t_two_sided_p(1.959964, 1e7) == pytest.approx(0.05, abs=1e-5)
    m = stats.mcnemar([True] * 5 + [False] * 3, [False] * 5 + [False, True, False])
    assert (m["only_a"], m["only_b"]) == (5, 1) and m["p"] == pytest.approx(2 * 7 / 64)  # 2 P(X <= 1), X~B(6, .5)
    r = stats.ratio([2.0, 6.0, 3.0], [1, 2, 2])
    assert r["value"] == pytest.approx(11 / 5)
    var = sum((s - 2.2 * c) ** 2 for s, c in [(2, 1), (6, 2), (3, 2)]) / (3 * 2)
    assert r["se"] == pytest.approx(math.sqrt(var) / (5 / 3))


@pytest.mark.parametrize("rows, flags, msg", [
    ([{"prompt": "q", "choices": ["a"], "answer": 0}], [], "'choices' must be a list of at least 2"),
    ([{"prompt": "q", "choices": ["a", "b"], "answer": "c"}], [], "'answer' must be an index"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "ideal": "a"}], [],
     "the last turn must not be the assistant's"),
    ([{"foo": 1}], [], "needs 'choices'\\+'answer', 'ideal', or a training row"),
    ([{"text": "abc"}], ["--mode", "choice"], "--mode choice needs 'choices'"),
    ([{"prompt": "q" * 80, "choices": ["a", "b"], "answer": 0}], ["--max-length", "32"], "raise --max-length"),
])
def test_bad_input_is_one_line(capsys, models, tmp_path, rows, flags, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "never.json"
    rc, _, err = run_eval(capsys, "--model", models["dense"], "--data", path, "--out", out, *flags)
    assert rc == 2
    lines = [l for l in err.splitlines() if l.startswith("upcycle-ds eval: error:")]
    assert len(lines) == 1 and __import__("re").search(msg, lines[0]), err
    assert "Traceback" not in err and not out.exists()


def test_bad_model_and_paths(capsys, models, data, tmp_path):
    rc, _, err = run_eval(capsys, "--model", tmp_path, "--data", data[0])
    assert rc == 2 and "not an HF checkpoint dir" in err
    rc, _, err = run_eval(capsys, "--model", f"a={models['dense']}", f"a={models['moe']}", "--data", data[0])
    assert rc == 2 and "distinct NAME=DIR" in err
    rc, _, err = run_eval(capsys, "--model", models["dense"], "--data", tmp_path / "none.jsonl")
    assert rc == 2 and "data file not found" in err
    rc, _, err = run_eval(capsys, "--model", models["dense"], "--data", data[0], "--out", tmp_path / "no" / "r.json")
    assert rc == 2 and "does not exist" in err
