"""wxd: WeChat Official Account + Mini Program integration daemon."""

__version__ = "0.1.0"
