"""Every model, imported in one place so `Base.metadata` is complete (Alembic, tests)."""

from domain.base import Base
from domain.identity import ApiToken, User
from domain.plans import Plan
from domain.pricing import ModelPrice
from domain.workspaces.models import Member, Workspace

__all__ = ["ApiToken", "Base", "Member", "ModelPrice", "Plan", "User", "Workspace"]
