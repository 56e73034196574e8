"""The datasets of the standard zero-shot suite: where each is read, its class names, templates
and metric. The one table the suites, the runner and the "suite" evaluator read.

Names are CLIP_benchmark's dataset keys (LAION-AI/CLIP_benchmark 1.6.1, `datasets/builder.py`,
`dataset_collection`) and DataComp's task keys (mlfoundations/datacomp `tasklist.yml`); `title` is
the column of open_clip's `docs/openclip_results.csv`. Metrics (CLIP_benchmark's JSON keys):
  classification: acc1, acc5 (NaN under 5 classes, as CLIP_benchmark), mean_per_class_recall
    (sklearn's balanced accuracy: the mean recall over the classes that have an image);
  retrieval: image_retrieval_recall@k (text -> image), text_retrieval_recall@k (image -> text),
    k in 1, 5, 10, and DataComp's mean_recall@1 (their mean);
  multi-label: mean_average_precision.
`main_metric` is DataComp's (acc1 unless its tasklist names another).

TFDS splits follow VTAB (google-research/task_adaptation, `data/*.py`), which CLIP_benchmark's
`vtab/` sets read: eurosat and resisc45 test = train[80%:], smallnorb test = test[50%:], clevr
test = validation, dsprites test = train[90%:] (its images times 255). Webdataset copies are
CLIP_benchmark's (HF `clip-benchmark/wds_<name>`, `/` in the key written `-`) or DataComp's own
(`djghosh/wds_<name>_test`), read from `<data_dir>/wds_<name>/test/*.tar`.
"""
from __future__ import annotations

import dataclasses

CLASSIFICATION, RETRIEVAL, MULTILABEL = "zeroshot_classification", "zeroshot_retrieval", "multilabel"


