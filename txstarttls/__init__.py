"""txstarttls: SMTP with STARTTLS done right, for Twisted."""

__version__ = "0.1.0"

__all__ = ["__version__"]
