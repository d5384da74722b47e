"""The tpfx command as a user runs it: subprocesses of ``python -m tpfx`` and the ``tpfx`` script.

Process starts cost seconds on 2 cores, so the cases that check what is printed (the dumps, parsing
and error lines) call :func:`tpfx.cli.main` in this process; what only a real process shows (exit
codes, colour on a TTY, the console script, an error line with ``--debug``, ``verify`` of the
example GPT with its own processes) runs in real subprocesses. The other verify runs (a Hugging Face
model, a model whose program differs) run in this process with their ranks forked from the tests'
server (torch and transformers imported once).
"""

from __future__ import annotations

import functools
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tests.multiprocess  # noqa: F401 - its fork server, with torch and tpfx imported once
import tpfx
import tpfx.verify
from tpfx.cli import main
from tpfx.launch import launch

ROOT = Path(__file__).resolve().parents[1]
GPT = "examples/gpt.py:tiny_gpt"
ANSI = "\033["

MODELS_SOURCE = '''\
"""Models for the CLI tests, defined outside the package as a user would."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyLM(nn.Module):
    """Separate q/k/v projections into scaled_dot_product_attention, a gated FFN, other names."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, hidden: int = 48) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up = nn.Linear(d, hidden), nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, tokens):
        x = self.embed(tokens)
        h = self.norm1(x)
        a = F.scaled_dot_product_attention(self.split(self.wq(h)), self.split(self.wk(h)), self.split(self.wv(h)),
                                           is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(x.shape))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(x)


def tiny_lm():
    torch.manual_seed(0)
    return TinyLM()


def tiny_lm_double_with_inputs():
    torch.manual_seed(0)
    return TinyLM().double(), (torch.randint(0, 64, (3, 5)),)


def broken():
    raise ValueError("no weights here")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor value cannot be traced
            return self.fc(x)
        return x


def untraceable():
    return Branchy()


class TracedDiffers(nn.Module):
    """Computes something else when traced: a stand-in for a program that tpfx got wrong."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(x)))
        if isinstance(h, torch.fx.Proxy):
            h = h * 1.01
        return h


def traced_differs():
    torch.manual_seed(0)
    return TracedDiffers()
'''


def write_models(directory: Path) -> Path:
    """Write the test models to ``directory/models.py`` (outside the package, as a user's file)."""
    path = directory / "models.py"
    path.write_text(MODELS_SOURCE)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return write_models(tmp_path_factory.mktemp("user"))


def tpfx_command(*args: str, script: bool = False, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m tpfx ARGS`` (or the installed ``tpfx`` script) from the repository root."""
    command = [shutil.which("tpfx") or "tpfx"] if script else [sys.executable, "-m", "tpfx"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_in_terminal(*args: str) -> str:
    """Run ``python -m tpfx ARGS`` with stdout on a pseudo-terminal; return what the terminal got."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "tpfx", *args], cwd=ROOT, stdout=terminal,
                               stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items() if k != "NO_COLOR"})
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    os.close(controller)
    return b"".join(chunks).decode()