@dataclasses.dataclass(frozen=True)
class Tfds:
    """A TFDS copy of a dataset. `label_key`: its integer class feature; `labels_key`: a
    Sequence(ClassLabel) (multi-label); `caption_key`: captions (retrieval); `derive`: a function
    of vljax/suites/labels.py making VTAB's label from other features; `subset`: an ImageNet
    subset key (labels in ImageNet's 1000 classes mapped to the subset's, vljax/suites/tables.py);
    `names`: CLIP_benchmark's clean-up of the TFDS class names (tables.clean_names);
    `image_scale`: stored pixel values times this (dSprites' 0 / 1 images, as VTAB);
    `manual`: what TFDS needs downloaded by hand."""
    name: str
    split: str = "test"
    label_key: str | None = "label"
    labels_key: str | None = None
    caption_key: str | None = None
    derive: str | None = None
    subset: str | None = None
    names: str | None = None
    image_scale: int = 1
    manual: str | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset of the suite.

    name: CLIP_benchmark / DataComp key. task: CLASSIFICATION, RETRIEVAL or MULTILABEL.
    title: openclip_results.csv column (None: not one of its 38). main_metric: DataComp's.
    class_names: key in en_classnames.json for the TFDS copy; None = TFDS's ClassLabel names as
      CLIP_benchmark takes them (`Tfds.names`). A webdataset copy always uses its classnames.txt.
    templates: key in en_zeroshot_classification_templates.json; a webdataset copy's own
      zeroshot_classification_templates.txt wins where it has one (as in CLIP_benchmark); None =
      only that file (DataComp's own tasks).
    tfds: the TFDS copy, or None (webdataset only). hf_repo: the webdataset copy's HF repo.
    unsupported: why vljax cannot score this task (it is reported, never run), or None.
    """
    name: str
    task: str
    title: str | None
    templates: str | None
    tfds: Tfds | None
    class_names: str | None = None
    main_metric: str = "acc1"
    hf_repo: str | None = None
    unsupported: str | None = None

    @property
    def wds_name(self) -> str:
        """The directory of the webdataset copy under --data_dir: wds_<name, `/` -> `-`>."""
        return "wds_" + self.name.replace("/", "-")

    @property
    def repo(self) -> str:
        return self.hf_repo or f"clip-benchmark/{self.wds_name}"


def _c(name, title, templates, tfds, class_names=None, main="acc1", **kw):
    return Dataset(name, CLASSIFICATION, title, templates, tfds, class_names, main, **kw)


_PREP_IMAGENET = ("ILSVRC2012_img_val.tar from image-net.org into <data_dir>/downloads/manual/")
_MPC = "mean_per_class_recall"

DATASETS: dict[str, Dataset] = {d.name: d for d in [
    # ImageNet and its distribution shifts (class names: OpenAI's, as CLIP_benchmark ships them).
    _c("imagenet1k", "ImageNet 1k", "imagenet1k", Tfds("imagenet2012", "validation", manual=_PREP_IMAGENET),
       "imagenet1k"),
    _c("imagenetv2", "ImageNet v2", "imagenet1k", Tfds("imagenet_v2/matched-frequency"), "imagenet1k"),
    _c("imagenet_sketch", "ImageNet Sketch", "imagenet1k", Tfds("imagenet_sketch"), "imagenet1k"),
    _c("imagenet-a", "ImageNet-A", "imagenet1k", Tfds("imagenet_a", subset="imagenet-a"), "imagenet1k"),
    _c("imagenet-r", "ImageNet-R", "imagenet1k", Tfds("imagenet_r", subset="imagenet-r"), "imagenet1k"),
    _c("imagenet-o", "ImageNet-O", "imagenet1k", None, "imagenet1k"),
    _c("objectnet", "ObjectNet", "imagenet1k", None),
    # CLIP_benchmark's other classification sets.
    _c("cifar10", "CIFAR-10", "cifar10", Tfds("cifar10")),
    _c("vtab/cifar10", None, "cifar10", Tfds("cifar10")),
    _c("vtab/cifar100", "CIFAR-100", "cifar100", Tfds("cifar100")),
    _c("food101", "Food-101", "food101", Tfds("food101", "validation", names="underscores")),
    _c("sun397", "SUN397", "sun397", Tfds("sun397/tfds", names="sun397")),
    _c("cars", "Stanford Cars", "cars", Tfds("cars196")),
    _c("fgvc_aircraft", "FGVC Aircraft", "fgvc_aircraft", None, main=_MPC),
    _c("mnist", "MNIST", "mnist", Tfds("mnist"), "mnist"),
    _c("stl10", "STL-10", "stl10", Tfds("stl10")),
    _c("gtsrb", "GTSRB", "gtsrb", None, "gtsrb"),
    _c("country211", "Country211", "country211", None, "country211"),
    _c("renderedsst2", "Rendered SST2", "renderedsst2", None),
    _c("fer2013", None, "fer2013", None, "fer2013"),
    _c("voc2007", "Pascal VOC 2007", "voc2007", None),  # object crops: webdataset only
    Dataset("voc2007_multilabel", MULTILABEL, None, "voc2007_multilabel",
            Tfds("voc/2007", label_key=None, labels_key="labels"), main_metric="mean_average_precision"),
    # VTAB, as CLIP_benchmark reads it (VTAB's splits and derived labels).
    _c("vtab/caltech101", "Caltech-101", "caltech101", Tfds("caltech101"), "caltech101_vtab", main=_MPC),
    _c("vtab/clevr_count_all", "CLEVR Counts", "clevr_count_all",
       Tfds("clevr", "validation", label_key=None, derive="clevr_count"), "clevr_count_all"),
    _c("vtab/clevr_closest_object_distance", "CLEVR Distance", "clevr_closest_object_distance",
       Tfds("clevr", "validation", label_key=None, derive="clevr_distance"), "clevr_closest_object_distance"),
    _c("vtab/diabetic_retinopathy", None, "diabetic_retinopathy",
       Tfds("diabetic_retinopathy_detection/btgraham-300",
            manual="the Kaggle files (kaggle.com/c/diabetic-retinopathy-detection) into "
                   "<data_dir>/downloads/manual/"), "diabetic_retinopathy"),
    _c("vtab/dmlab", None, "dmlab", Tfds("dmlab"), "dmlab"),
    _c("vtab/dsprites_label_orientation", None, "dsprites_label_orientation",
       Tfds("dsprites", "train[90%:]", label_key="label_orientation", image_scale=255)),
    _c("vtab/dsprites_label_x_position", None, "dsprites_label_x_position",
       Tfds("dsprites", "train[90%:]", label_key="label_x_position", image_scale=255)),
    _c("vtab/dtd", "Describable Textures", "dtd", Tfds("dtd")),
    _c("vtab/eurosat", "EuroSAT", "eurosat", Tfds("eurosat/rgb", "train[80%:]"), "eurosat"),
    _c("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", "kitti_closest_vehicle_distance",
       Tfds("kitti", label_key=None, derive="kitti_distance"), "kitti_closest_vehicle_distance"),
    _c("vtab/flowers", "Oxford Flowers-102", "flowers", Tfds("oxford_flowers102"), main=_MPC),
    _c("vtab/pets", "Oxford-IIIT Pet", "pets", Tfds("oxford_iiit_pet"), "pets", main=_MPC),
    _c("vtab/pcam", "PatchCamelyon", "pcam", Tfds("patch_camelyon"), "pcam"),
    _c("vtab/resisc45", "RESISC45", "resisc45",
       Tfds("resisc45", "train[80%:]", manual="NWPU-RESISC45.rar into <data_dir>/downloads/manual/")),
    _c("vtab/smallnorb_label_azimuth", None, "smallnorb_label_azimuth",
       Tfds("smallnorb", "test[50%:]", label_key="label_azimuth")),
    _c("vtab/smallnorb_label_elevation", None, "smallnorb_label_elevation",
       Tfds("smallnorb", "test[50%:]", label_key="label_elevation")),
    _c("vtab/svhn", "SVHN", "svhn", Tfds("svhn_cropped"), "svhn"),
    # Retrieval (COCO: Karpathy's 5k test split; Flickr30k: its 1k test split).
    Dataset("mscoco_captions", RETRIEVAL, "MSCOCO", None,
            Tfds("coco_captions", label_key=None, caption_key="captions/text"), main_metric="mean_recall@1"),
    Dataset("flickr30k", RETRIEVAL, "Flickr", None, None, main_metric="mean_recall@1"),
    Dataset("flickr8k", RETRIEVAL, None, None, None, main_metric="mean_recall@1"),
    # DataComp's own tasks (mlfoundations/datacomp tasklist.yml; webdataset copies on HF djghosh/).
    _c("wilds/iwildcam", "iWildCam", None, None, main="F1-macro_all", hf_repo="djghosh/wds_wilds-iwildcam_test"),
    _c("wilds/camelyon17", "Camelyon17", None, None, hf_repo="djghosh/wds_wilds-camelyon17_test"),
    _c("wilds/fmow", "FMoW", None, None, main="acc_worst_region", hf_repo="djghosh/wds_wilds-fmow_test"),
    _c("fairness/dollar_street", "Dollar Street", None, None, main="acc_top5_wg",
       hf_repo="djghosh/wds_fairness-dollar_street_test"),
    _c("fairness/geode", "GeoDE", None, None, main="acc_wg", hf_repo="djghosh/wds_fairness-geode_test"),
    Dataset("misc/winogavil", CLASSIFICATION, "WinoGAViL", None, None, main_metric="jaccard_score_10-12",
            hf_repo="djghosh/wds_misc-winogavil_test",
            unsupported="WinoGAViL scores association choices (Jaccard), not classification or retrieval: "
                        "run DataComp's evaluate.py for it"),
]}

# Metrics vljax computes per task (CLIP_benchmark's keys); a main metric outside these (the
# worst-group scores of FMoW, Dollar Street, GeoDE: they need the records' region / income
# metadata) is reported missing.
COMPUTED = {CLASSIFICATION: ("acc1", "acc5", "mean_per_class_recall", "F1-macro_all"),
            RETRIEVAL: ("image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10",
                        "text_retrieval_recall@1", "text_retrieval_recall@5", "text_retrieval_recall@10",
                        "mean_recall@1"),
            MULTILABEL: ("mean_average_precision",)}


def get(name: str) -> Dataset:
    """The dataset `name`; an unknown name is an error listing the known ones."""
    if name not in DATASETS:
        raise KeyError(f"unknown suite dataset {name!r} (known: {sorted(DATASETS)})")
    return DATASETS[name]
