"""Secure transfer gateway: an SMTP relay that releases safeguarding mail only to secure domains."""

__version__ = "0.1.0"
