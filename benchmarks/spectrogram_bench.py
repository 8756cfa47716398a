"""Benchmark: the audio front end batched on the device against the same log-mel spectrogram per clip on the host.

Both compute the 40-bin log-mel spectrogram of 1 s Speech Commands clips (30 ms periodic Hann window, 10 ms hop,
512-point FFT, HTK mel filters 20 Hz - 8 kHz, ``log(mel + 1e-6)``; :mod:`pfl.data.audio`):

* ``pfl batched``: :class:`pfl.data.audio.AudioTransform` on int16 waveforms resident on the device, in batches;
* ``per-clip host loop``: a Python loop over the clips calling ``transformers.audio_utils.spectrogram`` (numpy,
  one clip at a time) with the same window and filterbank, then the same log.

Prints clips/s of each (the fastest of ``--passes`` passes), measured in the same run on the clips the loader reads
(the shared copy: 960 clips; the host loop times the first ``--host-clips``), and the speed-up. Usage::

    .venv/bin/python benchmarks/spectrogram_bench.py [--data-dir DIR] [--batch-size 256] [--passes 3] [--host-clips 200]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from transformers.audio_utils import spectrogram, window_function

from pfl.benchmarking import sync
from pfl.data.audio import LOG_OFFSET, AudioTransform
from pfl.data.speech_commands import load_speech_commands


def batched(transform: AudioTransform, waveforms: torch.Tensor, batch_size: int, passes: int) -> float:
    """Clips/s of ``transform`` over ``waveforms`` (on their device) in batches: the fastest of ``passes`` passes,
    after one warm-up batch (which builds the window and filterbank on the device)."""
    transform(waveforms[:batch_size])

    def one_pass() -> None:
        for b in range(0, len(waveforms), batch_size):
            transform(waveforms[b:b + batch_size])
        sync(waveforms.device)

    return len(waveforms) / fastest(one_pass, passes)


def per_clip(transform: AudioTransform, waveforms: np.ndarray, passes: int) -> float:
    """Clips/s of a host loop computing each clip's log-mel spectrogram with ``transformers.audio_utils``: the
    fastest of ``passes`` passes."""
    window = window_function(transform.window, "hann", periodic=True)
    filters = transform.mel_filters().numpy()

    def one_pass() -> None:
        for clip in waveforms:
            mel = spectrogram(clip / 32768.0, window, transform.window, transform.hop, transform.n_fft, power=2.0,
                              center=False, mel_filters=filters, mel_floor=0.0, log_mel=None)
            np.log(mel + LOG_OFFSET)

    return len(waveforms) / fastest(one_pass, passes)


def fastest(run, passes: int) -> float:
    """Seconds of the fastest of ``passes`` calls of ``run`` (the development machine is shared: the fastest pass
    is the least disturbed)."""
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("PFL_DATA_DIR", "data"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3, help="timed passes of each path; the fastest counts")
    parser.add_argument("--host-clips", type=int, default=200, help="clips timed in the per-clip host loop")
    args = parser.parse_args()
    waveforms = load_speech_commands(args.data_dir).inputs
    transform = AudioTransform()
    host = per_clip(transform, waveforms[:args.host_clips].numpy(), args.passes)
    print(f"{len(waveforms)} Speech Commands clips, log-mel {transform.output_shape((waveforms.shape[1],))}, batch "
          f"{args.batch_size}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print("| device | path | clips/s | vs per-clip host loop |\n|---|---|---|---|")
    print(f"| cpu | per-clip host loop (transformers.audio_utils) | {host:,.0f} | 1.00x |")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        rate = batched(transform, waveforms.to(device), args.batch_size, args.passes)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"| {name} | pfl batched (AudioTransform) | {rate:,.0f} | {rate / host:.1f}x |")


if __name__ == "__main__":
    main()
