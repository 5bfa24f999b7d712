"""The real CLIP BPE tokenizer (Stable Diffusion's 49,408 tokens), rebuilt from the vocabulary file that
ships in the ``open-clip-torch`` wheel.

The file is located with ``importlib.util.find_spec`` and read; the ``open_clip`` package itself is
never imported (its torchvision import fails beside a CPU-only torch). Install it with
``pip install --no-deps open-clip-torch``. The vocabulary is laid out exactly as OpenAI's
``SimpleTokenizer`` builds it, so transformers' ``CLIPTokenizer`` gives the released SD ids.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import zlib
from pathlib import Path

from wadi_analysis.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # merges the CLIP vocabulary uses (the file holds more)


def byte_characters() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + extra))
            extra += 1
    return characters


def open_clip_vocabulary() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open-clip-torch (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP BPE vocabulary needs open-clip-torch: pip install --no-deps open-clip-torch")
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open-clip-torch")
    return path


def _vocabulary_lines(path: Path) -> list[str]:
    """The lines of the gzipped BPE vocabulary, or a message naming the damaged file."""
    try:
        with gzip.open(path) as handle:
            lines = handle.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error):
        raise UserError(f"{path} is not a readable CLIP BPE vocabulary (reinstall open-clip-torch)") from None
    if len(lines) < MERGES + 1:
        raise UserError(f"{path} holds {len(lines)} lines, fewer than CLIP's {MERGES} merges")
    return lines


def write_clip_tokenizer(folder: str | os.PathLike, max_length: int = 77, vocabulary: str | os.PathLike | None = None):
    """Write ``vocab.json``/``merges.txt`` for the CLIP BPE tokenizer into ``folder`` and return the
    ``transformers.CLIPTokenizer`` (prompts padded/truncated to ``max_length`` tokens)."""
    from transformers import CLIPTokenizer

    lines = _vocabulary_lines(Path(vocabulary or open_clip_vocabulary()))
    merges = [tuple(line.split()) for line in lines[1: MERGES + 1]]
    # SimpleTokenizer's order: the printable bytes first, then the remapped ones
    characters = sorted(byte_characters(), key=lambda c: (ord(c) >= 256, ord(c)))
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    # vocab.json + merges.txt define it; the 3.6 MB fast-tokenizer cache is rebuilt on load
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return CLIPTokenizer.from_pretrained(folder)


def write_caption_t5_tokenizer(folder: str | os.PathLike, captions: list[str], max_length: int = 256):
    """Write and return a ``T5TokenizerFast`` whose vocabulary is the words of ``captions`` (split at white
    space, as T5's Metaspace pre-tokenizer splits; any other word, or case, is ``<unk>``): the third text
    encoder's tokens of the flow teacher, where no SentencePiece model can be had. Ids 0, 1, 2 are T5's
    pad, eos and unk."""
    from tokenizers import Tokenizer, models
    from transformers import T5TokenizerFast

    words = sorted({word for text in captions for word in text.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    tokenizer = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=2)), eos_token="</s>",
                                unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)
