"""Tokenizers of prepared corpora: UTF-8 bytes or a Hugging Face ``tokenizers`` file.

``bytes`` (vocab 256) is one token per UTF-8 byte with EOS id 0 (the NUL byte,
removed from the text). Anything else is a local ``tokenizer.json`` (no hub
access) whose EOS is one of its special tokens; `train_bpe` makes a
byte-level BPE one (GPT-2 style, EOS ``<|endoftext|>`` = id 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

BYTES = "bytes"
BPE_EOS = "<|endoftext|>"
EOS_CANDIDATES = (BPE_EOS, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer:
    """``encode_batch(texts) -> [[len] int array, ...]``, ``decode(ids) -> str``,
    ``vocab_size``, ``eos_id`` and ``spec`` (``"bytes"`` or the tokenizer.json path)."""

    def __init__(self, spec: str | Path, eos_token: str | None = None):
        self.spec = str(spec)
        if self.spec == BYTES:
            self._hf, self.vocab_size, self.eos_id = None, 256, 0
            return
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"tokenizer must be 'bytes' or a tokenizer.json file, got {spec!r}")
        self._hf = HFTokenizer.from_file(str(path))
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [self._hf.token_to_id(name) for name in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(
                f"eos_token: {path} has none of {list(names)}; name its end-of-text token"
            )
        self.eos_id = found[0]

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding every id (uint8, uint16 or uint32)."""
        for dtype in (np.uint8, np.uint16):
            if self.vocab_size <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        return np.dtype(np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no EOS added), as ``self.dtype`` arrays."""
        if self._hf is None:
            return [np.frombuffer(t.replace("\0", "").encode("utf-8"), np.uint8) for t in texts]
        encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, self.dtype) for e in encodings]

    def decode(self, ids) -> str:
        """Text of ``ids`` (invalid UTF-8 byte sequences become U+FFFD)."""
        ids = np.asarray(ids).reshape(-1)
        if self._hf is None:
            return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return self._hf.decode(ids.tolist(), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> Path:
    """Trains a byte-level BPE of ``vocab_size`` ids (EOS ``<|endoftext|>`` = 0)
    on ``texts`` and saves it as ``path`` (a tokenizer.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"train_tokenizer must be >= {len(alphabet) + 1}, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
