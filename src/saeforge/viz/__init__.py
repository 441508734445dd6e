"""Figures (matplotlib, drawn on the Agg canvas; no display needed): `eval_figures` for one evaluation, `pareto`
for a sweep."""
