"""The machinery of ``fastclip-reproduce`` (experiments/reproduce.py; its command line is
``fastclip.pipeline.cli.reproduce``): the paper's SimpleConv grid run step by step.

- ``settings``: the presets, the settings the flags make of them, the command lines of the steps;
- ``steps``: the steps in order, each run only where its outputs are missing or out of date;
- ``writer``: the Markdown report and the figures it shows;
- ``summary``: the sentences under each of its tables, made from the table's numbers;
- ``publishing``: ``DIR/results.md``, the results tables of every report published into ``DIR``.
"""
