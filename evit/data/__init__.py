"""The input pipeline of `evit train`, `evit eval` and the figures, one job per module:

- `catalog`: the datasets and augments by name, their normalization and the files they live in (torch-free:
  the run config's schema reads it);
- `datasets`: the raw datasets (ImageNet, any ImageFolder tree, Fashion-MNIST) and their layouts on disk;
- `packed`: `evit pack` and the packs it writes (``data.format: packed``): shard files plus an index per split;
- `transforms`: the per-image transforms of ``train.augment`` (the worker half of training's input);
- `stage`: `BatchStage`, the device half of training's input (normalization, erasing, Mixup / CutMix);
- `seeding`: per-sample seeds, and `SeededDataset`, which reseeds before transforming a sample;
- `samplers`: the fixed subsets, the training sampler and the evaluation sharding;
- `loaders`: the training and evaluation loaders of a run config: the one place that chooses torch or DALI;
- `dali`, `dali_augment`: the NVIDIA DALI loaders of ``data.loader: dali`` (only these import DALI).

This package's ``__init__`` imports nothing, so `import evit.data.catalog` stays light.
"""
