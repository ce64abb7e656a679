"""The placeholder object behind every name of the stand-in packages."""


class Placeholder:
    """Importable, subclassable and attribute-chainable; raises when called."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name} was called, but this process runs with megaspark's import-only "
            f"stand-in for its package (megaspark/targets/sglang_stubs): the real package "
            f"has no CPU build. Nothing on megaspark's text-target path calls it.")

    def __mro_entries__(self, bases):
        return (object,)

    def __repr__(self) -> str:
        return f"<megaspark stand-in {self._name}>"


def module_getattr(module_name: str):
    """A module-level ``__getattr__`` answering every public name with a placeholder."""

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{module_name}.{attr}")

    return __getattr__
