"""The CLI's commands, thin layers over the stages (data, models, saes, training, evaluation, viz): each parses
its typed arguments, checks what it can before the expensive work, calls the stages and writes or prints their
results (output.py). The stages never import this package; `saeforge.cli` maps command names to these functions."""
