"""The README runs as written: every ```python block, in a fresh namespace, from an empty directory.

A block that calls ``dist.init_process_group`` is a torchrun script: all such blocks run in one spawn
of 2 gloo ranks (tpfx's launcher, standing in for torchrun: it has already made the group, so the
block's own ``init_process_group`` call finds it made). The others run in this process.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.multiprocess import run_ranks
from tpfx.targets import missing_package_fix

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _run_block(code: str, where: str) -> None:
    """Execute one block as a script would run, in ``where``, with the repository off ``sys.path``."""
    here, path = os.getcwd(), list(sys.path)
    root = str(README.parent)
    os.chdir(where)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", root)]  # `from examples...` would fail here
    try:
        exec(compile(code, f"README.md block ({code.splitlines()[0][:50]})", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(here)
        sys.path[:] = path


def _torchrun_blocks(rank: int, world_size: int, blocks: list[str], where: str) -> int:
    make_group = dist.init_process_group
    dist.init_process_group = lambda *args, **kwargs: None  # the launcher made it, as torchrun's env would
    try:
        for code in blocks:
            _run_block(code, where)
            dist.barrier()
    finally:
        dist.init_process_group = make_group
    return len(blocks)


def test_every_python_block_of_the_readme_runs_as_written(tmp_path):
    blocks = _blocks("python")
    torchrun = [code for code in blocks if "init_process_group" in code]
    local = [code for code in blocks if code not in torchrun]
    assert len(torchrun) >= 3 and all("torchrun" in code.splitlines()[0] for code in torchrun)
    assert not any(re.search(r"^\s*from examples\b", code, flags=re.MULTILINE) for code in blocks)
    for code in local:
        _run_block(code, str(tmp_path))
    assert run_ranks(_torchrun_blocks, 2, torchrun, str(tmp_path)) == [len(torchrun)] * 2
    assert (tmp_path / "model-from-tp2.pt").exists()  # the checkpoint block wrote its gathered state


def test_the_readme_says_what_each_cli_command_needs_and_the_error_names_the_extra():
    text = README.read_text()
    cli = text[text.index("## The tpfx command"):text.index("## Examples")]
    assert 'pip install -e ".[hf]"' in cli and "graphviz" in cli and "need only tpfx" in cli
    missing = ModuleNotFoundError("No module named 'transformers'", name="transformers")
    assert 'pip install -e ".[hf]"' in missing_package_fix(missing)  # hf: the smallest extra with it
    assert "pip install -e" not in missing_package_fix(ModuleNotFoundError("x", name="not_a_tpfx_extra_package"))


def test_a_hugging_face_target_without_transformers_names_the_extra(capsys, monkeypatch):
    pytest.importorskip("transformers")  # the file is read from the repository; its import is what fails
    from tpfx.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ModuleNotFoundError
    assert main(["dump", "examples/hf_models.py:tiny_llama"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the package 'transformers', which is not installed" in err
    assert 'pip install -e ".[hf]"' in err
