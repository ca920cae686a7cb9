"""Model providers: the factory that turns settings into a strands model, and the demo model."""

from agent_service.models.factory import build_model

__all__ = ["build_model"]
