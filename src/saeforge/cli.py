"""The `saeforge` command. Each subcommand is a typed function in `saeforge.commands`; tyro makes the CLI from it,
and every subcommand runs inside one error boundary (`commands.output.run_command`)."""

from __future__ import annotations

import importlib
import sys

# name -> "module:function"; a subcommand's module is imported only when it runs.
COMMANDS = {
    "demo": ("saeforge.commands.demo:demo_command", "Harvest, train a ReLU baseline and a Gated SAE, evaluate, print."),
    "harvest": ("saeforge.commands.harvest:harvest_command", "Write an activation cache from a language model."),
    "train": ("saeforge.commands.train:train_command", "Train the SAEs of a TOML run file."),
    "eval": ("saeforge.commands.evaluate:eval_command", "Evaluate saved SAEs on held-out tokens."),
    "sweep": ("saeforge.commands.sweep:sweep_command", "Train and evaluate a grid; write CSV and Pareto plots."),
    "dashboard": ("saeforge.commands.dashboard:dashboard_command",
                  "Write a static HTML feature dashboard of a saved SAE."),
    "convert": ("saeforge.commands.convert:convert_command",
                "Convert an SAE: SAELens, Gemma Scope, dictionary_learning, sparsify -> saeforge, SAELens, JumpReLU."),
    "rate": ("saeforge.commands.rate:rate_command",
             "Blind rating study: rate new (sample latents), rate serve (web server), rate report (statistics)."),
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
    from saeforge.commands.output import run_command

    command = _resolve(COMMANDS[name][0])
    run_command(name, lambda: tyro.cli(command, args=argv[1:], prog=f"saeforge {name}"), debug)


if __name__ == "__main__":
    main()
