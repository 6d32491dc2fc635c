"""Self-supervised methods, one module each; importing this package registers every module in it (a new method is a
new file here, nothing else) and those of installed plugins (packages declaring an ``sslhub.methods`` entry point that
names the module defining their method)."""

from importlib import import_module
from importlib.metadata import entry_points
from pkgutil import iter_modules

from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, hparam

ENTRY_POINT_GROUP = "sslhub.methods"
BUILTIN_METHOD_MODULES = [name for _, name, _ in iter_modules(__path__) if name != "base"]
for _module in BUILTIN_METHOD_MODULES:
    import_module(f"{__name__}.{_module}")


def load_plugins() -> list[str]:
    """Import the module of every installed ``sslhub.methods`` entry point (each registers its methods when
    imported); returns the modules imported."""
    modules = [entry.value.partition(":")[0] for entry in entry_points(group=ENTRY_POINT_GROUP)]
    for module in modules:
        import_module(module)
    return modules


load_plugins()

__all__ = ["MethodHparams", "MethodOutput", "SSLMethod", "TrainingProgress", "hparam", "load_plugins"]
