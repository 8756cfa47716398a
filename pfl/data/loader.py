"""On-device batching: the pool lives on the training device, batches are index gathers.

Replaces per-sample PIL transforms and DataLoader workers (DESIGN: speed). A batch is ``inputs[idx]`` passed through
the transform of its modality (:data:`TRANSFORMS`): images through :class:`~pfl.data.transforms.ImageTransform`
(augmentation for training batches, normalization, resizing to the model's input size; by default PFLlib's CIFAR
normalization ``(x / 255 - 0.5) / 0.5`` alone), sequences through :class:`~pfl.data.sequences.SequenceTransform`,
character ids through :class:`~pfl.data.text.TextTransform`, waveforms through the log-mel front end
:class:`~pfl.data.audio.AudioTransform`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pfl.data.audio import AudioTransform
from pfl.data.datasets import Dataset
from pfl.data.partition import Partition, split_validation
from pfl.data.sequences import SequenceTransform
from pfl.data.text import TextTransform
from pfl.data.transforms import ImageTransform


ACCELERATOR_INFERENCE_BATCH = 2000
CPU_INFERENCE_VALUES = 600_000  # input values per inference batch on CPU (195 CIFAR or 48 Tiny-ImageNet images)


def inference_batch_size(configured: int | None, device: torch.device, sample_shape: tuple[int, ...]) -> int:
    """Samples per inference batch: ``configured`` if set, else a default for the device.

    On an accelerator the default is 2000. On CPU it is the batch of ``CPU_INFERENCE_VALUES``
    input values, small enough for the CNN's activations to stay in cache: on the 2-core
    development machine the 32x32 CNN infers 19,800 images/s in batches of 200 against
    9,900 in batches of 2000, and the 64x64 one 3,300 images/s in batches of 50 against 1,800.

    Args:
        configured: the config's ``eval_batch_size`` (``None``: use the default).
        device: where inference runs.
        sample_shape: one sample's shape, e.g. (3, 32, 32).
    """
    if configured is not None:
        return configured
    if device.type != "cpu":
        return ACCELERATOR_INFERENCE_BATCH
    return max(1, CPU_INFERENCE_VALUES // math.prod(sample_shape))


Transform = ImageTransform | SequenceTransform | TextTransform | AudioTransform  # a modality's on-device transform
TRANSFORMS: dict[str, type[Transform]] = {"image": ImageTransform, "sequence": SequenceTransform,
                                          "text": TextTransform, "audio": AudioTransform}  # modality -> transform


class DeviceData:
    """A dataset's inputs and targets resident on one device.

    Args:
        dataset: the pool; its inputs (uint8 images (N, C, H, W), float sequences (N, T, F), uint8 character ids
            (N, L), int16 waveforms (N, S)) and targets are copied to ``device`` once.
        device: training device.
        transform: what a gathered batch goes through (default: the modality's with its defaults, :data:`TRANSFORMS`;
            for images PFLlib's normalization only).
    """

    def __init__(self, dataset: Dataset, device: torch.device, transform: Transform | None = None):
        self.device = device
        self.inputs = dataset.inputs.to(device)
        self.targets = dataset.targets.to(device)
        self.num_classes = dataset.num_classes
        self.transform = transform or TRANSFORMS[dataset.modality]()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One model input's shape after the transform ((C, H, W) for images, (T, F) for sequences, (L,) for
        character ids, (1, mel bins, frames) for waveforms)."""
        return self.transform.output_shape(tuple(self.inputs.shape[1:]))

    def inference_batch_size(self, configured: int | None) -> int:
        """``configured``, or this device's default for these images (:func:`inference_batch_size`)."""
        return inference_batch_size(configured, self.device, self.sample_shape)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs (B, C, S, S) float32 and int64 labels (B,) for pool indices ``idx`` (B,) on the device (for
        sequences: inputs (B, T, F) and the targets, labels or regression targets (B, D)).

        ``generator`` (a CPU generator) draws the training augmentation; without it (evaluation) the
        batch is only normalized and resized. Images come in channels-last memory layout: on CPU,
        convolution and max-pooling run 1.6x faster on it (all-client evaluation of the CNN: 2.6 s ->
        1.6 s per round here).
        """
        return self.transform(self.inputs[idx], generator), self.targets[idx]


@dataclass(frozen=True)
class ClientData:
    """One client's index tensors on the training device.

    Attributes:
        fit: indices used for local training (the train split minus ``holdout`` and ``val``).
        val: the algorithm's own validation split (FedFomo scores received models on it),
            carved from the train split after ``holdout``; ``None`` when the algorithm needs none.
        test: the client's test split; only evaluation reads it.
        holdout: the hyperparameter-search split, the last ``tuning_val_ratio`` of the train
            split (``None`` outside tuning). It depends on nothing a trial searches, so every
            trial of a study scores on the same samples.
    """

    fit: torch.Tensor
    val: torch.Tensor | None
    test: torch.Tensor
    holdout: torch.Tensor | None = None


def client_data(partition: Partition, device: torch.device, val_ratio: float | None = None,
                holdout_ratio: float | None = None) -> list[ClientData]:
    """Move a partition's index tensors to ``device``, holding out the splits whose ratios are set.

    The train split (n,) loses its last ``holdout_ratio`` first (the tuning split), then the
    rest its last ``val_ratio`` (the algorithm's validation split); see :func:`split_validation`.

    Raises:
        PartitionError: a client has too few train samples for a split.
    """
    def device_or_none(idx: torch.Tensor | None) -> torch.Tensor | None:
        return None if idx is None else idx.to(device)

    out = []
    for split in partition.clients:
        rest, holdout = split_validation(split.train, holdout_ratio) if holdout_ratio else (split.train, None)
        fit, val = split_validation(rest, val_ratio) if val_ratio else (rest, None)
        out.append(ClientData(fit.to(device), device_or_none(val), split.test.to(device), device_or_none(holdout)))
    return out
