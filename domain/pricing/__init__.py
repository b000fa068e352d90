"""Prices: the per-model catalog (`catalog`) and the pure pricing rules (`rules`)."""

from domain.pricing.catalog import Modality, ModelPrice, current_prices, list_model_prices

__all__ = ["Modality", "ModelPrice", "current_prices", "list_model_prices"]
