"""The experiment pipeline (``pip install 'fastclip[experiments]'``): the training loop and
its clipping methods, the paper's models, datasets, attacks, grids on SLURM or one machine,
results, reports and the commands. It builds on the library (``fastclip``); the library
never imports it."""
