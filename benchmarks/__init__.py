"""Throughput measurements; every one imports the real code (tools, pipeline, train) and prints figures.

- `python -m imt.benchmarks.run` (`imt-bench`): images/sec per loader, pipeline only and feeding
  train.loop.train_step, against the model-bound ceiling; sweeps; JSON, Markdown, PNG, profile.
- `python -m imt.benchmarks.shards`: tools.make_shards throughput.
- `python -m imt.benchmarks.learning`: a recipe (recipes/cpu_small.yaml) from scratch on Imagenette: top-1 per
  epoch and the budget check (6 minutes, 75% on the 2-core CPU).
- `python -m imt.benchmarks.transfer`: pretrain on 5 Imagenette classes, fine-tune on the other 5 vs scratch.
Figures, with date, machine and command, go to benchmarks/RESULTS.md.
"""
