"""Every public function checks its arguments first and answers a wrong one in one line naming it.

Also the CLI's side of it: torch's logging stays quiet unless ``--debug``, and a factory that calls
``sys.exit`` is a one-line error with exit 2, not a silent exit with its status.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import tpfx
from tpfx.cli import main
from tpfx.verify import VerifyOptions


def _one_line(call, *named: str) -> str:
    with pytest.raises(tpfx.ConfigError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(text in message for text in named), message
    return message


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


@pytest.mark.parametrize("tp", [2.0, "2", True, 0, -1, [2]])
def test_parallelize_takes_tp_as_an_int_of_at_least_one_only(tp):
    message = _one_line(lambda: tpfx.parallelize(_tiny(), tp=tp, rank=0), "tpfx.parallelize", "tp")
    if tp in (2.0, "2") and not isinstance(tp, bool):
        assert "fix: pass tp=2" in message


def test_parallelize_checks_every_other_argument():
    model = _tiny()
    _one_line(lambda: tpfx.parallelize({"weight": torch.ones(2)}, tp=2, rank=0), "model must be a torch.nn.Module")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=True), "rank")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=0, mode="tensor"), "mode='tensor'", "'megatron'")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=0, tracer="jit"), "tracer='jit'")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=0, group="tp"), "group must be")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=0, example_inputs=[torch.ones(1, 8)]), "example_inputs")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=0, vocab_parallel=1), "vocab_parallel must be True or False")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=0, sequence_parallel="no"), "sequence_parallel must be")
    _one_line(lambda: tpfx.parallelize(model, tp=2, rank=0, logits="all"), "logits='all'", "'sharded'")


def test_checkpoint_functions_and_capture_check_their_arguments(tmp_path):
    gm = tpfx.parallelize(_tiny(), tp=2, rank=0, tracer="fx")
    state = _tiny().state_dict()
    _one_line(lambda: tpfx.load_state_dict(state, state), "gm must be a torch.nn.Module")
    _one_line(lambda: tpfx.load_state_dict(gm, 42), "source must be a state dict or the path")
    _one_line(lambda: tpfx.load_state_dict(gm, state, strict="no"), "strict must be True or False")
    _one_line(lambda: tpfx.load_state_dict(gm, state, device="gpu"), "device='gpu' is not a device")
    _one_line(lambda: tpfx.full_state_dict("model.pt"), "tpfx.full_state_dict", "gm")
    _one_line(lambda: tpfx.full_state_dict(gm, rank0_only=1), "rank0_only")
    _one_line(lambda: tpfx.parameter_shard_specs(None), "tpfx.parameter_shard_specs")
    _one_line(lambda: tpfx.capture(lambda x: x), "tpfx.capture", "model")
    _one_line(lambda: tpfx.capture(_tiny(), form="eval"), "form must be a tpfx.CallForm")
    with pytest.raises(tpfx.LoadError, match="does not exist"):  # a path must exist
        tpfx.load_state_dict(gm, tmp_path / "absent.pt")


def test_layers_and_verify_options_check_their_arguments():
    _one_line(lambda: tpfx.ColumnParallelLinear(nn.Conv1d(2, 2, 1), tp=2, rank=0), "torch.nn.Linear")
    _one_line(lambda: tpfx.ColumnParallelLinear(nn.Linear(4, 4), tp=2.0, rank=0), "tp")
    _one_line(lambda: tpfx.ColumnParallelLinear(nn.Linear(4, 4), tp=2, rank=2), "rank=2 is outside 0..1")
    _one_line(lambda: VerifyOptions(tp="4"), "tp", "fix: pass tp=4")
    _one_line(lambda: VerifyOptions(seq=0), "seq=0 must be a positive integer")


def test_a_factory_calling_sys_exit_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    target = tmp_path / "exits.py"
    target.write_text("import sys\n\ndef build():\n    sys.exit(3)\n")
    assert main(["explain", f"{target}:build"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "sys.exit(3)" in error and "build" in error, error


TOO_SHORT = """\
from examples.gpt import GPTModel, small_config


def build():
    return GPTModel(small_config(vocab_size=64, max_position_embeddings=8, n_layers=1, d_model=32, d_ff=64)).eval()
"""


@pytest.fixture
def restored_logging():
    """The CLI quiets torch's loggers and warnings for the rest of its process: undo it for the next tests."""
    levels = {name: logging.getLogger(name).level for name in ("torch", "transformers")}
    with warnings.catch_warnings():
        yield
    torch._logging.set_logs()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_the_cli_prints_no_torch_logging_unless_debug(tmp_path, capfd, caplog, restored_logging):
    # seq 32 is past the model's 8 positions: torch logs its fake-tensor traceback (40 lines) before tpfx's line
    (tmp_path / "short.py").write_text(TOO_SHORT)
    with caplog.at_level(logging.DEBUG):
        assert main(["dump", f"{tmp_path / 'short.py'}:build", "--seq", "32"]) == 2
    error = capfd.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("tpfx: error:"), error
    assert "broadcast a dimension of length 32" in error
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("torch") and r.levelno >= logging.WARNING]
    assert not logged, logged[:2]  # (a terminal would show them on stderr; pytest holds them here)
