"""The suites: named lists of datasets (vljax/suites/datasets.py), in report order.

imagenet: ImageNet-1k and its distribution shifts (CLIP_benchmark's `imagenet_robustness` + 1k).
vtab+: CLIP_benchmark 1.6.1's `vtab+` collection (datasets/builder.py `dataset_collection`), 36 sets.
retrieval: CLIP_benchmark's `retrieval` collection: COCO 5k (Karpathy test), Flickr30k 1k, Flickr8k.
datacomp: DataComp's 38 evaluation tasks (mlfoundations/datacomp tasklist.yml), the columns of
  open_clip's openclip_results.csv.
voc2007: Pascal VOC 2007 multi-label (mAP), as CLIP_benchmark's voc2007_multilabel.
"""
from __future__ import annotations

from vljax.suites import datasets

_IMAGENET = ("imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "objectnet")
_VTAB = ("vtab/caltech101", "vtab/cifar10", "vtab/cifar100", "vtab/clevr_count_all",
         "vtab/clevr_closest_object_distance", "vtab/diabetic_retinopathy", "vtab/dmlab",
         "vtab/dsprites_label_orientation", "vtab/dsprites_label_x_position", "vtab/dtd", "vtab/eurosat",
         "vtab/kitti_closest_vehicle_distance", "vtab/flowers", "vtab/pets", "vtab/pcam", "vtab/resisc45",
         "vtab/smallnorb_label_azimuth", "vtab/smallnorb_label_elevation", "vtab/svhn")

SUITES: dict[str, tuple[str, ...]] = {
    "imagenet": _IMAGENET,
    "vtab+": _IMAGENET + ("fer2013", "voc2007", "voc2007_multilabel", "sun397", "cars", "fgvc_aircraft",
                          "mnist", "stl10", "gtsrb", "country211", "renderedsst2") + _VTAB,
    "retrieval": ("mscoco_captions", "flickr30k", "flickr8k"),
    # In openclip_results.csv's column order.
    "datacomp": ("imagenet1k", "vtab/caltech101", "cifar10", "vtab/cifar100", "vtab/clevr_count_all",
                 "vtab/clevr_closest_object_distance", "country211", "vtab/dtd", "vtab/eurosat",
                 "fgvc_aircraft", "food101", "gtsrb", "imagenet_sketch", "imagenetv2", "imagenet-a",
                 "imagenet-o", "imagenet-r", "vtab/kitti_closest_vehicle_distance", "mnist", "objectnet",
                 "vtab/flowers", "vtab/pets", "voc2007", "vtab/pcam", "renderedsst2", "vtab/resisc45", "cars",
                 "stl10", "sun397", "vtab/svhn", "flickr30k", "mscoco_captions", "misc/winogavil",
                 "wilds/iwildcam", "wilds/camelyon17", "wilds/fmow", "fairness/dollar_street",
                 "fairness/geode"),
    "voc2007": ("voc2007_multilabel",),
}


def suite(name: str) -> list[datasets.Dataset]:
    """The datasets of suite `name`; an unknown name is an error listing the suites."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r} (known: {', '.join(SUITES)})")
    return [datasets.get(n) for n in SUITES[name]]
