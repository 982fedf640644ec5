"""ambassador: an outbound proxy that makes an application's remote calls robust."""

__version__ = "0.1.0"