def table_rows(text: str, first_header: str) -> dict[str, list[str]]:
    """The rows of the printed table whose header starts with ``first_header``: first cell -> all cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header)) + 2  # header, dashes
    rows: dict[str, list[str]] = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith(("PASS", "FAIL", "total")):
            break
        if line.startswith(" ") and rows:  # a wrapped last cell goes on under its column
            last = rows[next(reversed(rows))]
            last[-1] += " " + line.strip()
            continue
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Call the CLI's ``main`` in this process (for parsing and error-line cases)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- dump


def test_dump_gpt_prints_sites_graph_communication_and_memory_of_rank_0(capsys):
    code, out, err = run_main(capsys, "dump", GPT, "--tp", "2")  # stdout is not a terminal here either
    assert code == 0, err
    assert ANSI not in out  # not a terminal: no colour
    site_rows = [line.split() for line in out.splitlines() if line.startswith("blocks.") and "x" in line]
    assert [row[:4] for row in site_rows] == [
        ["blocks.0.attn.qkv_proj", "qkv", "384x128", "192x128"], ["blocks.0.ffn.fc1", "fc1", "512x128", "256x128"],
        ["blocks.1.attn.qkv_proj", "qkv", "384x128", "192x128"], ["blocks.1.ffn.fc1", "fc1", "512x128", "256x128"]]
    assert all(row[4:] == ["copy_to_tp,", "gather_from_tp"] for row in site_rows)
    code = out[out.index("def forward("):out.index("Communication per training step")]
    assert code.count("tpfx_collectives_copy_to_tp(") == 4 and code.count("tpfx_collectives_gather_from_tp(") == 4
    assert "at input_ids: int64[2, 16]" in out
    gathers = [line.split() for line in out.splitlines() if line.startswith("gather_from_tp")]
    assert [(g[2], g[4], g[6]) for g in gathers] == [("all_gather", "2x16x192", "24,576"),
                                                     ("all_gather", "2x16x256", "32,768")] * 2
    assert "total per step: 180,224 bytes handed to collectives" in out
    assert "single device: 11,892,736 bytes; rank 0: 11,430,400 bytes" in out


def test_dump_json_of_a_user_model_carries_the_same_content(capsys, models):
    code, out, err = run_main(capsys, "dump", f"{models}:tiny_lm", "--tp", "2", "--rank", "1", "--batch", "4",
                              "--seq", "6", "--format", "json", "--tabular", "--diff")
    assert code == 0, err
    document = json.loads(out)
    assert document["schema_version"] == 1 and document["rank"] == 1 and document["model"] == "TinyLM"
    assert [(s["module"], s["role"], s["shard"]) for s in document["sites"]] == [
        ("wq", "q", [16, 32]), ("wk", "k", [16, 32]), ("wv", "v", [16, 32]), ("gate", "fc1", [24, 32]),
        ("up", "up", [24, 32])]
    assert [r["module"] for r in document["replicated"]] == ["wo", "down", "head"]
    graph = document["graph"]
    assert "tpfx_collectives_gather_from_tp" in graph["code"]
    assert sum(row["opcode"] == "call_function" and row["target"] == "copy_to_tp" for row in graph["tabular"]) == 5
    assert graph["diff"].count("\n+    copy_to_tp") == 5  # one copy-to per site in the diff
    communication = document["communication"]
    assert communication["inputs"] == "tokens: int64[4, 6]"
    assert [(r["direction"], r["module"], r["shape"]) for r in communication["rows"]][:2] == [
        ("forward", "wq", [4, 6, 16]), ("forward", "wk", [4, 6, 16])]
    assert communication["totals"]["step"]["tensor_bytes"] == sum(r["tensor_bytes"] for r in communication["rows"])
    memory = document["memory"]
    assert memory["sharded_linears_rank_bytes"] * 2 == memory["sharded_linears_single_device_bytes"]
    assert memory["single_device_bytes"] - memory["rank_bytes"] == memory["sharded_linears_rank_bytes"]


@pytest.mark.parametrize("mode", ["gather", "megatron"])
def test_dump_names_the_mode_and_the_tracer(capsys, mode):
    code, out, _ = run_main(capsys, "dump", GPT, "--mode", mode, "--format", "json")
    document = json.loads(out)
    assert code == 0 and (document["mode"], document["tracer"]) == (mode, "fx")
    code, out, _ = run_main(capsys, "dump", GPT, "--mode", mode, "--no-color")
    assert f"{mode} mode, captured with fx" in out.splitlines()[0]


def test_dump_diff_text_and_dot_file(capsys, models, tmp_path):
    code, out, _ = run_main(capsys, "dump", f"{models}:tiny_lm", "--diff")
    assert code == 0
    assert "--- captured (single device)" in out and "+++ rewritten (rank 0)" in out
    diff = out.splitlines()
    assert "-    wq = self.wq(norm1)" in diff
    assert "+    wq = self.wq(copy_to_tp);  copy_to_tp = None" in diff
    assert "+    gather_from_tp = tpfx_collectives_gather_from_tp(wq, 'tp:0-1');  wq = None" in diff
    dot_file = tmp_path / "lm.dot"
    code, out, _ = run_main(capsys, "dump", f"{models}:tiny_lm", "--format", "dot", "-o", str(dot_file))
    assert code == 0 and out == ""
    dot = dot_file.read_text()
    assert dot.startswith("digraph tpfx {") and '"wq" [label="wq\\nColumnParallelLinear"' in dot


def test_svg_without_graphviz_says_how_to_get_it(capsys, models, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` program here
    code, out, err = run_main(capsys, "dump", f"{models}:tiny_lm", "--format", "svg")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "apt-get install graphviz" in err and "--format dot" in err


# ---------------------------------------------------------------- explain and terminal conventions


def test_explain_colours_on_a_terminal_only_and_no_color_turns_it_off(models):
    coloured = run_in_terminal("explain", f"{models}:tiny_lm")
    assert ANSI in coloured
    plain = run_in_terminal("explain", f"{models}:tiny_lm", "--no-color")
    assert ANSI not in plain
    rows = table_rows(plain.replace("\r\n", "\n"), "module")
    assert list(rows) == ["wq", "wk", "wv", "wo", "gate", "up", "down", "head"]
    assert rows["wq"][2] == "shard (q)" and "query operand of an attention" in rows["wq"][3]
    assert rows["up"][2] == "shard (up)" and "gated FFN" in rows["up"][3]
    assert rows["wo"][2] == "replicate" and "residual add" in rows["wo"][3]
    assert rows["head"][2] == "replicate" and "model output" in rows["head"][3]


def test_version_help_and_console_script():
    done = tpfx_command("--version", script=True)
    assert done.returncode == 0 and done.stdout.strip() == f"tpfx {tpfx.__version__}"


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "tpfx verify examples/gpt.py:tiny_gpt --tp 2" in out


# ---------------------------------------------------------------- bad input


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(models):
    done = tpfx_command("dump", f"{models}:broken")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("tpfx: error: factory '" + f"{models}:broken" + "' raised ValueError: no weights here; "
                           "fix the factory so that it returns a model\n")
    debug = tpfx_command("explain", f"{models}:broken", "--debug")
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


@pytest.mark.parametrize("target, extra, message", [
    ("{models_dir}/missing.py:f", (), "file '{models_dir}/missing.py' of TARGET"),
    ("{models}:nothere", (), "has no factory 'nothere'; its functions are: broken, tiny_lm"),
    ("{models}:broken", (), "factory '{models}:broken' raised ValueError: no weights here"),
    ("{models}:untraceable", (), "cannot capture Branchy with torch.fx"),
    (GPT, ("--tp", "3"), "cannot shard 'blocks.0.ffn.fc1' (fc1): out_features 512 is not divisible by tp=3"),
    ("no_such_package.models:build", (), "module 'no_such_package.models' of TARGET"),
    ("examples/gpt.py", (), "TARGET 'examples/gpt.py' must be path/to/file.py:factory"),
    (GPT, ("--format", "pdf"), "argument --format: invalid choice: 'pdf'"),
    (GPT, ("--seq", "0"), "argument --seq: 0 must be at least 1"),
    (GPT, ("--rank", "2"), "rank=2 is outside the tensor-parallel group of size tp=2"),
])
def test_bad_input_is_one_line_naming_the_problem(capsys, models, target, extra, message):
    fill = {"models": models, "models_dir": models.parent}
    try:
        code, out, err = run_main(capsys, "dump", target.format(**fill), *extra)
    except SystemExit as exit_info:  # argparse's usage errors exit from inside main
        code, err = exit_info.code, capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message.format(**fill) in err


# ---------------------------------------------------------------- verify (two runs of real processes)


def test_verify_passes_on_the_example_gpt():
    done = tpfx_command("verify", GPT, "--tp", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout, "tensor group")
    assert set(rows) == {"logits", "loss (mean square of outputs)", "grad Embedding", "grad LayerNorm",
                         "grad sharded qkv", "grad sharded fc1", "grad Linear"}
    assert rows["grad sharded qkv"][1] == "8"  # weight and bias of 2 layers, on 2 ranks
    assert all(row[-1] == "PASS" and float(row[2]) <= 1e-5 for row in rows.values())
    assert done.stdout.rstrip().splitlines()[-1] == "PASS: 7 of 7 tensor groups within tolerance"


def test_verify_passes_on_an_exported_hugging_face_model_in_megatron_mode(capsys, monkeypatch):
    # the sharded parameters of an exported program are sliced in place: no layer knows their shard
    # (in this process, ranks forked from the tests' server: verify's own processes are the case above)
    monkeypatch.setattr(tpfx.verify, "launch", functools.partial(launch, start_method="forkserver"))
    code, out, err = run_main(capsys, "verify", "examples/hf_models.py:tiny_gpt2", "--tp", "2", "--mode", "megatron")
    assert code == 0, out + err
    rows = table_rows(out, "tensor group")
    assert {"grad sharded qkv", "grad sharded fc1"} <= set(rows)
    assert all(row[-1] == "PASS" and float(row[2]) <= 1e-5 for row in rows.values())


def test_verify_fails_when_the_program_computes_something_else(capsys, models, monkeypatch):
    # the model multiplies by 1.01 only when traced, so tpfx's program really differs from it (ranks forked
    # from the tests' server, as for the Hugging Face model above)
    monkeypatch.setattr(tpfx.verify, "launch", functools.partial(launch, start_method="forkserver"))
    code, out, err = run_main(capsys, "verify", f"{models}:traced_differs", "--tp", "2", "--batch", "3", "--seq", "4")
    assert code == 1, out + err
    rows = table_rows(out, "tensor group")
    assert set(rows) == {"logits", "loss (mean square of outputs)", "grad sharded fc1", "grad Linear"}
    assert rows["logits"][-1] == "FAIL" and abs(float(rows["logits"][3]) - 0.01) < 1e-4  # relative error 1.01 - 1
    assert rows["grad sharded fc1"][-1] == "FAIL" and rows["grad Linear"][-1] == "FAIL"
    assert out.rstrip().splitlines()[-1].startswith("FAIL: ")
