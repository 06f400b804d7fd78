from .registry import FAMILIES, fast_state, family_of, install_fast_forward

__all__ = ["FAMILIES", "fast_state", "family_of", "install_fast_forward"]
