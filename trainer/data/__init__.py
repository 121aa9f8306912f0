"""Data: layouts -> items -> decoded uint8 tensors -> batches (images) or token streams (text)."""

from trainer.data.items import DataError, ImageItems

__all__ = ["DataError", "ImageItems"]
