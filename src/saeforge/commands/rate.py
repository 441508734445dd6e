"""`saeforge rate new|serve|report`: paper A's blind rating study (saeforge.study).

  saeforge rate new STUDY --sae A_DIR --sae B_DIR [--latents-per-sae N] [--seed S] [--rater NAME ...]
  saeforge rate serve STUDY [--port P] [--rater NAME ...]
  saeforge rate report STUDY --out DIR
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from tyro.conf import OmitSubcommandPrefixes, Positional, UseAppendAction, subcommand

from saeforge.commands.output import write_json
from saeforge.errors import UserError
from saeforge.files import check_writable_dir, write_atomic


@dataclasses.dataclass
class RateNew:
    """Sample live latents of each SAE, draw their blind dashboards and write a new study file."""

    study: Positional[Path]
    """the study file to create (SQLite; must not exist)."""
    sae: UseAppendAction[tuple[Path, ...]] = ()
    """an SAE directory; give --sae twice (A, then B: the report's differences are A - B)."""
    arm: UseAppendAction[tuple[str, ...]] = ()
    """each SAE's arm, in --sae order (default for two SAEs: their directory names); needed for more than two SAEs,
    e.g. a Gated and a ReLU SAE at each of several sites."""
    latents_per_sae: int = 10
    """latents drawn from each SAE, uniformly among those that fire on the held-out tokens."""
    seed: int = 0
    """seed of the sampling, of each rater's order and of the dashboards' band samples."""
    rater: UseAppendAction[tuple[str, ...]] = ()
    """a rater to register (repeatable; more can be added by rate serve --rater)."""
    tokens: int = 65536
    """held-out tokens the dashboards are drawn from."""
    source: str = "embedded"
    """text source of the held-out split ("embedded", a .txt/.jsonl/.parquet path, "hf:<id>")."""
    context_len: Optional[int] = None
    """context length (else each SAE's context_size, else 128)."""
    model: Optional[str] = None
    """the language model (else each SAE's cfg.json model_name)."""
    top_n: int = 20
    """top-activating contexts shown per latent."""
    batch_size: int = 8
    """contexts per LM forward pass."""
    device: str = "cpu"
    """where the LM and the SAEs run."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the LM's dtype ("auto": bf16 where this hardware runs it fast, else float32)."""
    progress: bool = True
    """show progress bars."""

    def run(self) -> None:
        from saeforge.study.build import build_study  # loads the LM stack only for this subcommand
        from saeforge.study.db import Study

        if not self.sae:
            raise UserError("give the SAEs to compare: --sae A_DIR --sae B_DIR")
        path = build_study(self.study, self.sae, arms=self.arm, latents_per_sae=self.latents_per_sae,
                           seed=self.seed, raters=self.rater, tokens=self.tokens, source=self.source,
                           context_len=self.context_len, batch_size=self.batch_size, top_n=self.top_n,
                           device=self.device, dtype=self.dtype, model=self.model, progress=self.progress)
        with Study(path) as study:
            print(f"study:  {path} ({study.n_items()} latents)")
            for s in study.saes():
                print(f"  arm {s.arm}: {s.path} ({s.stratum}; {s.info['live_latents']} of {s.info['d_sae']} "
                      "latents fire on the held-out tokens)")
            print(f"raters: {', '.join(study.raters()) or '(none yet: rate serve --rater NAME)'}")
        print(f"next:   saeforge rate serve {path}")


@dataclasses.dataclass
class RateServe:
    """Serve the study to raters on a local web server; each label is saved when it is given (stop with Ctrl-C)."""

    study: Positional[Path]
    """the study file (from rate new)."""
    host: str = "127.0.0.1"
    """address to listen on (127.0.0.1: this machine only)."""
    port: int = 8765
    """port to listen on (0: any free port; the address is printed)."""
    rater: UseAppendAction[tuple[str, ...]] = ()
    """a rater to register before serving (repeatable; already registered raters keep their order)."""

    def run(self) -> None:
        from saeforge.study.db import Study
        from saeforge.study.server import StudyServer

        with Study(self.study) as study:
            for name in self.rater:
                study.add_rater(name)
            raters = study.raters()
            summary = f"{self.study}: {study.n_items()} latents, raters: {', '.join(raters) or '(none)'}"
        try:
            server = StudyServer(self.study, self.host, self.port)
        except OSError as e:
            raise UserError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        with server:
            print(f"study:   {summary}")
            print(f"serving: {server.url}/")
            for name in raters:
                print(f"  {name}: {server.url}/rater/{name}")
            if not raters:
                print("  no raters yet: restart with --rater NAME")
            print("stop with Ctrl-C; every label given is already saved", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                print("stopped", file=sys.stderr)


@dataclasses.dataclass
class RateReport:
    """Write the study's statistics, unblinded: Markdown, JSON and a figure."""

    study: Positional[Path]
    """the study file."""
    out: Path = Path("rate_report")
    """output directory (report.md, report.json, report.png)."""
    alternative: Literal["greater", "less", "two-sided"] = "greater"
    """the one-sided alternative of the tests: greater = arm A (the first --sae) is rated higher than arm B."""
    ci_level: float = 0.9
    """level of the BCa bootstrap interval of the mean paired difference."""
    resamples: int = 10_000
    """bootstrap resamples."""
    seed: int = 0
    """seed of the bootstrap."""

    def run(self) -> None:
        from saeforge.study.db import Study
        from saeforge.study.report import report_figure, report_markdown, study_report

        if not 0 < self.ci_level < 1 or self.resamples < 1:
            raise UserError(f"--ci-level must lie in (0, 1) and --resamples be positive; got {self.ci_level}, "
                             f"{self.resamples}")
        with Study(self.study) as study:
            report = study_report(study, alternative=self.alternative, level=self.ci_level,
                                  resamples=self.resamples, seed=self.seed)
        out = check_writable_dir(self.out, "--out")
        figure = report_figure(report, out / "report.png")
        markdown = report_markdown(report, figure=figure.name)
        write_atomic(out / "report.md", markdown)
        write_json(out / "report.json", report)
        print(markdown)
        for name in ("report.md", "report.json", "report.png"):
            print(f"wrote: {out / name}")


def rate_command(
    command: OmitSubcommandPrefixes[Union[
        Annotated[RateNew, subcommand("new")],
        Annotated[RateServe, subcommand("serve")],
        Annotated[RateReport, subcommand("report")],
    ]],
) -> None:
    """Paper A's blind rating study: new (sample latents, build dashboards and the study file), serve (the rating web
    server), report (the statistics)."""
    command.run()
