"""w2vcache: extract every layer of Wav2Vec 2.0 once, then probe and fine-tune cheaply."""

__version__ = "0.1.0"
