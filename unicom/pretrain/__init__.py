"""Cluster discrimination pretraining, from image-text data to pseudo classes.

1. :mod:`unicom.pretrain.features`: one L2-normalised feature per sample (CLIP image and
   caption fusion, a UNICOM model, or raw pixels), from webdataset tars or image folders.
2. :mod:`unicom.pretrain.kmeans`: spherical k-means of those features into K pseudo classes.

Nothing is imported here: ``import unicom.pretrain`` stays cheap; import the submodules.
"""
