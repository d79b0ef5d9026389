"""LightningDataModules, data sets and augmentation pipelines."""
