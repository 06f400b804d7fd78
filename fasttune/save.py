"""Saving: adapters, merged 16-bit models. (placeholder; filled in below)"""


def attach_save_methods(model) -> None:
    pass
