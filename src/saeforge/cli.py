"""The `saeforge` command. Each subcommand is a typed function in its own package; tyro makes the CLI from it.

Every subcommand runs inside one error boundary (`run_command`): an error the user can fix (`UserError`, and the
operating system's file errors) is one line on stderr and exit code 2; `--debug` shows its traceback as well. Any
other exception is a bug and keeps its traceback."""

from __future__ import annotations

import importlib
import sys

# name -> "module:function"; a subcommand's module is imported only when it runs.
COMMANDS = {
    "demo": ("saeforge.demo:demo_command", "Harvest, train a ReLU baseline and a Gated SAE, evaluate, print."),
    "harvest": ("saeforge.data.harvest:harvest_command", "Write an activation cache from a language model."),
    "train": ("saeforge.training.trainer:train_command", "Train the SAEs of a TOML run file."),
    "eval": ("saeforge.evaluation.commands:eval_command", "Evaluate saved SAEs on held-out tokens."),
    "sweep": ("saeforge.evaluation.commands:sweep_command", "Train and evaluate a grid; write CSV and Pareto plots."),
}


def _resolve(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: saeforge [--debug] COMMAND [ARGS...]   (saeforge COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<9} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "--debug: show the traceback of an error too (anywhere on the line)"]
    return "\n".join(lines)


def run_command(name: str, run, debug: bool = False) -> None:
    """Call `run()`; an error the user can fix ends the process with one message and exit code 2."""
    from saeforge.errors import UserError

    try:
        run()
    except (UserError, OSError, UnicodeDecodeError) as e:
        if debug:
            raise
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        print(f"saeforge {name}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)  # no command at all is a mistake: stderr
        raise SystemExit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        print(f"saeforge: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    command = _resolve(COMMANDS[name][0])
    run_command(name, lambda: tyro.cli(command, args=argv[1:], prog=f"saeforge {name}"), debug)


if __name__ == "__main__":
    main()
