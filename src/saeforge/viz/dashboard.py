"""Static feature dashboards: an index of every latent and one self-contained HTML page per latent, drawn from
`evaluation.latent_examples.LatentExamples` (no LM needed).

Every page opens from a file on an offline machine: CSS and the index's one script are inline, and each page's
Content-Security-Policy allows nothing from the network. Corpus text never becomes markup: every token string (and
every name) goes through html.escape, the latent pages have no script at all (a token's value shows on hover
through its title attribute), and the index's script only moves and hides the rows the HTML already holds. The
policy also lets only that script run (it is named by its hash), so even a string that escaped escaping could not
run one.
"""

from __future__ import annotations

import base64
import hashlib
import html
from pathlib import Path
from typing import Iterable

from saeforge.evaluation.latent_examples import LatentExamples, histogram_edges
from saeforge.files import write_atomic

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:75em}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.2em 0 .4em}h3{font-size:.95em;margin:.8em 0 .3em}
.sub{color:#666;margin:0 0 .8em}.stats span{margin-right:1.5em}
.row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
table{border-collapse:collapse}td,th{padding:.15em .6em;text-align:left}th{border-bottom:1px solid #ccc}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ex{display:flex;gap:.6em;margin:.15em 0;font-family:ui-monospace,monospace;font-size:13px}
.ex .v{min-width:4.5em;text-align:right;color:#666}
.toks{white-space:pre-wrap;overflow-wrap:anywhere}
.t{white-space:pre-wrap;border-radius:2px;background:rgba(255,140,0,var(--a,0))}.pk{outline:1px solid #b45309}
.up{background:rgba(220,38,38,var(--a,0))}.down{background:rgba(37,99,235,var(--a,0))}
.attr{color:#555;font-size:12px}
.tok{font-family:ui-monospace,monospace;white-space:pre;background:#f3f3f3;padding:0 .2em}
.dead{color:#666;font-family:ui-monospace,monospace;word-break:break-all}
"""

_INDEX_SCRIPT = """(() => {
  const body = document.querySelector('#latents tbody');
  const rows = Array.from(body.rows);
  const filter = document.getElementById('filter');
  const sort = document.getElementById('sort');
  const shown = document.getElementById('shown');
  function update() {
    const query = filter.value.trim().toLowerCase();
    const [key, direction] = sort.value.split(':');
    rows.sort((a, b) => Number(direction) * (Number(a.dataset[key]) - Number(b.dataset[key]))
      || Number(a.dataset.latent) - Number(b.dataset.latent));
    let count = 0;
    for (const row of rows) {
      row.hidden = query !== '' && !row.dataset.search.includes(query);
      if (!row.hidden) count += 1;
      body.appendChild(row);
    }
    shown.textContent = String(count);
  }
  filter.addEventListener('input', update);
  sort.addEventListener('change', update);
  update();
})();"""

_SORTS = (("density:-1", "density, highest first"), ("density:1", "density, lowest first"),
          ("max:-1", "max activation, highest first"), ("latent:1", "latent number"))


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _shown(text: str, alone: bool = False) -> str:
    """A token's text made visible: line breaks and tabs as symbols (and, for a token shown on its own, spaces as
    open boxes when it is nothing but spaces), then escaped."""
    text = text.replace("\n", "\u21b5").replace("\t", "\u21e5")
    if alone and not text.strip():
        text = text.replace(" ", "\u2423")
    return _e(text)


def _document(title: str, body: str, script: str | None = None) -> str:
    script_src = "'none'"
    if script is not None:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        script_src = f"'sha256-{digest}'"
    policy = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src {script_src}"
    tail = f"<script>{script}</script>" if script is not None else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n{tail}</body></html>\n")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


# ---------------------------------------------------------------------------------------------------------------
# One latent


def _example(examples: LatentExamples, ex: dict, scale: float, attribution: bool) -> str:
    """One example: its peak value, then its tokens shaded by activation (and by attribution on a second line)."""
    left = examples.info["window"][0]
    spans, attr_spans = [], []
    attr_scale = float(ex["attribution"].abs().max()) if attribution else 0.0
    for j, (token, act) in enumerate(zip(ex["tokens"].tolist(), ex["acts"].tolist())):
        if token < 0:
            continue
        text, peak = _shown(examples.token_text(token)), ' pk' if j == left else ''
        alpha = min(1.0, act / scale) if act > 0 and scale > 0 else 0.0
        spans.append(f'<span class="t{peak}"{_shade(alpha)} title="{act:.4g}">{text}</span>')
        if attribution:
            value = float(ex["attribution"][j])
            strength = min(1.0, abs(value) / attr_scale) if attr_scale > 0 else 0.0
            sign = "up" if value > 0 else "down"
            attr_spans.append(f'<span class="t {sign}{peak}"{_shade(strength)} title="attr {value:.3g}">{text}</span>')
    line = f'<div class="ex"><span class="v">{float(ex["value"]):.3g}</span><span class="toks">{"".join(spans)}</span></div>'
    if attribution:
        line += (f'<div class="ex attr"><span class="v">attr</span>'
                 f'<span class="toks">{"".join(attr_spans)}</span></div>')
    return line


def _shade(strength: float) -> str:
    """The style attribute that shades a token span (CSS variable --a, 0..1), or nothing when it is 0."""
    return f' style="--a:{strength:.2f}"' if strength >= 0.005 else ""


def _tick(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _histogram_svg(counts: list[int], width: int = 360, height: int = 120) -> str:
    """Bars of the non-zero activations per log10 bin, from the first bin used to the last, ticks at decades."""
    used = [i for i, c in enumerate(counts) if c > 0]
    if not used:
        return "<p>(never fires)</p>"
    first, last = used[0], used[-1]
    edges = histogram_edges().tolist()
    shown, tallest = counts[first : last + 1], max(counts)
    bar = width / len(shown)
    plot = height - 18
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="activation histogram"><rect width="{width}" height="{plot}" fill="#fafafa"/>']
    for i, count in enumerate(shown):
        h = plot * count / tallest
        parts.append(f'<rect x="{i * bar:.1f}" y="{plot - h:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
                     f'fill="#f59e0b"><title>{count} between {10 ** edges[first + i]:.3g} and '
                     f'{10 ** edges[first + i + 1]:.3g}</title></rect>')
    decades = [i for i in range(first + 1, last + 1) if abs(edges[i] - round(edges[i])) < 1e-9]
    placed: list[float] = []
    for i in [first, last + 1, *decades]:  # the ends first; a decade too close to a placed label is left out
        x = (i - first) * bar
        if any(abs(x - p) < 36 for p in placed):
            continue
        placed.append(x)
        anchor = "start" if x < 20 else "end" if x > width - 20 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{height - 4}" font-size="10" text-anchor="{anchor}">'
                     f'{_tick(10 ** edges[i])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _token_table(examples: LatentExamples, ids, logits, title: str) -> str:
    rows = "".join(f'<tr><td><span class="tok">{_shown(examples.token_text(t), alone=True)}</span></td><td class="n">'
                   f"{v:+.3g}</td></tr>" for t, v in zip(ids.tolist(), logits.tolist()))
    return f"<div><h3>{_e(title)}</h3><table>{rows}</table></div>"


def latent_page(examples: LatentExamples, latent: int, *, blind: bool = False) -> str:
    """A complete self-contained HTML document for one latent (inline CSS, no script, no network). blind=True
    omits everything that identifies the SAE: its name, path, architecture, model and site, the latent's index, the
    nearest latents, and the gradient attribution (only one architecture has it)."""
    if not 0 <= latent < examples.d_sae:
        raise IndexError(f"latent {latent} is out of range for an SAE of {examples.d_sae} latents")
    info, sae = examples.info, examples.info["sae"]
    max_act = float(examples.max_activation[latent])
    fired = int(examples.firing_counts[latent])
    attribution = info.get("attribution", False) and not blind
    title = "Latent" if blind else f"{sae['name']}: latent {latent}"
    head = f"<h1>{_e(title)}</h1>"
    if not blind:
        head += (f'<p class="sub">{_e(sae["variant"])} SAE, {sae["d_sae"]} latents, {_e(info["model"])} at '
                 f'{_e(info["site"])}</p>')
    density = fired / max(1, info["n_tokens"])
    head += (f'<p class="stats"><span>fires on <b>{_percent(density)}</b> of tokens ({fired:,} of '
             f'{info["n_tokens"]:,})</span><span>max activation <b>{max_act:.4g}</b></span></p>')

    panels = [f"<div><h3>Activations (log scale)</h3>{_histogram_svg(examples.histogram[latent].tolist())}</div>"]
    if examples.promoted is not None:
        panels.append(_token_table(examples, examples.promoted[latent], examples.promoted_logits[latent],
                                   "Promoted tokens"))
        panels.append(_token_table(examples, examples.suppressed[latent], examples.suppressed_logits[latent],
                                   "Suppressed tokens"))
    if not blind:
        links = "".join(
            f"<tr><td>{_neighbour_link(examples, j)}</td><td class=\"n\">{c:.3f}</td></tr>"
            for j, c in zip(examples.neighbours[latent].tolist(), examples.neighbour_cosines[latent].tolist()))
        panels.append(f"<div><h3>Nearest latents (decoder cosine)</h3><table>{links}</table></div>")
    body = [head, f'<section class="row">{"".join(panels)}</section>']

    def block(items: list[dict]) -> str:
        return "".join(_example(examples, ex, max_act, attribution) for ex in items) or "<p>(none)</p>"

    note = " Second line: gradient attribution f·(d·∇L), red raises the loss, blue lowers it." if attribution else ""
    body.append(f'<section id="top"><h2>Top activations</h2><p class="sub">Each context around its highest '
                f'activation of this latent (outlined); shading and hover: the activation.{note}</p>'
                f"{block(examples.top.slot(latent))}</section>")
    n_bands = info["n_bands"]
    bands = []
    for b in reversed(range(n_bands)):
        bands.append(f"<h3>Peak activation in ({b / n_bands:.2g}, {(b + 1) / n_bands:.2g}] x max</h3>"
                     f"{block(examples.bands.slot((latent, b)))}")
    body.append(f'<section id="bands"><h2>Samples by activation band</h2>{"".join(bands)}</section>')
    return _document(title, "\n".join(body))


def _neighbour_link(examples: LatentExamples, j: int) -> str:
    return f'<a href="{j}.html">{j}</a>' if examples.firing_counts[j] > 0 else f"{j} (dead)"


# ---------------------------------------------------------------------------------------------------------------
# The index and the site


def index_page(examples: LatentExamples, pages: Iterable[int] | None = None) -> str:
    """The index: every live latent with its firing frequency, max activation and peak tokens, a filter box and a
    sort order; dead latents listed apart. Latents in `pages` (default: every live one) link to latents/N.html."""
    info, sae = examples.info, examples.info["sae"]
    linked = set(range(examples.d_sae) if pages is None else pages)
    density = examples.density.tolist()
    rows = []
    for i in range(examples.d_sae):
        if examples.firing_counts[i] == 0:
            continue
        peaks = [examples.token_text(int(ex["tokens"][info["window"][0]])) for ex in examples.top.slot(i)[:3]]
        search = " ".join([str(i), *peaks]).lower()
        label = f'<a href="latents/{i}.html">{i}</a>' if i in linked else str(i)
        tokens = " ".join(f'<span class="tok">{_shown(t, alone=True)}</span>' for t in peaks)
        rows.append(f'<tr data-latent="{i}" data-density="{density[i]:.6g}" '
                    f'data-max="{float(examples.max_activation[i]):.6g}" data-search="{_e(search)}">'
                    f'<td class="n">{label}</td><td class="n">{_percent(density[i])}</td>'
                    f'<td class="n">{float(examples.max_activation[i]):.4g}</td><td>{tokens}</td></tr>')
    dead = examples.dead()
    options = "".join(f'<option value="{v}">{_e(label)}</option>' for v, label in _SORTS)
    body = (f"<h1>{_e(sae['name'])}: feature dashboard</h1>"
            f'<p class="sub">{_e(sae["variant"])} SAE, {sae["d_sae"]} latents, {_e(info["model"])} at '
            f'{_e(info["site"])}; {info["n_tokens"]:,} held-out tokens in {info["n_contexts"]:,} contexts</p>'
            f'<p><input id="filter" type="search" size="40" placeholder="filter: latent number or token text" '
            f'aria-label="filter"> <select id="sort" aria-label="sort">{options}</select> '
            f'<span id="shown">{len(rows)}</span> of {len(rows)} live latents shown</p>'
            f'<table id="latents"><thead><tr><th>latent</th><th>fires on</th><th>max activation</th>'
            f'<th>peak tokens</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<section id="dead"><h2>Dead latents ({len(dead)})</h2><p class="dead">'
            f'{", ".join(map(str, dead)) or "none"}</p></section>')
    return _document(f"{sae['name']}: feature dashboard", body, _INDEX_SCRIPT)


def write_dashboard(examples: LatentExamples, out, latents: Iterable[int] | None = None) -> Path:
    """Write out/index.html and out/latents/N.html for each latent in `latents` (default: every live latent; a dead
    latent has nothing to show). Each file is written atomically. Returns the index's path."""
    out = Path(out)
    pages = [i for i in range(examples.d_sae) if examples.firing_counts[i] > 0] if latents is None else list(latents)
    for i in pages:
        if not 0 <= i < examples.d_sae:
            raise IndexError(f"latent {i} is out of range for an SAE of {examples.d_sae} latents")
    (out / "latents").mkdir(parents=True, exist_ok=True)
    for i in pages:
        write_atomic(out / "latents" / f"{i}.html", latent_page(examples, i))
    index = out / "index.html"
    write_atomic(index, index_page(examples, pages))
    return index
