"""The model zoo: small, deterministic, plain-torch models for exercising the compiler."""

from ..errors import ModelLoadError
from . import bert, llama, mlp, resnet, vit
from .spec import ModelSpec

__all__ = ["ModelSpec", "get", "names"]

_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec for spec in (mlp.SPEC, resnet.SPEC, vit.SPEC, bert.SPEC, llama.SPEC)
}


def names() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> ModelSpec:
    """The spec registered under `name`; raises ModelLoadError listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelLoadError(f"unknown model {name!r}; valid names: {', '.join(names())}") from None
