"""The ``tpfx`` command: argument parsing and printing only; the work is done by library functions.

    tpfx dump examples/gpt.py:tiny_gpt --tp 2          # sites, rewritten graph, communication, memory
    tpfx explain examples/gpt.py:tiny_gpt              # every linear, sharded or not, and why
    tpfx verify examples/gpt.py:tiny_gpt --tp 2        # real gloo processes against one device

Exit codes: 0 success, 1 verification failed (or an internal error), 2 bad input (one line on
stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import os
import shutil
import sys
import textwrap
import traceback
import typing
import warnings
from collections.abc import Callable, Sequence

import tpfx
from tpfx.passes.activation_memory import activation_bytes
from tpfx.passes.comm_table import comm_table
from tpfx.passes.draw import to_dot, to_svg
from tpfx.errors import TpfxError, one_line
from tpfx.launch import RankFailure
from tpfx.readable_code import readable_code
from tpfx.targets import Target, load_target, parallelize_target
from tpfx.verify import VerifyOptions, VerifyResult, verify

SCHEMA_VERSION = 1
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_WIDTH = 100  # explain fits a 100-column terminal when it cannot ask the terminal (a pipe, a file)
MIN_WRAPPED_COLUMN = 30  # a wrapped reason never gets narrower than this, however long the module names

EXAMPLES = """\
examples:
  tpfx dump examples/gpt.py:tiny_gpt --tp 2              sites, rank 0's graph code, communication, memory
  tpfx dump examples/gpt.py:tiny_gpt --diff              the rewrite as a diff of the captured graph
  tpfx dump mypkg.models:build --tp 4 --batch 8 --seq 2048 --format json -o plan.json
  tpfx dump examples/gpt.py:tiny_gpt --format svg -o gpt.svg   (needs graphviz: apt-get install graphviz)
  tpfx explain examples/gpt.py:tiny_gpt                  every linear and why it is (not) sharded
  tpfx verify examples/gpt.py:tiny_gpt --tp 2            forward+backward in 2 gloo processes vs one device
  tpfx verify mymodel.py:build --forms all               also every optional argument at a non-default value

TARGET is path/to/file.py:factory or package.module:factory; the factory takes no arguments and
returns a model, (model, example_inputs), or (model, [example_inputs, ...]) for several call forms
(verify checks each). Without example inputs tpfx makes the required
arguments itself (token ids for an Embedding, features for a Linear) at --batch x --seq.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line and exits 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Style:
    """ANSI colour when writing to a terminal, unless --no-color or NO_COLOR is set."""

    CODES = {"bold": "1", "green": "32", "red": "31", "yellow": "33", "cyan": "36", "dim": "2"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, style: str) -> str:
        return f"\033[{self.CODES[style]}m{text}\033[0m" if self.enabled else text


def parallelize_options() -> dict[str, inspect.Parameter]:
    """Keyword options of :func:`tpfx.parallelize` with a string or bool default (``mode``, ``tracer``,
    ``vocab_parallel``, ...): CLI options (a bool one is a flag that turns it on)."""
    parameters = inspect.signature(tpfx.parallelize).parameters
    return {name: p for name, p in parameters.items()
            if p.kind is p.KEYWORD_ONLY and isinstance(p.default, (str, bool))}


def _choices_of(name: str) -> list[str] | None:
    """The strings of a ``Literal[...]`` annotation of that parallelize option, if it has one."""
    try:
        hint = typing.get_type_hints(tpfx.parallelize).get(name)
    except Exception:  # an annotation that does not resolve only costs the list of choices
        return None
    if typing.get_origin(hint) is typing.Literal:
        return [arg for arg in typing.get_args(hint) if isinstance(arg, str)] or None
    return None


