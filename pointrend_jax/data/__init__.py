"""Data: dataset records -> transformed images -> static-shape batches.

* :mod:`~pointrend_jax.data.splits`: ``config.data.train`` / ``val`` -> records;
* :mod:`~pointrend_jax.data.coco`, :mod:`~pointrend_jax.data.cityscapes`,
  :mod:`~pointrend_jax.data.synthetic`, :mod:`~pointrend_jax.data.tfds_builders`: the sources;
* :mod:`~pointrend_jax.data.transforms`: detectron2's resize / crop / flip / colour transforms;
* :mod:`~pointrend_jax.data.batching`: the padded :data:`~pointrend_jax.data.batching.Batch`;
* :mod:`~pointrend_jax.data.pipeline`: the grain train and eval loaders.
"""
