"""lbtrain's search sweeper (`hydra/sweeper=search`): a quasi-random search per batch size, with confirmation runs
of each batch's best trial. `_plan` holds the arithmetic (points, overrides, budget, choice of the best trial; the
underscore keeps it out of the plugin scan Hydra runs at every start), `search_sweeper` the Hydra plugin that
launches the runs. Hydra finds the plugin by scanning the `hydra_plugins` namespace package (pyproject.toml lists
`hydra_plugins` itself, so that an editable install maps the folder and the scan sees it); its configs are
lbtrain's `configs/hydra/sweeper/search.yaml` and `configs/hydra/sweeper/space/*.yaml`.
"""
