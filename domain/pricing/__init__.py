"""Prices: the versioned catalog (`catalog`), the pure pricing rules (`rules`), and the services
that quote and publish (`service`)."""

from domain.pricing.catalog import Modality, ModelPrice, PriceList

__all__ = ["Modality", "ModelPrice", "PriceList"]
