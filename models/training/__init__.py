"""Fine-tuning LLM-CXR on a site's own data (``cxr-node train``, issue #28).

One concept a module:

- :mod:`models.training.recipe`: :class:`~models.training.recipe.TrainConfig`, the paper's
  two-stage recipe as defaults, loadable from TOML/JSON;
- :mod:`models.training.paraphrases`: the 10 instructions per direction drawn in training;
- :mod:`models.training.mimic`: a MIMIC-CXR-JPG tree -> a :mod:`models.dataset` manifest;
- :mod:`models.training.codes_cache`: each image's 256 VQ-GAN codes, encoded once;
- :mod:`models.training.examples`: token ids and labels of one training example;
- :mod:`models.training.batches`: the stage's example list, the torch dataset, the collator;
- :mod:`models.training.metrics`: the CSV metrics callback;
- :mod:`models.training.trainer`: the Hugging Face ``Trainer`` run;
- :mod:`models.training.bundle_out`: the trained model written as a new model bundle.

Nothing here imports pydicom: images are read by a caller-supplied ``load_gray8``.
See ``docs/training.md``.
"""
