"""torch.export -> bitsmith IR, and the loaders that turn a MODEL argument into a model."""
from ..errors import UnsupportedOpError
from .importer import decomposition_table, export, from_torch, import_program
from .loaders import LoadedModel, ModelLoadError, load_model

__all__ = ["UnsupportedOpError", "decomposition_table", "export", "from_torch",
           "import_program", "LoadedModel", "ModelLoadError", "load_model"]
