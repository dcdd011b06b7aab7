"""lmforge: train, fine-tune, evaluate and serve language models, offline and CPU first.

>>> from lmforge import LanguageModel
>>> lm = LanguageModel.load("runs/quickstart")
>>> print(lm.generate("The with statement", max_new_tokens=50, temperature=0))
"""

from typing import Any

__all__ = ["LanguageModel", "LmforgeError", "__version__"]

from lmforge.errors import LmforgeError
from lmforge.version import __version__


def __getattr__(name: str) -> Any:  # import torch only when the API is used
    if name == "LanguageModel":
        from lmforge.api import LanguageModel

        return LanguageModel
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
