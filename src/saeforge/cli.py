"""The `saeforge` command. Each subcommand is a typed function in its own package; tyro makes the CLI from it."""

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
    lines = ["usage: saeforge COMMAND [ARGS...]   (saeforge COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        print(f"saeforge: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    tyro.cli(_resolve(COMMANDS[name][0]), args=argv[1:], prog=f"saeforge {name}")


if __name__ == "__main__":
    main()
