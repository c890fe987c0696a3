"""Checkpoints: detectron2 / Caffe2 / PyTorch files read without torch, and converted models.

* :mod:`~pointrend_jax.checkpoint.safe_pickle`: the restricted unpickler and torch containers;
* :mod:`~pointrend_jax.checkpoint.d2_reader`: a file -> canonical detectron2 names -> arrays;
* :mod:`~pointrend_jax.checkpoint.d2_matching`: names and shapes matched against a model's;
* :mod:`~pointrend_jax.checkpoint.d2_model`: detectron2 weights into a PointRend model;
* :mod:`~pointrend_jax.checkpoint.orbax_io`: converted checkpoints (orbax state + config JSON).
"""
