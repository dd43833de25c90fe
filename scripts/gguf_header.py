"""Read the key-value metadata of a GGUF file, even one whose tensor data is cut off
(the DeepSeek-R1-Distill-Qwen-7B chunk from PyPI), with llama.cpp's gguf-py."""

import gguf


class HeaderReader(gguf.GGUFReader):
    """A GGUFReader that skips the tensors, so a truncated file still yields its header."""

    def _build_tensors(self, start_offs, fields):  # noqa: D401 - overrides the reader
        self.tensors = []