def _count(text: str) -> int:
    """argparse type: a positive integer (a degree, a batch size, a sequence length)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("target", metavar="TARGET", help="path/to/file.py:factory or package.module:factory")
    common.add_argument("--tp", type=_count, default=2, help="tensor-parallel degree (default 2)")
    common.add_argument("--batch", type=_count, help="batch size of the inputs (default: the example's, else 2)")
    common.add_argument("--seq", type=_count, help="sequence length of the inputs (default: the example's, else 16)")
    for name, parameter in parallelize_options().items():  # only what this tpfx.parallelize accepts
        flag = f"--{name.replace('_', '-')}"
        if isinstance(parameter.default, bool):  # a switch: given, it passes the other value
            common.add_argument(flag, dest=f"parallelize_{name}", action="store_const", const=not parameter.default,
                                default=None, help=f"passes tpfx.parallelize({name}={not parameter.default!r})")
            continue
        common.add_argument(flag, dest=f"parallelize_{name}", choices=_choices_of(name),
                            default=None, help=f"passed to tpfx.parallelize({name}=...); default {parameter.default!r}")
    common.add_argument("--no-color", action="store_true", help="never colour the output")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``tpfx`` argument parser with its three commands."""
    parser = _Parser(prog="tpfx", description="Show, explain and verify what tpfx does to a model.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tpfx {tpfx.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = _common_options()
    formatter = argparse.RawDescriptionHelpFormatter
    dump = commands.add_parser("dump", parents=[common], epilog=EXAMPLES, formatter_class=formatter,
                               help="sites, rewritten graph, communication and memory of one rank")
    dump.add_argument("--rank", type=int, default=0, help="which rank's program (default 0)")
    dump.add_argument("--tabular", action="store_true", help="the graph as a table of nodes instead of code")
    dump.add_argument("--diff", action="store_true", help="the graph as a diff against the captured one")
    dump.add_argument("--format", choices=("text", "json", "dot", "svg"), default="text")
    dump.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    dump.set_defaults(run=_run_dump)
    explain = commands.add_parser("explain", parents=[common], epilog=EXAMPLES, formatter_class=formatter,
                                  help="every linear, sharded or not, with the reason")
    explain.add_argument("--format", choices=("text", "json"), default="text")
    explain.set_defaults(run=_run_explain, rank=0)
    check = commands.add_parser("verify", parents=[common], epilog=EXAMPLES, formatter_class=formatter,
                                help="run tp gloo processes and compare with the single-device model")
    check.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    check.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to the largest value (1e-4)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs and dropout (default 0)")
    check.add_argument("--timeout", type=float, default=300, help="seconds before the ranks are stopped (300)")
    check.add_argument("--forms", choices=("declared", "all"), default="declared",
                       help="call forms to check: every call the factory declares (default), or also each "
                            "optional argument of forward set to a non-default value tpfx can make")
    check.set_defaults(run=_run_verify)
    return parser


def _passthrough(args: argparse.Namespace) -> dict[str, str | bool]:
    """The parallelize options given on the command line (the others keep parallelize's defaults)."""
    return {name: getattr(args, f"parallelize_{name}") for name in parallelize_options()
            if getattr(args, f"parallelize_{name}") is not None}


def _inspect(args: argparse.Namespace) -> tuple[Target, tpfx.TensorParallelModule]:
    target = load_target(args.target)
    program = parallelize_target(target, tp=args.tp, rank=args.rank, batch=args.batch, seq=args.seq,
                                 options=_passthrough(args))
    return target, program


# ---------------------------------------------------------------- dump


def dump_document(args: argparse.Namespace) -> tuple[dict[str, object], tpfx.TensorParallelModule]:
    """Everything ``tpfx dump`` shows, as plain data (the JSON output), and the program it describes."""
    target, program = _inspect(args)
    report = program.tpfx_report
    inputs = target.inputs(batch=args.batch, seq=args.seq)
    table = comm_table(program, inputs, tp=report.tp)
    graph: dict[str, object] = {"call_form": report.call_form.describe(), "code": readable_code(program).strip()}
    if args.tabular:
        graph["tabular"] = _node_rows(program)
    if args.diff:
        graph["diff"] = _graph_diff(target.model, program)
    return {
        "schema_version": SCHEMA_VERSION, "command": "dump", "target": args.target, "model": report.model_name,
        "tp": report.tp, "rank": report.rank, "group": report.group, "mode": report.mode, "tracer": report.tracer,
        "options": _passthrough(args),
        "sites": report.sites_table(),
        "sequence_parallel": _sequence_summary(report),
        "replicated": [row for row in report.linear_decisions() if not row["sharded"]],
        "graph": graph,
        "communication": {"inputs": target.describe_inputs(batch=args.batch, seq=args.seq), **table.to_dict()},
        "memory": report.memory() | {"activation_bytes": activation_bytes(program, inputs, tp=report.tp),
                                     "activation_inputs": target.describe_inputs(batch=args.batch, seq=args.seq)},
    }, program


def _sequence_summary(report: object) -> str:
    """The report's line on sequence parallelism, "" for a program without it."""
    summary = getattr(report, "sequence_summary", None)
    return summary() if summary is not None else ""


def _node_rows(program: tpfx.TensorParallelModule) -> list[dict[str, str]]:
    return [{"opcode": n.op, "name": n.name, "target": getattr(n.target, "__name__", str(n.target)),
             "args": str(n.args), "kwargs": str(n.kwargs)} for n in program.graph.nodes]


def _graph_diff(model: object, program: tpfx.TensorParallelModule) -> str:
    captured = readable_code(tpfx.capture(model)).strip("\n").splitlines()
    rewritten = readable_code(program).strip("\n").splitlines()
    return "\n".join(difflib.unified_diff(captured, rewritten, "captured (single device)",
                                          f"rewritten (rank {program.tpfx_report.rank})", lineterm=""))


def _run_dump(args: argparse.Namespace, style: _Style) -> int:
    document, program = dump_document(args)
    if args.format == "json":
        text = json.dumps(document, indent=2) + "\n"
    elif args.format in ("dot", "svg"):
        title = f"{document['model']}: rank {document['rank']} of tp={document['tp']}"
        text = to_dot(program, title=title)
        text = to_svg(text) if args.format == "svg" else text
    else:
        text = "\n".join(_dump_text(document, style)) + "\n"
    _emit(text, args.output)
    return EXIT_OK


def _dump_text(document: dict, style: _Style) -> list[str]:
    head = (f"tpfx dump {document['target']}: {document['model']}, rank {document['rank']} of tp={document['tp']} "
            f"(group {document['group']}), {document['mode']} mode, captured with {document['tracer']}")
    lines = [style(head, "bold"), "", style(f"Sites ({len(document['sites'])})", "bold")]
    lines += _table(("module", "role", "weight", "shard", "collectives"),
                    [(s["module"], s["role"], _shape(s["weight"]), _shape(s["shard"]), ", ".join(s["collectives"]))
                     for s in document["sites"]])
    if document["sequence_parallel"]:
        lines.append(document["sequence_parallel"])
    graph = document["graph"]
    lines += ["", style(f"Rewritten graph of rank {document['rank']} ({graph['call_form']})", "bold")]
    if "diff" in graph:
        lines += [_diff_colour(line, style) for line in graph["diff"].splitlines()]
    elif "tabular" in graph:
        lines += _table(("opcode", "name", "target", "args", "kwargs"), [tuple(r.values()) for r in graph["tabular"]])
    else:
        lines += graph["code"].splitlines()
    lines += ["", *_comm_text(document["communication"], style), "", *_memory_text(document, style)]
    return lines


def _comm_text(communication: dict, style: _Style) -> list[str]:
    lines = [style(f"Communication per training step at {communication['inputs']} "
                   f"(bytes; sent per rank by the {communication['model']} model, tp={communication['tp']})", "bold")]
    lines += _table(("node", "direction", "op", "module", "shape", "dtype", "tensor bytes", "sent per rank"),
                    [(r["node"], r["direction"], style(r["op"], "yellow"), r["module"], _shape(r["shape"]), r["dtype"],
                      f"{r['tensor_bytes']:,}", f"{r['traffic_bytes_per_rank']:,.0f}") for r in communication["rows"]])
    for direction, total in communication["totals"].items():
        lines.append(f"total {direction if direction != 'step' else 'per step'}: {total['tensor_bytes']:,} bytes "
                     f"handed to collectives, {total['traffic_bytes_per_rank']:,.0f} bytes sent per rank")
    return lines


def _memory_text(document: dict, style: _Style) -> list[str]:
    memory = document["memory"]
    single, rank = memory["single_device_bytes"], memory["rank_bytes"]
    share = rank / single if single else 1.0
    return [style("Parameter memory", "bold"),
            f"single device: {single:,} bytes; rank {document['rank']}: {rank:,} bytes ({share:.1%})",
            f"sharded linears: {memory['sharded_linears_single_device_bytes']:,} bytes on one device, "
            f"{memory['sharded_linears_rank_bytes']:,} bytes per rank"] + _vocab_memory_text(memory) + [
            f"activations of one training step at {memory['activation_inputs']}: {memory['activation_bytes']:,} bytes "
            f"on rank {document['rank']} (tensors saved for backward)"]


def _vocab_memory_text(memory: dict) -> list[str]:
    if "vocab_parallel_single_device_bytes" not in memory:
        return []
    return [f"vocab-parallel embeddings and LM heads: {memory['vocab_parallel_single_device_bytes']:,} bytes on one "
            f"device, {memory['vocab_parallel_rank_bytes']:,} bytes per rank"]


def _diff_colour(line: str, style: _Style) -> str:
    if line.startswith("+") and not line.startswith("+++"):
        return style(line, "green")
    if line.startswith("-") and not line.startswith("---"):
        return style(line, "red")
    return style(line, "cyan") if line.startswith("@@") else line


# ---------------------------------------------------------------- explain


def _run_explain(args: argparse.Namespace, style: _Style) -> int:
    _, program = _inspect(args)
    decisions = program.tpfx_report.linear_decisions()
    if args.format == "json":
        document = {"schema_version": SCHEMA_VERSION, "command": "explain", "target": args.target,
                    "tp": args.tp, "linears": decisions}
        _emit(json.dumps(document, indent=2) + "\n", None)
        return EXIT_OK
    sharded = sum(1 for row in decisions if row["sharded"])
    lines = [style(f"tpfx explain {args.target}: {len(decisions)} linears, {sharded} sharded at tp={args.tp}", "bold")]
    lines += _table(("module", "weight", "decision", "reason"),
                    [(row["module"], _shape(row["weight"]),
                      style(f"shard ({row['role']})", "green") if row["sharded"] else style("replicate", "dim"),
                      row["reason"]) for row in decisions], width=_terminal_width())
    if _sequence_summary(program.tpfx_report):
        lines.append(_sequence_summary(program.tpfx_report))
    _emit("\n".join(lines) + "\n", None)
    return EXIT_OK


# ---------------------------------------------------------------- verify


def _run_verify(args: argparse.Namespace, style: _Style) -> int:
    options = VerifyOptions(tp=args.tp, batch=args.batch, seq=args.seq, seed=args.seed, atol=args.atol,
                            rtol=args.rtol, timeout_s=args.timeout, parallelize_options=_passthrough(args),
                            forms=args.forms)
    result = verify(args.target, options)
    _emit("\n".join(_verify_text(result, style)) + "\n", None)
    return EXIT_OK if result.passed else EXIT_FAILED


def _verify_text(result: VerifyResult, style: _Style) -> list[str]:
    options = result.options
    lines = [style(f"tpfx verify {result.target}: tp={options.tp} gloo processes against one device, "
                   f"inputs {result.inputs}, seed {options.seed}", "bold"),
             f"tolerance: max_abs <= {options.atol:g} + {options.rtol:g} * max |single-device value|"]
    lines += _table(("tensor group", "tensors (all ranks)", "max abs error", "max rel error", "result"),
                    [(row.group, str(row.tensors), f"{row.max_abs:.3e}", f"{row.max_rel:.3e}",
                      style("PASS", "green") if row.passed else style("FAIL", "red")) for row in result.rows])
    lines += [f"{style('FAIL', 'red')} [{form}]: tpfx refuses this call form: {reason}" for form, reason in result.refused]
    verdict = style("PASS", "green") if result.passed else style("FAIL", "red")
    failed = sum(1 for row in result.rows if not row.passed)
    refused = f"; {len(result.refused)} call form(s) refused" if result.refused else ""
    lines.append(f"{verdict}: {len(result.rows) - failed} of {len(result.rows)} tensor groups within tolerance"
                 f"{refused}")
    return lines


# ---------------------------------------------------------------- shared printing


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _visible_width(text: str) -> int:
    while "\033[" in text:  # colour codes take no room on the screen
        start = text.index("\033[")
        text = text[:start] + text[text.index("m", start) + 1:]
    return len(text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, width: int | None = None) -> list[str]:
    """Columns padded to their widest cell; with ``width``, the last column is wrapped so that each
    line fits in ``width`` characters (its continuation lines indented under it)."""
    widths = [max([len(h), *(_visible_width(str(r[i])) for r in rows)]) for i, h in enumerate(headers)]
    wrap_at = None
    if width is not None:
        room = width - sum(widths[:-1]) - 2 * (len(widths) - 1)
        wrap_at = max(room, MIN_WRAPPED_COLUMN)
        widths[-1] = min(widths[-1], wrap_at)

    def line(cells: Sequence[str]) -> str:
        padded = [str(c) + " " * (w - _visible_width(str(c))) for c, w in zip(cells, widths)]
        return "  ".join(padded).rstrip()

    lines = [line(headers), line(["-" * w for w in widths])]
    for row in rows:
        last = textwrap.wrap(str(row[-1]), wrap_at, break_on_hyphens=False) if wrap_at else [str(row[-1])]
        lines.append(line([*row[:-1], last[0] if last else ""]))
        lines += [line([""] * (len(row) - 1) + [more]) for more in last[1:]]
    return lines


def _terminal_width() -> int:
    """Columns of the terminal (COLUMNS, else the terminal's own), 100 when not on a terminal."""
    return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns


def _emit(text: str, path: str | None) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        raise TpfxError(f"cannot write -o {path!r}: {error.strerror}; choose a writable path") from None


def _colour_enabled(args: argparse.Namespace) -> bool:
    to_file = getattr(args, "output", None) is not None
    return sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ and not to_file


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tpfx`` command line; returns the exit code (0 ok, 1 verification failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    run: Callable[[argparse.Namespace, _Style], int] = args.run
    try:
        return run(args, _Style(_colour_enabled(args)))
    except TpfxError as error:
        return _report_error(args, error, f"{error}", internal=isinstance(error, RankFailure) and not any(
            e.user_error for e in error.errors))
    except BrokenPipeError:  # the reader (head, less) went away; nothing more to say
        sys.stderr.close()
        return EXIT_OK
    except Exception as error:  # a bug in tpfx or in the model's code: one line unless --debug
        return _report_error(args, error, f"{one_line(error)} (rerun with --debug for the traceback)",
                             internal=True)


def _quiet_libraries() -> None:
    """Silence torch's (and transformers') logging and deprecation chatter: the CLI prints its own one line.

    A failing shape propagation makes torch log a 40-line traceback of its fake-tensor dispatch before
    tpfx's one-line error; ``--debug`` keeps all of it. tpfx's own warnings still show.
    """
    import logging

    import torch._logging

    torch._logging.set_logs(all=logging.CRITICAL)
    for name in ("torch", "transformers"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's C++ warnings in spawned ranks
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")  # and theirs
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers)\.")


def _report_error(args: argparse.Namespace, error: BaseException, message: str, *, internal: bool) -> int:
    if args.debug:
        traceback.print_exception(error, file=sys.stderr)
        for rank_error in getattr(error, "errors", ()):
            print(f"--- rank {rank_error.rank} ---\n{rank_error.traceback}", file=sys.stderr)
    print(f"tpfx: error: {message}", file=sys.stderr)
    return EXIT_FAILED if internal else EXIT_BAD_INPUT
