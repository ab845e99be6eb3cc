"""Training data: data sets (edm.data.sets) named by configs (edm.data.registry), their order
(edm.data.stream), pixels <-> model space (edm.data.pixels) and EDM's augmentation (edm.data.augment)."""

from .pixels import as_model_space, read_image, to_model_space, to_uint8
from .latents import LatentDataset, latent_name
from .registry import (
    BUNDLED, DATA_IDENTITY, DATASETS, UNRECORDED_RESAMPLE, DatasetConfig, build_dataset, check_dataset, dataset_images, dataset_record,
    other_images, resample_unrecorded,
)
from .sets import (
    FASHION_MNIST_DEBIAN_ROOT, IMAGE_EXTENSIONS, BadImagesError, DatasetNotFoundError, ImageDataset, ImageFolderDataset,
    ImageSource, NoLabelsError, Subset, TensorImageDataset, XFlip, contents_key, image_files, resolved_root, root_contents_key, load_cifar10, load_digits, load_mnist, read_idx,
)
from .stream import StreamBatchSampler, epoch_permutation, make_loader, micro_batch_start

__all__ = [
    "DatasetConfig", "DATASETS", "BUNDLED", "DATA_IDENTITY", "build_dataset", "check_dataset", "dataset_images", "dataset_record",
    "other_images", "resample_unrecorded",
    "UNRECORDED_RESAMPLE", "DatasetNotFoundError", "BadImagesError", "NoLabelsError", "ImageDataset",
    "TensorImageDataset", "ImageFolderDataset", "ImageSource", "XFlip", "Subset", "load_digits", "load_mnist",
    "load_cifar10", "read_idx", "epoch_permutation", "micro_batch_start", "StreamBatchSampler", "make_loader", "to_model_space", "to_uint8", "read_image",
    "as_model_space", "FASHION_MNIST_DEBIAN_ROOT", "IMAGE_EXTENSIONS", "contents_key", "image_files", "resolved_root", "root_contents_key", "LatentDataset", "latent_name",
]
