"""A stand-in for torchaudio, on PYTHONPATH only when LLaMA-Factory's loader runs in the consumer test.

LLaMA-Factory imports torchaudio for audio datasets only; the registry's torchaudio does not load
against the CPU torch the test environment uses, and these exports hold text."""
