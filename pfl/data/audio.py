"""The on-device front end of audio inputs (the ``audio`` modality): int16 waveforms (B, L) to log-mel spectrograms.

Waveforms are stored as int16 on the training device; a batch is an index gather, then :class:`AudioTransform`
computes, batched on that device (no per-sample host loop):

1. ``x = waveform / 32768`` (float32 in [-1, 1), as TensorFlow's ``decode_wav``);
2. frames of ``window`` samples every ``hop`` samples with no padding (``center=False``: frame t covers samples
   ``[t * hop, t * hop + window)``; ``1 + (L - window) // hop`` frames, 98 for 1 s at the defaults), each multiplied
   by a periodic Hann window, zero-padded at its end to ``n_fft``, the next power of two of ``window`` (512), and
   Fourier-transformed: TensorFlow's ``AudioSpectrogram`` framing (``tensorflow/core/kernels/spectrogram.cc``:29-37
   periodic Hann, :62 ``fft_length_ = NextPowerOfTwo(window_length_)``, :193-200 the zero padding;
   ``spectrogram_op.cc``:56-61 the frame count). It runs through ``torch.stft`` on the waveform padded with
   ``n_fft - window`` zeros at its end and the window padded likewise, which frames exactly so;
3. the power spectrum ``|X|^2`` (``magnitude_squared=True``, ``input_data.py``:377-381), (B, n_fft // 2 + 1, T);
4. ``n_mels`` triangular mel filters, HTK mel scale, unnormalized, from :data:`F_MIN` = 20 Hz to :data:`F_MAX` =
   8 kHz (Nyquist), built once per device with ``transformers.audio_utils.mel_filter_bank`` (a maintained library's
   filterbank; torchaudio does not install beside torch 2.13);
5. ``log(mel + 1e-6)`` (:data:`LOG_OFFSET`), as the model input float32 (B, 1, n_mels, T).

The defaults, a 30 ms window, a 10 ms hop and 40 mel bins, are Warden's training defaults in TensorFlow's
``speech_commands`` example (``train.py``:357-371 ``--window_size_ms 30``, ``--window_stride_ms 10``,
``--dct_coefficient_count 40``; at github.com/ashuven63/tf_audio, a fork of tensorflow/tensorflow, commit bc561b81;
TensorFlow's C++ files cited here are read at that commit too), with window and hop in samples as its
``prepare_model_settings`` takes them, ``int(rate x ms / 1000)`` (``models.py``:43-50).
Deliberate differences from that example's default ``mfcc`` features: a log-mel spectrogram (no DCT), filters on
the power spectrum from 20 Hz to 8 kHz (its MFCC op filters the magnitude from 20 Hz to 4 kHz, ``mfcc.cc``:24-27,
``mfcc_mel_filterbank.cc``:187), and ``log(mel + 1e-6)`` where its op takes ``log(max(mel, 1e-12))``
(``mfcc.cc``:26, 55-61). No training augmentation (no time shift or background mixing).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

F_MIN, F_MAX = 20.0, 8000.0  # Hz: the mel filterbank's range
LOG_OFFSET = 1e-6  # added to the mel energies before the log, so silence stays finite
INT16_SCALE = 32768.0  # int16 samples to [-1, 1)


@dataclass(frozen=True)
class AudioTransform:
    """What turns a gathered batch of int16 waveforms into log-mel spectrograms (module docstring).

    Attributes:
        n_mels: mel filters, from 1 up to as many as leave every filter at least one FFT bin (126 with the
            512-point FFT of the default 30 ms window; 70 with a 256-point FFT, windows of 129 to 256 samples).
        window_ms: analysis window, milliseconds: at least 2 samples (0.125 ms at 16 kHz), at most the clip.
        hop_ms: hop between frames, milliseconds: at least 1 sample (0.0625 ms at 16 kHz).
        sample_rate: Hz of the stored waveforms (16,000 for Speech Commands).

    Raises:
        ValueError: a knob outside those ranges; one line naming it and its allowed range.
    """

    n_mels: int = 40
    window_ms: float = 30.0
    hop_ms: float = 10.0
    sample_rate: int = 16_000

    augments = False  # no training augmentation

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"window_ms={self.window_ms} gives a window of {self.window} samples at "
                             f"{self.sample_rate} Hz; use at least {2000 / self.sample_rate:g} ms (e.g. 30)")
        if self.hop < 1:
            raise ValueError(f"hop_ms={self.hop_ms} gives a hop of {self.hop} samples at {self.sample_rate} Hz; use "
                             f"at least {1000 / self.sample_rate:g} ms (e.g. 10)")
        if not isinstance(self.n_mels, int) or self.n_mels < 1:
            raise ValueError(f"n_mels must be an integer >= 1, got {self.n_mels!r}; e.g. 40")
        empty = int((self.mel_filters().amax(0) == 0).sum())
        if empty:
            raise ValueError(f"n_mels={self.n_mels} leaves {empty} mel filters without an FFT bin at "
                             f"window_ms={self.window_ms} ({self.n_fft}-point FFT); use fewer mel filters or a "
                             "longer window")

    @property
    def window(self) -> int:
        """Window length in samples, ``int(sample_rate x window_ms / 1000)`` (480 at the defaults)."""
        return int(self.sample_rate * self.window_ms / 1000)

    @property
    def hop(self) -> int:
        """Hop in samples, ``int(sample_rate x hop_ms / 1000)`` (160 at the defaults)."""
        return int(self.sample_rate * self.hop_ms / 1000)

    @property
    def n_fft(self) -> int:
        """FFT length: the smallest power of two >= :attr:`window` (512 at the defaults)."""
        return 1 << (self.window - 1).bit_length()

    def mel_filters(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The mel filterbank float32 (n_fft // 2 + 1, n_mels) on ``device``, built once per device (step 4 of the
        module docstring)."""
        return _mel_filters(self.n_mels, self.n_fft, self.sample_rate, torch.device(device))

    def output_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The model input's shape ``(1, n_mels, frames)`` for stored waveforms of shape ``(L,)``; frames =
        ``1 + (L - window) // hop`` ((1, 40, 98) for 16,000 samples at the defaults).

        Raises:
            ValueError: ``stored`` is not one axis of at least :attr:`window` samples.
        """
        if len(stored) != 1 or stored[0] < self.window:
            raise ValueError(f"audio inputs must be waveforms of shape (L,) with L >= {self.window} samples "
                             f"(window_ms={self.window_ms}), got {stored}")
        return 1, self.n_mels, 1 + (stored[0] - self.window) // self.hop

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-mel spectrograms float32 (B, 1, n_mels, frames) of int16 waveforms (B, L) on any device, computed on
        that device; ``generator`` is unused (no augmentation)."""
        x = torch.nn.functional.pad(inputs.float() / INT16_SCALE, (0, self.n_fft - self.window))
        window = _padded_hann(self.window, self.n_fft, inputs.device)
        spectrum = torch.stft(x, self.n_fft, self.hop, window=window, center=False, return_complex=True)
        power = spectrum.real.square() + spectrum.imag.square()  # (B, n_fft // 2 + 1, frames)
        mel = torch.matmul(self.mel_filters(inputs.device).T, power)  # (B, n_mels, frames)
        return torch.log(mel + LOG_OFFSET).unsqueeze(1)


@functools.lru_cache(maxsize=None)
def _mel_filters(n_mels: int, n_fft: int, sample_rate: int, device: torch.device) -> torch.Tensor:
    """float32 (n_fft // 2 + 1, n_mels) on ``device``: ``transformers.audio_utils.mel_filter_bank``'s HTK-scale
    triangular filters from :data:`F_MIN` to :data:`F_MAX`, unnormalized (``norm=None``)."""
    from transformers.audio_utils import mel_filter_bank

    with warnings.catch_warnings():  # empty filters are refused in AudioTransform.__post_init__, with a fix
        warnings.simplefilter("ignore")
        bank = mel_filter_bank(n_fft // 2 + 1, n_mels, F_MIN, F_MAX, sample_rate, norm=None, mel_scale="htk")
    return torch.from_numpy(bank).float().to(device)


@functools.lru_cache(maxsize=None)
def _padded_hann(window: int, n_fft: int, device: torch.device) -> torch.Tensor:
    """float32 (n_fft,) on ``device``: a periodic Hann window of ``window`` samples, zero-padded at its end."""
    return torch.nn.functional.pad(torch.hann_window(window, periodic=True), (0, n_fft - window)).to(device)
