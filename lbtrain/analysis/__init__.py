"""The analysis of finished runs: it reads run folders and never trains.

Layers, each module importing only those above it in this list (and lbtrain's lower layers: results, identity,
config, regime, metrics, checkpoint; interp also models, data, ghost BN and devices), never the run layer
(trainer, cli, preflight, session, instruments.probes); tests/test_layers.py checks it:

- regimes: a regime's report label and column rank, from the presets in configs/regime/;
- runs: finding run folders and reading them (results.json, TensorBoard scalars), grouping keys, numbers;
- tables: Markdown and CSV tables, written atomically;
- figures: the one figure set-up (style, log axes, legend outside, labels that never repeat, saving);
- scaling: the report's scaling section (steps to target, critical batch, sharpness, noise scale);
- report: Table 1, the run tables and curves (`lbtrain-report`);
- interp: loss along the line between two runs' weights (`lbtrain-interp`).
"""
