"""The blind rating study of paper A §4.3: raters see one latent's dashboard at a time, in a random order of their
own, without knowing which SAE it came from, and label it Yes / Maybe / No with an explanation.

- `build`: sampling latents (uniformly among those that fire on held-out text) and building the study file;
- `db`: the study file (SQLite: SAEs, items, raters and their orders, labels);
- `server`: the local web server raters use;
- `stats` and `report`: the paired Wilcoxon-Pratt test, BCa interval, Mann-Whitney U and contingency tables, as
  Markdown, JSON and a figure.

`build` loads the language model; the others need neither it nor torch's models.
"""
