"""Datasets and the batch pipeline.

``load_dataset(name, ...)`` returns a `Dataset` of host numpy splits (deterministic train/val/test from a
seed, standardisation fitted on train); ``batch_iterator(split, batch_size, ...)`` yields shuffled,
resumable ``(x, y)`` device batches. Registered data sets (`dataset_names()`): "digits" (default,
embedded in scikit-learn), "mnist", "fashion_mnist" (IDX files), "cifar10" (python pickle batches),
the synthetic "blobs", "teacher_student" and "quadratic" (exact quadratic loss, closed-form Hessian
`quadratic_hessian`), and "seq2seq" (generated reverse/sort/add/dates problems of token ids with a label per
position, `jaxnn.data.sequences`) and "text" (language-model windows of a corpus folder or of a generated
language, `jaxnn.data.text`).
"""

from jaxnn.data.cifar import read_cifar_batch
from jaxnn.data.dataset import (
    IGNORE_LABEL,
    CorruptFileError,
    Dataset,
    SourceData,
    Split,
    Standardization,
    apply_standardization,
    default_data_dir,
    fit_standardization,
    noisy_labels,
)
from jaxnn.data.download import DownloadError, file_md5
from jaxnn.data import language, sequences, text
from jaxnn.data.idx import read_idx
from jaxnn.data.pipeline import (
    BatchIterator,
    batch_iterator,
    batch_rows,
    epoch_permutation,
    full_batch,
    host_stacked_batches,
    stacked_batches,
    steps_per_epoch,
)
from jaxnn.data.registry import (
    DATASETS,
    DEFAULT_DATASET,
    dataset_names,
    dataset_options,
    load_dataset,
    register_dataset,
)
from jaxnn.data.synthetic import (
    quadratic_eigenvalues,
    quadratic_hessian,
    quadratic_loss,
    quadratic_minimizer,
    teacher_forward,
    teacher_params,
)

__all__ = [
    "BatchIterator",
    "CorruptFileError",
    "IGNORE_LABEL",
    "DATASETS",
    "DEFAULT_DATASET",
    "Dataset",
    "DownloadError",
    "SourceData",
    "Split",
    "Standardization",
    "apply_standardization",
    "batch_iterator",
    "batch_rows",
    "dataset_names",
    "dataset_options",
    "default_data_dir",
    "epoch_permutation",
    "file_md5",
    "fit_standardization",
    "full_batch",
    "host_stacked_batches",
    "load_dataset",
    "noisy_labels",
    "quadratic_eigenvalues",
    "quadratic_hessian",
    "quadratic_loss",
    "quadratic_minimizer",
    "read_cifar_batch",
    "read_idx",
    "register_dataset",
    "language",
    "sequences",
    "text",
    "stacked_batches",
    "steps_per_epoch",
    "teacher_forward",
    "teacher_params",
]
