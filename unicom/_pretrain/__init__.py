"""Cluster discrimination pretraining, from image-text data to pseudo classes.

1. :mod:`unicom._pretrain.features`: one L2-normalised feature per sample (CLIP image and
   caption fusion, a UNICOM model, or raw pixels), from webdataset tars or image folders.
2. :mod:`unicom._pretrain.kmeans`: spherical k-means of those features into K pseudo classes.
3. :mod:`unicom._pretrain.dataset`: the (image, pseudo label) stream that
   :mod:`unicom.programs.pretrain` trains a VisionTransformer on with Partial FC.

Nothing is imported here: ``import unicom._pretrain`` stays cheap; import the submodules.
"""
