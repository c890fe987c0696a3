"""Data sources (COCO JSON, synthetic shapes) producing numpy records."""

from pointrend_jax.data.coco import (CocoCategories, CocoDataset, coco_categories,
                                     decode_masks, decode_segmentation, filter_empty,
                                     load_coco_dataset, load_coco_json, load_image,
                                     read_image, read_label_map)
from pointrend_jax.data.synthetic import (SyntheticConfig, SyntheticDataset,
                                          ensure_synthetic_dataset, load_synthetic_records)
